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


def test_memory_estimate_refuses_what_cannot_fit(tmp_path, tiny_models, calib_file):
    from quantc.config import parse_config
    from quantc.pipeline import memory_estimate
    small = memory_estimate(parse_config({"model": str(tiny_models["llama"])}))
    assert small["weights"] > 0 and small["total"] > small["weights"]
    r = compile_(tmp_path, f"model: {tiny_models['llama']}\ncalibration: {{source: {calib_file}, samples: 10000000, seq_len: 4096}}\n")
    check(r, "the compile needs about", "GiB is available", "lower calibration.samples")


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
