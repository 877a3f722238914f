"""Bad inputs beyond the YAML schema (see test_config.py for those): each gives a clear message and a
non-zero exit, before any heavy work where possible."""
import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from quantc.cli import main

from conftest import write_yaml


def compile_(tmp_path, yaml_text, out=None, *extra):
    y = write_yaml(tmp_path / "bad.yaml", yaml_text)
    return CliRunner().invoke(main, ["-q", "compile", str(y), "-o", str(out or tmp_path / "out"), *extra])


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def check(r, *fragments, code=2):
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output
    for f in fragments:
        assert f in r.output, (f, r.output)


def test_missing_weights(tmp_path, tiny_models):
    m = copy_model(tiny_models["llama"], tmp_path / "m")
    (m / "model.safetensors").unlink()
    check(compile_(tmp_path, f"model: {m}\nquant: {{method: rtn, group_size: 32}}\n"), "no weight files")


def test_truncated_safetensors(tmp_path, tiny_models):
    m = copy_model(tiny_models["llama"], tmp_path / "m")
    data = (m / "model.safetensors").read_bytes()
    (m / "model.safetensors").write_bytes(data[: len(data) // 2])
    check(compile_(tmp_path, f"model: {m}\nquant: {{method: rtn, group_size: 32}}\n"),
          "model.safetensors: cannot read safetensors", "truncated or corrupt")
    # the same file through the eager loader (resources.lazy_load: false)
    check(compile_(tmp_path, f"model: {m}\nquant: {{method: rtn, group_size: 32}}\nresources: {{lazy_load: false}}\n"),
          "cannot load the model", "complete")


def test_unsupported_model_type(tmp_path, tiny_models):
    m = copy_model(tiny_models["llama"], tmp_path / "m")
    cfg = json.loads((m / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (m / "config.json").write_text(json.dumps(cfg))
    check(compile_(tmp_path, f"model: {m}\n"), "model_type 'gpt2' is not supported", "llama, mistral, qwen2, qwen3")


def test_corrupt_config_json(tmp_path, tiny_models):
    m = copy_model(tiny_models["llama"], tmp_path / "m")
    (m / "config.json").write_text("{not json")
    check(compile_(tmp_path, f"model: {m}\n"), "config.json: not valid JSON")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_inf_weights(tmp_path, tiny_models, value):
    m = copy_model(tiny_models["llama"], tmp_path / "m")
    t = load_file(str(m / "model.safetensors"))
    t["model.layers.1.mlp.up_proj.weight"][3, 5] = value
    save_file(t, str(m / "model.safetensors"), metadata={"format": "pt"})
    check(compile_(tmp_path, f"model: {m}\nquant: {{method: rtn, group_size: 32}}\n"),
          "model.layers.1.mlp.up_proj.weight contains NaN or Inf")


def test_calibration_shorter_than_one_sequence(tmp_path, tiny_models):
    (tmp_path / "short.txt").write_text("too short")
    check(compile_(tmp_path, f"model: {tiny_models['llama']}\ncalibration: {{source: {tmp_path / 'short.txt'}, seq_len: 64}}\n"),
          "shorter than one sequence of 64")


def test_calibration_jsonl_without_long_docs_and_bad_lines(tmp_path, tiny_models):
    (tmp_path / "c.jsonl").write_text('{"text": "short"}\n')
    check(compile_(tmp_path, f"model: {tiny_models['llama']}\ncalibration: {{source: {tmp_path / 'c.jsonl'}, seq_len: 64}}\n"),
          "no document has 64 tokens")
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\nnot json\n')
    check(compile_(tmp_path, f"model: {tiny_models['llama']}\ncalibration: {{source: {tmp_path / 'd.jsonl'}, seq_len: 64}}\n"),
          "d.jsonl:2: not valid JSON")
    (tmp_path / "e.jsonl").write_text('{"body": "x"}\n')
    check(compile_(tmp_path, f"model: {tiny_models['llama']}\ncalibration: {{source: {tmp_path / 'e.jsonl'}}}\n"),
          "no string field 'text'")


def test_read_only_output(tmp_path, tiny_models):
    check(compile_(tmp_path, f"model: {tiny_models['llama']}\nquant: {{method: rtn, group_size: 32}}\n",
                   "/proc/quantc-out"), "choose a writable folder")


def test_group_size_not_dividing_is_an_error_not_a_crash(tmp_path, tiny_models):
    # 64-wide inputs: groups of 128 cover them as one group (allowed); per-channel too
    r = compile_(tmp_path, f"model: {tiny_models['llama']}\nquant: {{method: rtn, group_size: 128}}\n")
    assert r.exit_code == 0, r.output


def test_eval_inspect_verify_on_non_artifacts(tmp_path, tiny_models, calib_file):
    (tmp_path / "empty").mkdir()
    for cmd in (["inspect", str(tmp_path / "empty")], ["verify", str(tmp_path / "empty")],
                ["eval", str(tmp_path / "empty"), "--text", str(calib_file)]):
        check(CliRunner().invoke(main, cmd), "no config.json")
    check(CliRunner().invoke(main, ["inspect", str(tiny_models["llama"])]), "no quantization_config")


def test_verify_detects_tampering(tmp_path, tiny_models, calib_file):
    y = f"model: {tiny_models['llama']}\nquant: {{bits: 4, group_size: 32}}\ncalibration: {{source: {calib_file}, samples: 4, seq_len: 64}}\n"
    r = compile_(tmp_path, y)
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["verify", str(out)])
    assert r.exit_code == 0, r.output
    assert "logits vs source" in r.output and "FAIL" not in r.output
    t = load_file(str(out / "model.safetensors"))
    t["model.layers.0.mlp.down_proj.scales"] = t["model.layers.0.mlp.down_proj.scales"][:, :-32].contiguous()
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    r = CliRunner().invoke(main, ["verify", str(out), "--no-logits"])
    check(r, "FAIL", "failed verification", code=1)
    from quantc.verify import verify
    rows = {name: (ok, detail) for name, ok, detail in verify(out, logits=False)}
    assert rows["sha256 model.safetensors"] == (False, "differs")
    assert not rows["tensor shapes"][0] and "model.layers.0.mlp.down_proj.scales: shape" in rows["tensor shapes"][1]
    check(CliRunner().invoke(main, ["eval", str(out), "--text", str(calib_file)]), "does not match its config")


def test_verify_reads_a_module_whose_tensors_lie_in_two_shards(tmp_path, tiny_models, calib_file):
    """transformers-style sharding cuts between tensors, not modules: a module's qweight in one shard and
    its scales in the next is a valid checkpoint, which quantc.load reads, and verify checks it alike."""
    from quantc.runtime import read_tensors
    from quantc.verify import verify
    y = f"model: {tiny_models['llama']}\nquant: {{bits: 4, group_size: 32}}\ncalibration: {{source: {calib_file}, samples: 4, seq_len: 64}}\n"
    assert compile_(tmp_path, y).exit_code == 0
    out = tmp_path / "out"
    t = load_file(str(out / "model.safetensors"))
    keys = sorted(t)
    cut = keys.index("model.layers.0.self_attn.v_proj.qzeros")          # its scales go to the second shard
    shards = {"model-00001-of-00002.safetensors": keys[:cut + 1], "model-00002-of-00002.safetensors": keys[cut + 1:]}
    for name, ks in shards.items():
        save_file({k: t[k] for k in ks}, str(out / name), metadata={"format": "pt"})
    (out / "model.safetensors").unlink()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        k: name for name, ks in shards.items() for k in ks}}))
    rows = {name: (ok, detail) for name, ok, detail in verify(out, logits=False)}
    assert rows["tensor shapes"][0] is True, rows["tensor shapes"]
    assert not any(n.startswith("read ") for n in rows)
    assert sorted(read_tensors(out)) == keys


def test_a_stray_weight_file_is_flagged_and_not_read(tmp_path, tiny_models, calib_file):
    """A .safetensors left beside the checkpoint's (another checkpoint's, a copy): verify names it, and
    quantc.load does not take its tensors, where an index lists the checkpoint's files, and refuses
    to guess between two copies of a tensor where none does; a dtype other than the GPTQ layout's
    (fp32 scales) fails the shape and dtype check."""
    y = f"model: {tiny_models['llama']}\nquant: {{bits: 4, group_size: 32}}\ncalibration: {{source: {calib_file}, samples: 4, seq_len: 64}}\n"
    assert compile_(tmp_path, y).exit_code == 0
    out = tmp_path / "out"
    from quantc.errors import QuantcError
    from quantc.runtime import read_tensors
    from quantc.verify import verify
    t = load_file(str(out / "model.safetensors"))
    norm = "model.norm.weight"
    save_file({norm: torch.zeros_like(t[norm])}, str(out / "zz-stray.safetensors"), metadata={"format": "pt"})
    rows = {name: (ok, detail) for name, ok, detail in verify(out, logits=False)}
    assert rows["weight files"][0] is False and "zz-stray.safetensors" in rows["weight files"][1]
    with pytest.raises(QuantcError, match=f"tensor {norm} is in both model.safetensors and zz-stray.safetensors"):
        read_tensors(out)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        k: "model.safetensors" for k in t}}))
    assert torch.equal(read_tensors(out)[norm], t[norm])       # the index names the checkpoint's file
    index = json.loads((out / "model.safetensors.index.json").read_text())
    (out / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": {
        **index["weight_map"], norm: "model-lost.safetensors"}}))
    rows = {name: (ok, detail) for name, ok, detail in verify(out, logits=False)}   # reported, not raised
    assert rows["weight index"][0] is False and "model-lost.safetensors" in rows["weight index"][1]
    (out / "zz-stray.safetensors").unlink()
    (out / "model.safetensors.index.json").unlink()
    assert all(ok for _, ok, _ in verify(out, logits=False))
    t["model.layers.0.mlp.down_proj.scales"] = t["model.layers.0.mlp.down_proj.scales"].float()
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    rows = {name: (ok, detail) for name, ok, detail in verify(out, logits=False)}
    assert rows["tensor shapes"] == (False, "model.layers.0.mlp.down_proj.scales: dtype F32, expected F16")


def test_memory_estimate_refuses_what_cannot_fit(tmp_path, tiny_models, calib_file):
    from quantc.config import parse_config
    from quantc.pipeline import memory_estimate
    small = memory_estimate(parse_config({"model": str(tiny_models["llama"])}))
    assert small["weights"] > 0 and small["total"] > small["weights"]
    r = compile_(tmp_path, f"model: {tiny_models['llama']}\ncalibration: {{source: {calib_file}, samples: 10000000, seq_len: 4096}}\n")
    check(r, "the compile needs about", "GiB is available", "lower calibration.samples")


def test_memory_refusal_names_the_largest_term_and_its_fix_and_covers_quantc_plan(tmp_path, tiny_models, calib_file,
                                                                                 monkeypatch):
    """The plan's measurement is sweep 1 of the compile it plans: `quantc plan` is refused before any
    work, like the compile. The message says which term is too big and which key shrinks it."""
    import quantc.memory
    from quantc.config import load_config
    from quantc.memory import memory_estimate
    model = tiny_models["llama"]
    budget = "budget: {avg_bits: 4}\ncandidates: [{bits: 3}, {bits: 4}]\n"
    self_sampled = write_yaml(tmp_path / "self.yaml", f"model: {model}\ncalibration: {{samples: 1, seq_len: 8}}\n{budget}")
    real = quantc.memory.memory_estimate

    def big_model(cfg, *a, **k):             # the tiny model's weights as a 7B model's: the largest term
        e = real(cfg, *a, **k)
        return {**e, "weights": e["weights"] * 10**5, "total": e["total"] + e["weights"] * (10**5 - 1)}
    monkeypatch.setattr(quantc.memory, "memory_estimate", big_model)
    est = big_model(load_config(self_sampled))
    monkeypatch.setattr(quantc.memory, "available_memory", lambda: est["total"] // 2)
    r = CliRunner().invoke(main, ["plan", str(self_sampled), "-o", str(tmp_path / "p")])
    check(r, "self.yaml: the compile needs about", "self-sampling holds the whole model",
          "calibration.source: data.jsonl")
    assert not (tmp_path / "p").exists()

    many = write_yaml(tmp_path / "many.yaml",
                      f"model: {model}\ncalibration: {{source: {calib_file}, samples: 4096, seq_len: 512}}\n{budget}")
    monkeypatch.setattr(quantc.memory, "memory_estimate", real)
    est = memory_estimate(load_config(many))
    assert est["activations"] > max(est["weights"], est["layer"])
    monkeypatch.setattr(quantc.memory, "available_memory", lambda: est["total"] // 2)
    r = CliRunner().invoke(main, ["plan", str(many), "-o", str(tmp_path / "p")])
    check(r, "many.yaml: the compile needs about", "set resources.offload_activations: true", "lower calibration.samples")
    assert not (tmp_path / "p").exists()


def test_failed_compile_leaves_nothing_behind(tmp_path, tiny_models):
    """No empty `.out.partial/` and no parent folders created for the output remain after a failure."""
    m = copy_model(tiny_models["llama"], tmp_path / "m")
    t = load_file(str(m / "model.safetensors"))
    t["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")       # found after the output is prepared
    save_file(t, str(m / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "new" / "deeper" / "out"
    check(compile_(tmp_path, f"model: {m}\nquant: {{method: rtn, group_size: 32}}\n", out), "contains NaN or Inf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "m"]


def test_force_replaces_only_an_earlier_output(tmp_path, tiny_models):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.tex").write_text("years of work")
    r = compile_(tmp_path, f"model: {tiny_models['llama']}\nquant: {{method: rtn, group_size: 32}}\n",
                 tmp_path / "docs", "--force")
    check(r, "is not an output of quantc (no quantc.json)", "remove the folder yourself")
    assert (tmp_path / "docs" / "thesis.tex").read_text() == "years of work"


# ------------------------------------------------------------------------ found before any heavy work

@pytest.fixture()
def no_heavy_work(monkeypatch):
    """Loading the weights or measuring fails the test: the error must come before either."""
    import quantc.model
    import quantc.planning

    def heavy(*a, **k):
        raise AssertionError("heavy work started before the error")
    monkeypatch.setattr(quantc.model, "load_model", heavy)
    monkeypatch.setattr(quantc.planning, "get_measurements", heavy)


@pytest.mark.parametrize("extra,fragments", [
    ("overrides: [{match: 'down_porj', bits: 8}]",
     ["`overrides[0].match`: 'down_porj' matches no decoder linear", "model.layers.0.self_attn.q_proj"]),
    ("keep_fp16: [lm_head, 'embed_tokns']", ["`keep_fp16[1]`: 'embed_tokns' matches no module of the model"]),
    ("overrides: [{match: mlp, bits: 8}, {match: 'mlp\\.down_proj', bits: 2}]",
     ["`overrides[1].match`", "has no effect", "already decided by overrides[0] (the first match wins)"]),
    ("keep_fp16: [lm_head, up_proj]\noverrides: [{match: 'up_proj', skip: true}]",
     ["`overrides[0].match`", "already decided by keep_fp16"]),
])
def test_pattern_that_matches_nothing_is_an_error(tmp_path, tiny_models, no_heavy_work, extra, fragments):
    check(compile_(tmp_path, f"model: {tiny_models['llama']}\nquant: {{method: rtn, group_size: 32}}\n{extra}\n"),
          *fragments)


BUDGET_YAML = "model: {m}\nbudget: {{{b}}}\nquant: {{bits: {bits}, group_size: 32}}\n{extra}" \
              "calibration: {{source: {c}, samples: 8, seq_len: 64}}\n"


@pytest.mark.parametrize("budget,bits,extra,fragments,absent", [
    # 2-bit is already a candidate: no "add lower-bit candidates"; nothing but a larger budget reaches 1.5
    ("avg_bits: 1.5", "[2, 4]", "", ["`budget.avg_bits`: the budget of 13,824 bytes (0.01 MiB, 1.50 bits/weight) is "
                                     "infeasible", "smallest achievable size is 27,712 bytes (0.03 MiB, 3.01 bits/weight)",
                                     "every unit at 2b-g32-sym, the lowest candidate already",
                                     "raise the budget to at least 27,712 bytes (3.01 bits/weight)",
                                     "nothing else reaches it"], ["add 2-bit", "lower-bit", "group_size"]),
    # a larger group size would fit: said, with the size it gives
    ("avg_bits: 2.9", "[2, 4]", "", ["add group_size 64 (fewer scales): smallest size then 2.73 bits/weight"],
     ["add 2-bit", "drop"]),
    # in bytes; 2-bit would fit (3-bit would not: not offered)
    ("memory: 30000", "[4, 8]", "", ["`budget.memory`: the budget of 30,000 bytes", "add 2-bit to quant.bits"],
     ["add 3-bit"]),
    # an override pins part of a unit: only removing it together with 2-bit reaches the budget
    ("avg_bits: 3.9", "[4, 8]", "overrides: [{match: q_proj, bits: 8}]\n",
     ["fixed by overrides[0]", "together, add 2-bit to quant.bits and drop overrides[0]"], []),
])
def test_infeasible_budget_from_shapes_before_any_measurement(tmp_path, tiny_models, calib_file, no_heavy_work,
                                                             budget, bits, extra, fragments, absent):
    y = BUDGET_YAML.format(m=tiny_models["llama"], b=budget, bits=bits, extra=extra, c=calib_file)
    r = compile_(tmp_path, y)
    check(r, *fragments)
    for a in absent:
        assert a not in r.output, (a, r.output)
    assert len(r.output.strip().splitlines()) == 1
    r2 = CliRunner().invoke(main, ["plan", str(tmp_path / "bad.yaml"), "-o", str(tmp_path / "p")])
    check(r2, *fragments)
    assert not (tmp_path / "p").exists()


def test_command_line_budget_is_named_and_checked(tmp_path, tiny_models, calib_file, no_heavy_work):
    y = write_yaml(tmp_path / "b.yaml", BUDGET_YAML.format(m=tiny_models["llama"], b="avg_bits: 4", bits="[2, 4]",
                                                           extra="", c=calib_file))
    plan = ["plan", str(y), "-o", str(tmp_path / "p")]
    check(CliRunner().invoke(main, plan + ["--avg-bits", "1"]), "error: `--avg-bits`: the budget of", "infeasible")
    check(CliRunner().invoke(main, plan + ["--memory", "1KiB"]), "error: `--memory`: the budget of 1,024 bytes")
    check(CliRunner().invoke(main, plan + ["--avg-bits", "3", "--memory", "1MiB"]), "give one of --avg-bits or --memory")
    check(CliRunner().invoke(main, plan + ["--avg-bits", "-2"]), "--avg-bits must be in (0, 16]")


def test_budget_above_the_largest_size_warns(tiny_models, caplog):
    from quantc.config import parse_config
    from quantc.planning import check_budget, shape_units
    from quantc.preflight import skeleton
    cfg = parse_config({"model": str(tiny_models["llama"]), "budget": {"avg_bits": 12},
                        "quant": {"bits": [2, 4], "group_size": 32}})
    units = shape_units(skeleton(cfg), cfg)
    with caplog.at_level("WARNING", logger="quantc"):
        check_budget(units, cfg)
    assert "is more than the largest achievable size 46,720 bytes (0.04 MiB, 5.07 bits/weight)" in caplog.text
    assert "every unit at 4b-g32-sym" in caplog.text and "add 8-bit" in caplog.text


def pickled(src, dst, extra=None):
    m = copy_model(src, dst)
    state = load_file(str(m / "model.safetensors"))
    state.update(extra or {})
    torch.save(state, m / "pytorch_model.bin")
    (m / "model.safetensors").unlink()
    return m


class _RunsCode:
    def __reduce__(self):
        import os
        return os.getpid, ()           # harmless, but not a tensor: a "malicious" pickle


def test_pickled_weights_are_refused_unless_allowed(tmp_path, tiny_models, no_heavy_work):
    m = pickled(tiny_models["llama"], tmp_path / "m")
    r = compile_(tmp_path, f"model: {m}\nquant: {{method: rtn, group_size: 32}}\n")
    check(r, "the weights are pickled (pytorch_model.bin) and quantc does not unpickle by default",
          "save_pretrained", "allow_pickle: true")


def test_pickled_weights_with_allow_pickle(tmp_path, tiny_models):
    m = pickled(tiny_models["llama"], tmp_path / "m")
    r = compile_(tmp_path, f"model: {{path: {m}, allow_pickle: true}}\nquant: {{method: rtn, group_size: 32}}\n")
    assert r.exit_code == 0, r.output
    m2 = pickled(tiny_models["llama"], tmp_path / "evil", {"extra": _RunsCode()})
    r = compile_(tmp_path, f"model: {{path: {m2}, allow_pickle: true}}\nquant: {{method: rtn, group_size: 32}}\n",
                 tmp_path / "out2")
    check(r, "refused the pickled weights", "GLOBAL posix.getpid", "could run code")
    assert "weights_only" not in r.output and "complete" not in r.output


@pytest.mark.parametrize("name,content,fragment", [
    ("empty.txt", "", "empty.txt: the calibration file is empty"),
    ("blank.txt", "\n  \n", "blank.txt: the calibration file is empty"),
    ("latin1.txt", "café ".encode("latin-1") * 50, "latin1.txt: not a UTF-8 text file"),
    ("short.txt", "too short", "shorter than one sequence of 64"),
    ("nojson.jsonl", '{"text": "a"}\nnot json\n', "nojson.jsonl:2: not valid JSON"),
    ("notext.jsonl", '{"text": "a"}\n{"body": "b"}\n', "notext.jsonl:2: no string field 'text' (it has 'body')"),
    ("array.jsonl", '[{"text": "a"}]\n', "array.jsonl:1: a JSON array; quantc reads JSON Lines"),
    ("empty.jsonl", "\n", "empty.jsonl: the calibration file has no text"),
    ("late.jsonl", '{"text": "ok"}\n' * 300 + "{broken\n", "late.jsonl:301: not valid JSON"),
])
def test_calibration_problems_before_the_model_loads(tmp_path, tiny_models, no_heavy_work, name, content, fragment):
    p = tmp_path / name
    p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)
    check(compile_(tmp_path, f"model: {tiny_models['llama']}\ncalibration: {{source: {p}, seq_len: 64}}\n"), fragment)


def test_plan_file_checked_before_the_model_loads(tmp_path, tiny_models, no_heavy_work):
    y = f"model: {tiny_models['llama']}\nquant: {{method: rtn, group_size: 32}}\n"
    for text, fragment in [
        ("units:\n  0.down: {bits: 4}\n  0.down: {bits: 2}\n", "`units.0.down`: given twice (lines 2 and 3)"),
        ("units:\n  0.down: {bits: 4, bit: 2}\n", "`units.0.down.bit`: unknown key"),
        ("units:\n  0.down: {bits: '2'}\n", "`units.0.down.bits`: '2' is a string, not a number"),
        ("units:\n  9.down: {bits: 2}\n", "the plan does not match the model"),
    ]:
        (tmp_path / "plan.yaml").write_text(text)
        check(compile_(tmp_path, y, None, "--plan", str(tmp_path / "plan.yaml")), fragment)
    check(compile_(tmp_path, y, None, "--plan", str(tmp_path / "nope.yaml")), "nope.yaml: plan file not found")


def test_missing_onnx_package_found_before_the_compile(tmp_path, tiny_models, no_heavy_work, monkeypatch):
    import importlib.util
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "onnx" else find(n, *a))
    check(compile_(tmp_path, f"model: {tiny_models['llama']}\nquant: {{method: rtn, group_size: 32}}\n"
                             "export: {targets: [gptq, onnx]}\n"), "`export.targets`: onnx needs the `onnx` package")


def test_output_must_not_hold_an_input(tmp_path, tiny_models, no_heavy_work):
    prev = tmp_path / "prev"                      # an earlier output that now also holds the calibration text
    prev.mkdir()
    (prev / "quantc.json").write_text("{}")
    (prev / "calib.txt").write_text("x " * 500)
    r = compile_(tmp_path, f"model: {tiny_models['llama']}\ncalibration: {{source: {prev / 'calib.txt'}}}\n",
                 prev, "--force")
    check(r, "holds the calibration file", "choose another -o")
    assert (prev / "calib.txt").is_file()


# ------------------------------------------------------------------------------------- other verbs

@pytest.fixture()
def artifact(tmp_path, tiny_models):
    """A compiled tiny model whose source folder has been deleted since."""
    src = copy_model(tiny_models["llama"], tmp_path / "src")
    r = compile_(tmp_path, f"model: {src}\nquant: {{method: rtn, group_size: 32}}\n", tmp_path / "art")
    assert r.exit_code == 0, r.output
    shutil.rmtree(src)
    return tmp_path / "art"


def test_verify_says_skipped_and_strict_fails_on_it(artifact):
    from quantc.verify import verify
    rows = {name: (ok, detail) for name, ok, detail in verify(artifact)}
    assert rows["logits vs source"][0] is None and rows["logits vs source"][1].startswith("skipped: source model")
    r = CliRunner().invoke(main, ["verify", str(artifact)])
    assert r.exit_code == 0 and "skipped" in r.output and "note: logits vs source skipped" in r.output, r.output
    check(CliRunner().invoke(main, ["verify", str(artifact), "--strict"]),
          "not verified: logits vs source skipped (--strict)", code=1)


def test_truncated_manifest_is_a_failed_check_not_a_traceback(artifact, calib_file):
    from quantc.verify import verify
    man = artifact / "quantc.json"
    man.write_text(man.read_text()[:200])
    rows = {name: (ok, detail) for name, ok, detail in verify(artifact)}
    assert rows["manifest"][0] is False and "quantc.json is not valid JSON, truncated or corrupt" in rows["manifest"][1]
    assert rows["tensor shapes"][0] is True                  # the other checks still run
    check(CliRunner().invoke(main, ["verify", str(artifact)]), "failed verification", code=1)
    for cmd in (["inspect", str(artifact)], ["eval", str(artifact), "--text", str(calib_file), "--seq-len", "64"]):
        check(CliRunner().invoke(main, cmd), "quantc.json is not valid JSON, truncated or corrupt",
              f"run `quantc verify {artifact}`")


def test_other_verbs_refuse_bad_arguments_in_one_line(artifact, tmp_path, calib_file):
    check(CliRunner().invoke(main, ["generate", str(artifact), "-p", " "]), "the prompt is empty")
    for cmd in (["generate", str(artifact), "-p", "x", "-n", "0"],
                ["eval", str(artifact), "--text", str(calib_file), "--seq-len", "0"],
                ["eval", str(artifact), "--text", str(calib_file), "--windows", "-1"]):
        r = CliRunner().invoke(main, cmd)
        assert r.exit_code == 2 and "Traceback" not in r.output and "Invalid value" in r.output, r.output
    (tmp_path / "latin1.txt").write_bytes("café ".encode("latin-1") * 300)
    check(CliRunner().invoke(main, ["eval", str(artifact), "--text", str(tmp_path / "latin1.txt"), "--no-kl"]),
          "latin1.txt: not a UTF-8 text file")


def test_failed_onnx_export_leaves_nothing(artifact, monkeypatch):
    import onnx

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(onnx, "save_model", disk_full)
    r = CliRunner().invoke(main, ["export", "onnx", str(artifact)])
    check(r, "error: No space left on device", code=1)
    assert sorted(p.name for p in artifact.iterdir() if p.name.startswith(".")) == []
    assert not (artifact / "onnx").exists()


def test_not_enough_disk_space_found_before_the_compile(tmp_path, tiny_models, no_heavy_work, monkeypatch):
    import shutil as sh
    import quantc.preflight
    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    check(compile_(tmp_path, f"model: {tiny_models['llama']}\nquant: {{method: rtn, group_size: 32}}\n"),
          "has 0.00 GiB free, but the output needs at least", "choose another -o")
    assert quantc.preflight.check_disk and not (tmp_path / ".out.partial").exists()


def test_late_writes_are_checked_first(tmp_path, tiny_models, artifact, calib_file, no_heavy_work):
    """Files written after long work (the plan folder, eval --json) are checked before it (/proc: unwritable)."""
    y = write_yaml(tmp_path / "b.yaml", BUDGET_YAML.format(m=tiny_models["llama"], b="avg_bits: 4", bits="[2, 4]",
                                                           extra="", c=calib_file))
    check(CliRunner().invoke(main, ["plan", str(y), "-o", "/proc/quantc-plan"]), "the plan folder cannot be written")
    check(CliRunner().invoke(main, ["eval", str(artifact), "--text", str(calib_file), "--no-kl", "--json",
                                    "/proc/quantc-r.json"]), "the --json file cannot be written")


def test_eval_options_without_effect(artifact, calib_file, tmp_path):
    base = ["eval", str(artifact), "--text", str(calib_file)]
    check(CliRunner().invoke(main, base + ["--no-kl", "--reference", str(artifact)]), "--reference has no effect")
    check(CliRunner().invoke(main, base + ["--reference", str(tmp_path / "nope")]), "no such folder")


def test_unexpected_errors_are_one_line_unless_verbose(tmp_path, tiny_models, monkeypatch):
    import quantc.preflight

    def bug(*a, **k):
        raise RuntimeError("boom\nsecond line")
    monkeypatch.setattr(quantc.preflight, "check_patterns", bug)
    y = f"model: {tiny_models['llama']}\nquant: {{method: rtn, group_size: 32}}\n"
    r = compile_(tmp_path, y)
    check(r, "error: unexpected RuntimeError: boom (a bug in quantc: run with -v for the traceback", code=1)
    assert "second line" not in r.output and not (tmp_path / ".out.partial").exists()
    r = CliRunner().invoke(main, ["-v", "compile", str(tmp_path / "bad.yaml"), "-o", str(tmp_path / "out")])
    assert isinstance(r.exception, RuntimeError)


def test_a_mistyped_local_folder_read_as_a_hub_id_says_so(tmp_path, monkeypatch):
    """`model: modles/x` looks like a hub id (org/name), so config.py takes it for one; when the hub has
    no such model the error names the missing local folder and the key to check."""
    import huggingface_hub.constants as hub
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)       # fail at once, whatever the network (read at import,
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")              # so the module's constant, and the variable for later
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))   # readers)
    r = compile_(tmp_path, "model: modles/smollm2-135m-instruct\n")
    check(r, "modles/smollm2-135m-instruct: cannot read the model config", "read as a Hugging Face hub id",
          "if you meant a local folder, check `model`")


def test_a_gguf_folder_without_gguf_file_names_the_key(tmp_path, tiny_models):
    m = tmp_path / "m"
    m.mkdir()
    shutil.copy(tiny_models["llama"] / "config.json", m / "config.json")
    (m / "tiny.Q4_0.gguf").write_bytes(b"GGUF")
    r = compile_(tmp_path, f"model: {m}\n")
    check(r, "no weight files (*.safetensors)", "set model.gguf_file: tiny.Q4_0.gguf")
