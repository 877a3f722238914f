"""Bad budget YAML: each case gives a message naming the file, the key and what is allowed."""
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from quantc.cli import main
from quantc.config import load_config, parse_config, parse_size
from quantc.errors import ConfigError

BAD = [
    ("model: [unclosed", "malformed YAML at line 1"),
    ("- a\n- b\n", "top level must be a mapping"),
    ("quant: {bits: 4}\n", "`model`: missing"),
    ("model: {M}\ncolour: red\n", "`colour`: unknown key; allowed keys: budget, calibration"),
    ("model: {M}\nquant: {bits: 5}\n", "`quant.bits`: bits 5 is not supported; allowed: 2, 3, 4, 8"),
    ("model: {M}\nquant: {bits: [2, 4, 7]}\n", "bits 7 is not supported"),
    ("model: {M}\nquant: {bits: four}\n", "`quant.bits`: expected int or list, got str"),
    ("model: {M}\nquant: {group_size: 100}\n", "`quant.group_size`: group size 100 is not allowed"),
    ("model: {M}\nquant: {sym: maybe}\n", "`quant.sym`: expected bool, got str"),
    ("model: {M}\nquant: {method: awq}\n", "`quant.method`: 'awq' is not known; allowed: gptq, rtn"),
    ("model: {M}\nquant: {qep_alpha: 1.5}\n", "`quant.qep_alpha`: must be in [0, 1]"),
    ("model: {M}\nquant: {damp: 0}\n", "`quant.damp`: must be in (0, 1]"),
    ("model: {M}\nbudget: {memory: -5MiB}\n", "`budget.memory`: must be positive"),
    ("model: {M}\nbudget: {memory: 60 parsecs}\n", "`budget.memory`: cannot read size"),
    ("model: {M}\nbudget: {avg_bits: -1}\n", "`budget.avg_bits`: must be in (0, 16]"),
    ("model: {M}\nbudget: {avg_bits: 3, memory: 1MiB}\n", "`budget`: give one of"),
    ("model: {M}\nbudget: {bytes: 3}\n", "`budget.bytes`: unknown key"),
    ("model: /nonexistent/folder\n", "`model`: model folder '/nonexistent/folder' not found"),
    ("model: ./nowhere\n", "model folder './nowhere' not found"),
    ("model: {M}\ncalibration: {source: missing.jsonl}\n", "`calibration.source`: file 'missing.jsonl' not found"),
    ("model: {M}\ncalibration: {samples: 0}\n", "`calibration.samples`: must be a positive integer"),
    ("model: {M}\ncalibration: {seq_len: abc}\n", "`calibration.seq_len`: expected int, got str"),
    ("model: {M}\nexport: {targets: [exl2]}\n", "`export.targets`: 'exl2' is not known; allowed: gptq, onnx, gguf"),
    ("model: {M}\nkeep_fp16: ['lm_head(']\n", "`keep_fp16[0]`: invalid regular expression"),
    ("model: {M}\noverrides: [{bits: 8}]\n", "`overrides[0]`: each override is a mapping with `match`"),
    ("model: {M}\noverrides: [{match: x, bits: 6}]\n", "`overrides[0].bits`: bits 6 is not supported"),
    ("model: {M}\ncandidates: [{group_size: 64}]\n", "`candidates[0].bits`: missing"),
    # a string where a number belongs says so (not "bits '4' is not supported")
    ("model: {M}\nquant: {bits: [4, \"4\"]}\n", "`quant.bits`: bits '4' is a string, not a number; write it without quotes: 4"),
    ("model: {M}\nquant: {bits: 4, group_size: [32, '64']}\n", "group size '64' is a string, not a number"),
    ("model: {M}\nquant: {group_size: '64'}\n", "`quant.group_size`: '64' is a string, not a number"),
    ("model: {M}\ncalibration: {samples: '8'}\n", "`calibration.samples`: '8' is a string, not a number"),
    # duplicate keys: YAML keeps the last one silently; quantc names the key path and both lines
    ("model: {M}\nquant: {bits: 4, bits: 3}\n", "`quant.bits`: given twice (line 2); YAML would keep only the last"),
    ("model: {M}\nquant:\n  bits: 4\nbudget: {avg_bits: 3}\nquant:\n  bits: 2\n", "`quant`: given twice (lines 2 and 5)"),
    ("model: {M}\noverrides:\n  - match: down\n    bits: 8\n    bits: 2\n", "`overrides[0].bits`: given twice (lines 4 and 5)"),
    ("model: {M}\nmodel: {M}\n", "`model`: given twice (lines 1 and 2)"),
    # settings that would have no effect
    ("model: {M}\nquant: {method: rtn, qep_alpha: 0.5}\n", "`quant.qep_alpha`: error propagation needs calibration"),
    ("model: {M}\nquant: {bits: 4}\ncandidates: [{bits: 2}]\n", "`quant.bits`: has no effect when `candidates`"),
    # named candidate sets and rotation
    ("model: {M}\ncandidates: widest\n", "`candidates`: 'widest' is not a known candidate set; known sets: wide"),
    ("model: {M}\nquant: {group_size: 64}\ncandidates: wide\n", "`quant.group_size`: has no effect: `candidates: wide`"),
    ("model: {M}\nquant: {sym: false}\ncandidates: wide\n", "`quant.sym`: has no effect"),
    ("model: {M}\nquant: {grid: k}\ncandidates: wide\n", "`quant.grid`: has no effect: `candidates: wide` fixes"),
    ("model: {M}\nquant: {candidates: wide}\n", "`quant.candidates`: `candidates` is a top-level key"),
    ("model: {M}\nquant: {rotate: quarot}\n", "`quant.rotate`: 'quarot' is not known; allowed: none, hadamard"),
    ("model: {M}\nquant: {rotate_seed: 3}\n", "`quant.rotate_seed`: has no effect without a rotation"),
    ("model: {M}\nquant: {rotate: hadamard, rotate_seed: -1}\n", "`quant.rotate_seed`: must be a non-negative"),
    ("model: {M}\nplan: {solve: some}\n", "`plan.solve`: 'some'; allowed: anchors, all"),
    ("model: {M}\nplan: {predictor: exact, solve: anchors}\n", "`plan.solve`: anchors is the fisher predictor's"),
    ("model: {M}\nplan: {qep_discount: 1.5}\n", "`plan.qep_discount`: must be in [0, 1] (0 = the measurement ignores QEP)"),
    ("model: {M}\nbudget: {memory: .inf}\n", "`budget.memory`: must be positive and finite, got inf"),
    ("model: {M}\ncandidates: 4\n", "`candidates`: expected list or str, got int 4; write it as `candidates: [{bits: 4}"),
    # a value of the wrong shape says how the section is written
    ("model: {M}\nbudget: 4.5\n", "`budget`: expected dict, got float 4.5; write it as `budget: {avg_bits: 4.5}"),
    ("model: {M}\nkeep_fp16: lm_head\n", "write it as `keep_fp16: [lm_head]`"),
    ("model: {M}\ncalibration: data.jsonl\n", "write it as `calibration: {source: data.jsonl"),
    ("model: {M}\nquant:\n  bits: 4, 8\n", "`quant.bits`: '4, 8' is one string; write a list: bits: [4, 8]"),
    ("model: {M}\ncandidates: [4, 8]\n", "`candidates[0]`: expected a mapping, got 4: write `- {bits: 4}`"),
    ("model: {M}\ncandidates: []\n", "`candidates`: empty: list at least one option"),
    ("model: {M}\nquant: {group_size: [64, 128]}\ncandidates: [{bits: 4}]\n", "`quant.group_size`: a list has no effect"),
    ("model:\nquant: {bits: 4}\n", "`model`: empty"),
    ("model: {path: {M}, revision: 1234567}\n", "`model.revision`: 1234567 was read as a number; write it in quotes"),
    ("model: {M}\nquant: {units: per_linear}\n", "`quant.units`: 'per_linear' is not known"),
    ("model: {M}\nbudget: {max_delta_loss: .nan}\n", "`budget.max_delta_loss`: must be a number ≥ 0"),
    ("model: {M}\noverrides: [{match: q_proj, skip: true, bits: 8}]\n", "`overrides[0]`: skip: true keeps"),
    ("model: {M}\ncalibration: {seed: 99999999999999999999999}\n", "`calibration.seed`: must be an integer from"),
    ("model: {M}\ncalibration: {seed: -99999999999999999999999}\n", "`calibration.seed`: must be an integer from"),
    ("model: {M}\nbudget: {memory: 0.5}\n", "`budget.memory`: 0.5 is less than one byte"),
    ("model: {M}\nquant: {group_size: []}\n", "`quant.group_size`: needs at least one candidate"),
    ("model: {M}\ncalibration: {samples: 128.0}\n", "`calibration.samples`: 128.0 is not an integer; write 128"),
    ("model: {M}\nquant: {method: rtn}\ncalibration: {check_samples: 4}\n", "`calibration.check_samples`: has no effect"),
]


@pytest.mark.parametrize("text,message", BAD)
def test_bad_yaml_messages(tmp_path, tiny_models, text, message):
    p = tmp_path / "budget.yaml"
    p.write_text(text.replace("{M}", str(tiny_models["llama"])))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert message in str(e.value)
    assert str(e.value).startswith(str(p))            # names the file
    r = CliRunner().invoke(main, ["compile", str(p), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and "error:" in r.output
    assert not (tmp_path / "out").exists()


def test_missing_file_and_not_a_model(tmp_path):
    with pytest.raises(ConfigError, match="budget file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "m").mkdir()
    (tmp_path / "b.yaml").write_text("model: m\n")
    with pytest.raises(ConfigError, match="has no config.json"):
        load_config(tmp_path / "b.yaml")


def test_good_config_resolves_relative_paths(tmp_path, tiny_models, calib_file):
    import shutil
    shutil.copytree(tiny_models["llama"], tmp_path / "m")
    shutil.copy(calib_file, tmp_path / "c.txt")
    (tmp_path / "b.yaml").write_text("""
model: m
budget: {memory: 1.5MiB}
quant: {bits: [2, 3, 4], group_size: [32, 64], sym: false}
calibration: {source: c.txt, samples: 4}
export: {targets: gptq}
overrides:                 # an override must not disturb the relative paths after it
  - {match: 'layers\\.0\\.mlp\\.down_proj', bits: 8}
""")
    cfg = load_config(tmp_path / "b.yaml")
    assert len(cfg.overrides) == 1
    assert cfg.model == str((tmp_path / "m").resolve())
    assert cfg.calibration.source == str(tmp_path / "c.txt")
    assert cfg.budget.memory == int(1.5 * 2**20)
    assert len(cfg.candidates) == 6 and all(not o.sym for o in cfg.candidates)
    assert cfg.export_targets == ["gptq"]
    assert cfg.default_option.bits == 4


EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_configs_load(example):
    """The README's main job reads examples/: each example must parse where its inputs exist."""
    text = example.read_text()
    if "../shared" in text and not (example.parent / "../../shared").is_dir():
        pytest.skip("the example reads ../shared, which is not beside this checkout")
    cfg = load_config(example)
    assert Path(cfg.calibration.source).is_file() or cfg.calibration.source in ("self",) \
        or cfg.calibration.source.startswith("hf:")


def test_sizes():
    assert parse_size("60MiB", "f", "k") == 60 * 2**20
    assert parse_size("1.5 GB", "f", "k") == 1_500_000_000
    assert parse_size(1000, "f", "k") == 1000
    assert parse_size("1e9", "f", "k") == parse_size(1e9, "f", "k") == 10**9     # YAML reads 1e9 as a string


def test_forgiving_forms(tmp_path, tiny_models, calib_file, monkeypatch):
    """What a user plausibly writes and means: an empty section (its keys commented out) is the same as
    none, `~` in the calibration path is the home folder, a float memory size is bytes, and a suffix in
    capitals is still a .jsonl file."""
    m = tiny_models["llama"]
    plain = parse_config({"model": str(m)}, "b.yaml")
    empty = parse_config({"model": str(m), "budget": None, "quant": None, "calibration": None, "keep_fp16": None},
                         "b.yaml")
    assert empty.to_dict() == plain.to_dict()
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "D.JSONL").write_text('{"text": ""}\n')
    cfg = parse_config({"model": str(m), "calibration": {"source": "~/D.JSONL"}, "budget": {"memory": 6.5e5}}, "b.yaml")
    assert cfg.calibration.source == str(tmp_path / "D.JSONL") and cfg.budget.memory == 650_000
    from quantc.calibration.data import check_source
    from quantc.errors import QuantcError
    with pytest.raises(QuantcError, match="has no text"):      # read as JSON lines (as plain text it is not empty)
        check_source(cfg.calibration)


def test_the_other_predictors_settings_are_named(tiny_models, caplog):
    """Settings of the predictor not chosen are kept (a switch back is one line) and named in a warning."""
    with caplog.at_level("WARNING", logger="quantc"):
        cfg = parse_config({"model": str(tiny_models["llama"]), "plan": {"noise": 0.02, "direct_bits": 0}}, "b.yaml")
    assert cfg.plan.noise == 0.02 and "b.yaml: plan.noise has no effect with plan.predictor: fisher" in caplog.text
    assert "plan.direct_bits has no effect" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="quantc"):
        parse_config({"model": str(tiny_models["llama"]), "plan": {"predictor": "exact", "probes": 4}}, "b.yaml")
    assert "plan.probes has no effect with plan.predictor: exact (it is the fisher predictor's)" in caplog.text


def test_the_qep_discount_reads_the_compiles_alpha(tiny_models, caplog):
    """plan.qep_discount discounts what QEP removes, so it scales with quant.qep_alpha, changes the
    measurement's cache key only where it changes the measurement, and is named where it does nothing."""
    from quantc.planning import qep_beta
    m = str(tiny_models["llama"])
    cfg = lambda q, p: parse_config({"model": m, "quant": q, "plan": p}, "b.yaml")
    assert qep_beta(cfg({}, {})) == 1.0                                    # off by default
    assert qep_beta(cfg({}, {"qep_discount": 0.5})) == 0.75                # 1 − 0.5 (the default α) · 0.5
    assert qep_beta(cfg({"qep_alpha": 1.0}, {"qep_discount": 1})) == 0.0
    with caplog.at_level("WARNING", logger="quantc"):
        assert qep_beta(cfg({"qep_alpha": 0}, {"qep_discount": 0.5})) == 1.0
    assert "b.yaml: plan.qep_discount has no effect with quant.qep_alpha: 0" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="quantc"):
        assert qep_beta(cfg({}, {"predictor": "exact", "qep_discount": 0.5})) == 1.0
    assert "plan.qep_discount has no effect with plan.predictor: exact" in caplog.text


def test_several_candidates_without_a_budget_warn(tmp_path, tiny_models, caplog):
    from quantc.preflight import preflight
    one = parse_config({"model": str(tiny_models["llama"]), "quant": {"method": "rtn"}}, "b.yaml")
    many = parse_config({"model": str(tiny_models["llama"]), "quant": {"method": "rtn", "bits": [2, 4]}}, "b.yaml")
    with caplog.at_level("WARNING", logger="quantc"):
        preflight(one)
        assert "no budget" not in caplog.text
        preflight(many)
    assert "b.yaml: 2 candidate options and no budget: every linear gets the largest, 4b-g128-sym" in caplog.text


@settings(max_examples=150, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers(-10, 300) | st.floats(allow_nan=True) | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(
                        st.sampled_from(["model", "budget", "quant", "bits", "memory", "avg_bits", "group_size",
                                         "calibration", "source", "samples", "export", "targets", "overrides",
                                         "match", "keep_fp16", "candidates", "sym", "x"]), c, max_size=5),
                    max_leaves=12))
def test_fuzz_loader_only_raises_config_error(raw):
    try:
        parse_config(raw, "fuzz.yaml")
    except ConfigError:
        pass


# ---------------------------------------------------------------- duplicate keys and unmatched patterns

KEYS = ["model", "quant", "bits", "budget", "calibration", "samples", "match", "keep_fp16", "a", "b"]
scalars = st.integers(-5, 300) | st.text(alphabet="abcxyz _-", max_size=6)
trees = st.recursive(st.dictionaries(st.sampled_from(KEYS), scalars, max_size=3),
                     lambda c: st.dictionaries(st.sampled_from(KEYS), c | scalars, min_size=1, max_size=3),
                     max_leaves=10)


def render(tree, dup=None, indent=0, path=(), lines=None, marks=None):
    """Block YAML of `tree`, one key per line (marks: key path → line); `dup` = (mapping path, key) adds
    that key a second time at the end of that mapping."""
    import json
    for k, v in tree.items():
        marks[path + (k,)] = len(lines) + 1
        if isinstance(v, dict) and v:
            lines.append(" " * indent + f"{k}:")
            render(v, dup, indent + 2, path + (k,), lines, marks)
        else:
            lines.append(" " * indent + f"{k}: {json.dumps(v)}")
    if dup is not None and dup[0] == path:
        lines.append(" " * indent + f"{dup[1]}: 0")
        marks["dup"] = len(lines)
    return lines


def mappings(tree, path=()):
    yield path, tree
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            yield from mappings(v, path + (k,))


@settings(max_examples=200, deadline=None)
@given(tree=trees.filter(bool), data=st.data())
def test_fuzz_duplicate_keys_are_named_with_their_lines(tmp_path_factory, tree, data):
    import yaml
    from quantc.config import read_yaml
    p = tmp_path_factory.mktemp("dup") / "b.yaml"
    marks = {}
    p.write_text("\n".join(render(tree, None, lines=[], marks=marks)) + "\n")
    assert read_yaml(p) == yaml.safe_load(p.read_text())          # no duplicate: exactly what YAML reads
    path, mapping = data.draw(st.sampled_from(list(mappings(tree))))
    key = data.draw(st.sampled_from(sorted(mapping)))
    marks = {}
    p.write_text("\n".join(render(tree, (path, key), lines=[], marks=marks)) + "\n")
    with pytest.raises(ConfigError) as e:
        read_yaml(p)
    dotted = ".".join(path + (key,))
    assert e.value.key == dotted and e.value.file == str(p)
    assert f"given twice (lines {marks[path + (key,)]} and {marks['dup']})" in e.value.problem


MATCHING = [r"down_proj", r"layers\.0\.", r"q_proj$", r"mlp", r"self_attn\.o_proj", "lm_head", "embed_tokens",
            r"layers\.1\.mlp\.up_proj$"]
UNMATCHED = ["down_porj", r"layers\.7\.", "gate_prj", r"^mlp", "qproj", r"lm_head\.weight"]


@pytest.fixture(scope="module")
def llama_skeleton(tiny_models):
    from quantc.preflight import skeleton
    cfg = parse_config({"model": str(tiny_models["llama"])})
    return cfg, skeleton(cfg)


@settings(max_examples=150, deadline=None)
@given(keep=st.lists(st.sampled_from(MATCHING + UNMATCHED), max_size=3, unique=True),
       over=st.lists(st.sampled_from(MATCHING + UNMATCHED), max_size=4),
       dup=st.sampled_from([None, "keep_fp16", "bits", "quant"]))
def test_fuzz_unmatched_patterns_and_duplicates(tmp_path_factory, llama_skeleton, keep, over, dup):
    """Generated YAMLs with keep_fp16/overrides patterns (some typos, some shadowed by earlier ones) and
    sometimes a duplicated key: the duplicate is reported first (by the loader); otherwise the first
    pattern that matches no module, or only modules already decided, is reported by its key."""
    from quantc.model import linear_names as decoder_linears
    from quantc.preflight import check_patterns
    base, model = llama_skeleton
    lines = [f"model: {base.model}", "quant: {bits: [2, 4, 8], group_size: 32}"]
    if dup == "quant":
        lines.append("quant: {bits: 4}")
    if keep or dup == "keep_fp16":
        lines.append("keep_fp16: [" + ", ".join(f"'{k}'" for k in keep) + "]")
    if dup == "keep_fp16":
        lines.append("keep_fp16: []")
    if over:
        lines.append("overrides:")
        for i, o in enumerate(over):
            lines += [f"  - match: '{o}'", "    bits: 8"] + (["    bits: 2"] if dup == "bits" and i == 0 else [])
    p = tmp_path_factory.mktemp("pat") / "b.yaml"
    p.write_text("\n".join(lines) + "\n")
    if dup is not None and (dup != "bits" or over):
        with pytest.raises(ConfigError, match="given twice"):
            load_config(p)
        return
    cfg = load_config(p)
    # the oracle: plain re over the skeleton's names
    import re
    modules = [n for n, _ in model.named_modules() if n]
    linears = decoder_linears(model)
    keep_list = keep if keep else ["lm_head", "embed_tokens"]
    expected = next((f"keep_fp16[{i}]" for i, k in enumerate(keep_list) if not any(re.search(k, n) for n in modules)), None)
    if expected is None:
        taken = {n for n in linears if any(re.search(k, n) for k in keep_list)}
        for i, o in enumerate(over):
            hits = {n for n in linears if re.search(o, n)}
            if not hits - taken:
                expected = f"overrides[{i}].match"
                break
            taken |= hits
    if expected is None:
        check_patterns(cfg, model)
    else:
        with pytest.raises(ConfigError) as e:
            check_patterns(cfg, model)
        assert e.value.key == expected and e.value.file == str(p)
        assert "check the spelling" in e.value.problem or "has no effect" in e.value.problem


def test_wide_candidate_set(tmp_path, tiny_models):
    from quantc.config import CANDIDATE_SETS
    from quantc.options import Option
    from quantc.planning import shape_units, size_bounds
    from quantc.preflight import skeleton
    base = {"model": str(tiny_models["llama"])}
    assert parse_config(base).candidates == [Option(4, 128, True, True, True, True)]   # the default: unchanged
    cfg = parse_config({**base, "candidates": "wide", "quant": {"act_order": False}})
    kinds = {(o.bits, o.group_size, o.sym) for o in cfg.candidates}
    assert kinds == set(CANDIDATE_SETS["wide"]) and len(cfg.candidates) == 18
    assert {(b, s) for b, _, s in kinds} == {(2, False), (3, True), (3, False), (4, True), (4, False), (8, True)}
    assert {g for _, g, _ in kinds} == {32, 64, 128}
    assert not any(o.act_order for o in cfg.candidates)                 # quant.* settings apply to each
    assert cfg.candidate_set == "wide" and cfg.to_dict()["candidate_set"] == "wide"
    # bytes exactly as for any option: the extremes of the set from the shapes
    units = shape_units(skeleton(cfg), cfg)
    b = size_bounds(units, cfg)
    shapes = [s for u in units.values() for s in u["shapes"]]
    assert b["min"] == sum(Option(2, 128, sym=False).bytes_for(i, o) for i, o in shapes)
    assert b["max"] == sum(Option(8, 32).bytes_for(i, o) for i, o in shapes)
    # with serving targets: the set offers what they run (not an error)
    vllm = parse_config({**base, "candidates": "wide", "serve": "vllm"})
    assert {(o.bits, o.group_size, o.sym) for o in vllm.candidates} == \
        {(b, g, True) for b in (4, 8) for g in (32, 64, 128)}
    gguf = parse_config({**base, "candidates": "wide", "export": {"targets": ["gptq", "gguf"]}})
    assert {(o.bits, o.group_size, o.sym) for o in gguf.candidates} == {(4, 32, True), (4, 32, False), (8, 32, True)}


def test_memory_estimate_hessians_follow_head_dim_and_true_sequential(tmp_path, tiny_models):
    """o_proj reads heads · head_dim inputs (not hidden on Qwen3 and Gemma 3), and with true_sequential:
    false one forward of a layer sums every input group's float64 Hessian before the first is read."""
    from quantc.memory import memory_estimate
    src, m = tiny_models["llama"], tmp_path / "m"
    m.mkdir()
    (m / "model.safetensors").symlink_to(src / "model.safetensors")      # the estimate reads its header only
    mc = json.loads((src / "config.json").read_text())
    mc.update(hidden_size=64, num_attention_heads=4, head_dim=40, intermediate_size=96)   # o_proj: 160 inputs
    (m / "config.json").write_text(json.dumps(mc))
    hess = {ts: memory_estimate(parse_config({"model": str(m), "quant": {"true_sequential": ts, "qep_alpha": 0}}))
            ["hessians"] for ts in (True, False)}
    assert hess[True] == (8 + 4) * 160**2                                  # one group's at a time: o_proj's
    assert hess[False] == 8 * (64**2 + 160**2 + 64**2 + 96**2) + 4 * 160**2
    del mc["head_dim"]                                                     # default: hidden / heads
    (m / "config.json").write_text(json.dumps(mc))
    plain = parse_config({"model": str(m), "quant": {"qep_alpha": 0}})
    assert memory_estimate(plain)["hessians"] == (8 + 4) * 96**2          # down_proj's
    # QEP (the default) sums the cross term δ beside H, and rounds it beside H's float32 copy
    qep = memory_estimate(parse_config({"model": str(m)}))
    assert qep["hessians"] == 2 * (8 + 4) * 96**2
    # and holds the reference stream (in and out) and the original layer's input of every group
    tokens = 128 * 512                                                     # the default calibration
    assert qep["quantize"] - memory_estimate(plain)["quantize"] == tokens * 4 * (2 * 64 + (64 + 64 + 64 + 96))


def test_memory_estimate_counts_the_solved_options(tiny_models):
    """Sweep 1 keeps the codes of, and carries the sample units' streams at, the options it solves for
    every unit: one per bit width with plan.solve: anchors, every candidate with solve: all. A uniform
    compile solves one option whatever the candidate list."""
    from quantc.memory import memory_estimate, solved_options
    base = {"model": str(tiny_models["llama"]), "candidates": "wide", "budget": {"avg_bits": 4}}
    anch, every = parse_config(base), parse_config({**base, "plan": {"solve": "all"}})
    assert solved_options(anch) == 4 and solved_options(every) == 18
    ea, ee = memory_estimate(anch), memory_estimate(every)
    mc = json.loads((tiny_models["llama"] / "config.json").read_text())
    h, i = mc["hidden_size"], mc["intermediate_size"]
    attn = mc["num_attention_heads"] * (mc.get("head_dim") or h // mc["num_attention_heads"])
    assert ee["solve"] - ea["solve"] == 14 * (4 * h * attn + 3 * h * i)     # 14 more options' one-byte codes
    assert ee["measurement"] > ea["measurement"]                             # 14 more streams per sample unit
    uni = parse_config({"model": str(tiny_models["llama"]), "candidates": "wide"})
    assert solved_options(uni) == 4 and not memory_estimate(uni)["measurement"]


@pytest.mark.parametrize("check", [False, True])
def test_memory_estimate_counts_the_sample_streams_and_splits_them_over_ranks(tiny_models, monkeypatch, check):
    """Sweep 1 carries a held-out stream for each fisher sample unit at every solved option, and with
    plan.check_uniform one for the uniform plan at each. One process holds them all; under torchrun a
    rank other than 0 holds its share (rank 0 all of them, while it saves the resume point)."""
    import quantc.passes.measure as qmeasure
    from quantc.memory import activation_bytes
    cfg = parse_config({"model": str(tiny_models["llama"]), "budget": {"avg_bits": 4},
                        "candidates": [{"bits": 2, "sym": False}, {"bits": 3}, {"bits": 4}, {"bits": 8}],
                        "plan": {"check_uniform": check}})
    mc = json.loads((tiny_models["llama"] / "config.json").read_text())
    held = cfg.plan.alpha_samples * cfg.plan.alpha_seq_len * mc["hidden_size"] * 4
    uni = 4 if check else 0                  # the uniform plans' streams, one per solved option

    def extra(**kw):        # the sample's share of the estimate: with 8 sample units against none
        monkeypatch.setattr(qmeasure, "CALIBRATION_UNITS", 8)
        with_sample = activation_bytes(cfg, mc, **kw)["measure"]
        monkeypatch.setattr(qmeasure, "CALIBRATION_UNITS", 0)
        return with_sample - activation_bytes(cfg, mc, **kw)["measure"]
    assert extra() == held * 8 * 4                                   # 8 units × 4 solved options
    # its half of 32 (+ 4) streams against of 0 (4), and its pickled copy of them for the resume point's gather
    assert extra(ranks=2, gathers=False) == held * 2 * (-(-(8 * 4 + uni) // 2) - -(-uni // 2))
    # rank 0 besides: every rank's streams while it saves the resume point (gather buffer and copies)
    assert extra(ranks=2, gathers=True) == held * (2 * (-(-(8 * 4 + uni) // 2) - -(-uni // 2)) + 2 * 8 * 4)
    streams = activation_bytes(cfg, mc)["measure"]
    cfg.plan.check_uniform = not check
    assert activation_bytes(cfg, mc)["measure"] - streams == (held * 4 if not check else -held * 4)


def test_error_propagation_is_the_gptq_default(tiny_models):
    """QEP α = 0.5 unless the YAML says otherwise; round to nearest has none, so its default is 0 and a
    YAML with `method: rtn` and no qep_alpha is not refused."""
    from quantc.config import DEFAULT_QEP_ALPHA
    m = str(tiny_models["llama"])
    assert DEFAULT_QEP_ALPHA == 0.5
    assert parse_config({"model": m}, "b.yaml").qep_alpha == DEFAULT_QEP_ALPHA
    assert parse_config({"model": m, "quant": {"qep_alpha": 0}}, "b.yaml").qep_alpha == 0.0
    assert parse_config({"model": m, "quant": {"method": "rtn"}}, "b.yaml").qep_alpha == 0.0


def test_the_largest_candidate_counts_per_channel_as_the_coarsest(tiny_models):
    """Without a budget every module gets the largest candidate: at equal bits the finest groups,
    and per-channel (group_size -1: one scale per row) is the smallest of all, not the largest."""
    from quantc.options import Option
    m = str(tiny_models["llama"])
    cfg = parse_config({"model": m, "quant": {"bits": [4, 8], "group_size": [-1, 128, 32]}}, "b.yaml")
    assert (cfg.default_option.bits, cfg.default_option.group_size) == (8, 32)
    cfg = parse_config({"model": m, "quant": {"bits": [8], "group_size": [-1, 128]}}, "b.yaml")
    assert cfg.default_option.group_size == 128
    assert cfg.default_option.bytes_for(256, 256) > Option(8, -1).bytes_for(256, 256)
    assert min(cfg.candidates, key=lambda o: o.size_order).group_size == -1


def test_a_text_field_for_a_plain_text_source_is_refused(tmp_path, tiny_models, calib_file):
    p = tmp_path / "budget.yaml"
    p.write_text(f"model: {tiny_models['llama']}\ncalibration: {{source: {calib_file}, text_field: body}}\n")
    with pytest.raises(ConfigError, match=r"`calibration.text_field`: has no effect: a .txt source is plain text"):
        load_config(p)


def test_memory_estimate_counts_the_checks_comparison_where_it_is_the_peak(tmp_path, tiny_models, monkeypatch):
    """After the sweeps, rank 0 compares the held-out check's logits one sequence at a time: with a
    large vocabulary beside a small calibration that is the compile's peak, and the estimate says so,
    as does a refusal's advice. RTN compiles and check_samples: 0 run no check."""
    import quantc.memory
    from quantc.errors import QuantcError
    from quantc.memory import check_memory, memory_estimate
    src, m = tiny_models["llama"], tmp_path / "m"
    m.mkdir()
    (m / "model.safetensors").symlink_to(src / "model.safetensors")      # the estimate reads its header only
    mc = json.loads((src / "config.json").read_text())
    mc.update(vocab_size=400_000)
    (m / "config.json").write_text(json.dumps(mc))

    def est(**cal):
        return memory_estimate(parse_config({"model": str(m), "calibration": {"samples": 2, "seq_len": 512, **cal}}))
    on, off = est(), est(check_samples=0)
    assert on["check"] == 3 * 256 * 400_000 * 4 > off["activations"] + off["layer"]
    assert off["check"] == 0
    assert on["total"] - off["total"] == on["check"] - (off["activations"] + off["layer"])
    rtn = memory_estimate(parse_config({"model": str(m), "quant": {"method": "rtn"},
                                        "calibration": {"samples": 2, "seq_len": 512}}))
    assert rtn["check"] == 0
    monkeypatch.setattr(quantc.memory, "available_memory", lambda: on["total"] - 1)
    cfg = parse_config({"model": str(m), "calibration": {"samples": 2, "seq_len": 512}}, "b.yaml")
    with pytest.raises(QuantcError, match=r"the held-out check's comparison .* set calibration.check_samples: 0"):
        check_memory(cfg)
    check_memory(parse_config({"model": str(m), "calibration": {"samples": 2, "seq_len": 512, "check_samples": 0}},
                              "b.yaml"))


def test_avg_bits_counts_only_the_weights_that_are_quantized(tiny_models):
    """avg_bits is bits per quantized weight: linears kept in 16-bit (a skip override, keep_fp16) add no
    bytes to the budget, else the free units would spend theirs. And an infeasible budget with
    llama.cpp-grid candidates (ggml has no 3-bit type) gets its advice, not a crash."""
    from quantc.planning import _budget_bytes, check_budget, shape_units, size_bounds
    from quantc.preflight import skeleton
    base = {"model": str(tiny_models["llama"]), "budget": {"avg_bits": 4}, "quant": {"bits": [2, 4, 8], "group_size": 32}}
    cfg = parse_config({**base, "overrides": [{"match": r"mlp\.down_proj", "skip": True}]})
    units = shape_units(skeleton(cfg), cfg)
    every = sum(u["weights"] for u in units.values())
    down = sum(u["weights"] for k, u in units.items() if k.endswith(".down"))
    assert 0 < down < every and size_bounds(units, cfg)["weights"] == every - down
    assert _budget_bytes(cfg, size_bounds(units, cfg)["weights"]) == 4 * (every - down) // 8
    plain = parse_config(base)
    assert size_bounds(shape_units(skeleton(plain), plain), plain)["weights"] == every
    ggml = parse_config({**base, "budget": {"avg_bits": 1}, "quant": {"bits": [4, 8], "grid": "ggml"}})
    with pytest.raises(ConfigError, match=r"`budget.avg_bits`: the budget of .* is infeasible.*raise the budget"):
        check_budget(shape_units(skeleton(ggml), ggml), ggml)
