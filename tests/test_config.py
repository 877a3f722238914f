"""Bad budget YAML: each case gives a message naming the file, the key and what is allowed."""
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
""")
    cfg = load_config(tmp_path / "b.yaml")
    assert cfg.model == str((tmp_path / "m").resolve())
    assert cfg.calibration.source == str(tmp_path / "c.txt")
    assert cfg.budget.memory == int(1.5 * 2**20)
    assert len(cfg.candidates) == 6 and all(not o.sym for o in cfg.candidates)
    assert cfg.export_targets == ["gptq"]
    assert cfg.default_option.bits == 4


def test_sizes():
    assert parse_size("60MiB", "f", "k") == 60 * 2**20
    assert parse_size("1.5 GB", "f", "k") == 1_500_000_000
    assert parse_size(1000, "f", "k") == 1000


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
