"""A compile killed with SIGKILL mid-way resumes from its last finished layer to an identical artifact."""
import json
import os
import subprocess
import sys

import pytest

from conftest import build_tiny, write_yaml


@pytest.mark.parametrize("qep", [0.0, 0.5])
def test_sigkill_then_resume_is_bit_identical(tmp_path, tiny_tokenizer, calib_file, qep):
    model = build_tiny("llama", tmp_path / "m4", tiny_tokenizer, layers=4, seed=3)
    y = write_yaml(tmp_path / "b.yaml", f"""model: {model}
quant: {{bits: 3, group_size: 32, qep_alpha: {qep}}}
calibration: {{source: {calib_file}, samples: 8, seq_len: 64}}
""")
    cmd = [sys.executable, "-m", "quantc.cli", "-q", "compile", str(y)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run(cmd + ["-o", str(tmp_path / "a")], check=True, env=env, capture_output=True)

    r = subprocess.run(cmd + ["-o", str(tmp_path / "b")], env={**env, "QUANTC_FAULT_AFTER_LAYER": "1"},
                       capture_output=True, text=True)
    assert r.returncode == -9                                  # killed, no cleanup ran
    state = json.loads((tmp_path / ".b.partial" / "resume" / "state.json").read_text())
    assert state["next_layer"] == 2
    assert not (tmp_path / "b").exists()                       # nothing half-written in place

    r = subprocess.run(cmd + ["-o", str(tmp_path / "b")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming after decoder layer 1" in r.stderr
    for f in ("model.safetensors", "config.json", "quantize_config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert not (tmp_path / ".b.partial").exists()


def test_changed_config_does_not_resume(tmp_path, tiny_tokenizer, calib_file):
    model = build_tiny("llama", tmp_path / "m3", tiny_tokenizer, layers=3, seed=4)
    base = f"model: {model}\ncalibration: {{source: {calib_file}, samples: 4, seq_len: 64}}\n"
    cmd = [sys.executable, "-m", "quantc.cli", "-q", "compile"]
    y1 = write_yaml(tmp_path / "b1.yaml", base + "quant: {bits: 4, group_size: 32}\n")
    r = subprocess.run(cmd + [str(y1), "-o", str(tmp_path / "o")], capture_output=True, text=True,
                       env={**os.environ, "QUANTC_FAULT_AFTER_LAYER": "0"})
    assert r.returncode == -9
    y2 = write_yaml(tmp_path / "b2.yaml", base + "quant: {bits: 2, group_size: 32}\n")
    r = subprocess.run(cmd + [str(y2), "-o", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 0 and "resuming" not in r.stderr
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["quantization_config"]["bits"] == 2


def test_big_models_are_written_as_shards_with_an_index(tmp_path, tiny_models, calib_file, monkeypatch):
    """Above MAX_SHARD_BYTES the exporter writes whole layers per shard plus an index, as transformers
    does; the tensors and quantc.load's logits equal the single-file artifact's."""
    import torch
    from safetensors.torch import load_file

    import quantc
    import quantc.export.gptq as eg
    from quantc.config import parse_config
    from quantc.pipeline import compile_model
    raw = {"model": str(tiny_models["qwen2"]), "quant": {"bits": 4, "group_size": 32},
           "calibration": {"source": str(calib_file), "samples": 4, "seq_len": 32}}
    one = compile_model(parse_config(raw), tmp_path / "one", progress=False)
    monkeypatch.setattr(eg, "MAX_SHARD_BYTES", 40_000)
    many = compile_model(parse_config(raw), tmp_path / "many", progress=False)
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and not (tmp_path / "many" / "model.safetensors").exists()
    assert set(many["files"]) >= set(shards) | {"model.safetensors.index.json"}
    merged = {}
    for s in shards:
        merged.update(load_file(str(tmp_path / "many" / s)))
    ref = load_file(str(tmp_path / "one" / "model.safetensors"))
    assert merged.keys() == ref.keys() == index["weight_map"].keys()
    assert all(torch.equal(merged[k], ref[k]) for k in ref)
    assert one["totals"] == many["totals"]
    ids = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(quantc.load(tmp_path / "one")(input_ids=ids).logits,
                           quantc.load(tmp_path / "many")(input_ids=ids).logits)
