"""quantc checkpoints load in GPTQModel 7.6.0 (BACKEND.TORCH, fp16) and in transformers + optimum,
and give the same logits as quantc.load."""
import os

import pytest
import torch

import quantc
from quantc.config import parse_config
from quantc.pipeline import compile_model

from conftest import corpus

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
gptqmodel = pytest.importorskip("gptqmodel", reason="gptqmodel==7.6.0 is not installed (pip install -e '.[gptq]')")
pytestmark = pytest.mark.interop


def _compile(tmp_path, model, calib, name, **extra):
    raw = {"model": str(model), "quant": {"bits": 4, "group_size": 32},
           "calibration": {"source": str(calib), "samples": 8, "seq_len": 64}, **extra}
    out = tmp_path / name
    compile_model(parse_config(raw), out, progress=False)
    return out


def _ids(folder):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    return torch.tensor(tok(corpus(800, seed=7))["input_ids"][: 2 * 48]).reshape(2, 48)


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("mixed", [False, True], ids=["uniform4", "mixed2348"])
def test_gptqmodel_loads_same_logits(tmp_path, tiny_models, calib_file, mixed):
    from gptqmodel import BACKEND, GPTQModel
    extra = {}
    if mixed:
        extra = {"quant": {"bits": 4, "group_size": 32, "act_order": True, "static_groups": False},
                 "overrides": [{"match": r"layers\.1\.mlp\.", "bits": 8},
                               {"match": r"layers\.0\.mlp\.down", "bits": 3, "group_size": 64},
                               {"match": r"layers\.1\.self_attn\.(q|k|v)_proj", "bits": 2, "sym": False}]}
    out = _compile(tmp_path, tiny_models["qwen2"], calib_file, "ck", **extra)
    g = GPTQModel.load(str(out), backend=BACKEND.TORCH, device="cpu", dtype=torch.float16)
    q = quantc.load(out)
    if mixed:
        bits = {n: m.bits for n, m in g.model.named_modules() if hasattr(m, "qweight")}
        assert bits["model.layers.1.mlp.up_proj"] == 8 and bits["model.layers.0.mlp.down_proj"] == 3
        assert bits["model.layers.1.self_attn.k_proj"] == 2 and bits["model.layers.0.self_attn.o_proj"] == 4
    ids = _ids(out)
    with torch.no_grad():
        lg, lq = g.model(input_ids=ids).logits, q(input_ids=ids).logits
    assert _rel(lg, lq) < 0.01            # fp16 (GPTQModel) against fp32 (quantc): rounding only


def test_transformers_from_pretrained_uniform(tmp_path, tiny_models, calib_file):
    pytest.importorskip("optimum", reason="optimum is not installed (pip install -e '.[gptq]')")
    from transformers import AutoModelForCausalLM
    out = _compile(tmp_path, tiny_models["llama"], calib_file, "u4")
    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16, device_map="cpu")
    assert hasattr(m.model.layers[0].self_attn.q_proj, "qweight")
    ids = _ids(out)
    with torch.no_grad():
        lt, lq = m(input_ids=ids).logits, quantc.load(out)(input_ids=ids).logits
    assert _rel(lt, lq) < 0.02


def test_vllm_served_hard_case_read_alike_by_vllm_rules_and_gptqmodel(tmp_path, tiny_tokenizer, calib_file):
    """serve: [vllm] with the hard cases (o_proj with q/k/v, down with gate/up, whole sub-modules kept
    in 16-bit): vLLM's matching rules (fused and unfused names) and GPTQModel's own parser give every
    module what quantc wrote, and GPTQModel builds its modules with those bits and group sizes."""
    import json
    from gptqmodel import BACKEND, GPTQModel
    from conftest import build_tiny
    from vllm_replay import expected_from_manifest, replay_gptqmodel, replay_vllm
    model = build_tiny("llama", tmp_path / "m4", tiny_tokenizer, layers=4)
    extra = {"serve": ["vllm"], "quant": {"bits": 4, "group_size": 32, "method": "rtn"},
             "keep_fp16": ["lm_head", "embed_tokens", r"layers\.3\.mlp\.(gate|up)_proj"],
             "overrides": [{"match": r"layers\.0\.self_attn\.", "bits": 8},
                           {"match": r"layers\.1\.mlp\.", "bits": 8, "group_size": 64},
                           {"match": r"layers\.2\.(self_attn\.[qkv]_proj|mlp\.down_proj)", "bits": 8},
                           {"match": r"layers\.3\.self_attn\.", "skip": True}]}
    out = _compile(tmp_path, model, calib_file, "hard", **extra)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert r"+:^model\.layers\.0\.self_attn\.(q_proj|k_proj|v_proj|o_proj|qkv_proj)$" in qc["dynamic"]
    assert r"+:^model\.layers\.1\.mlp\.(gate_proj|up_proj|down_proj|gate_up_proj)$" in qc["dynamic"]
    assert r"-:^model\.layers\.3\.self_attn\.(q_proj|k_proj|v_proj|o_proj|qkv_proj)$" in qc["dynamic"]
    expected = expected_from_manifest(json.loads((out / "quantc.json").read_text()))
    assert len(expected) == 7 * 4 and sum(v is None for v in expected.values()) == 6
    got = replay_vllm(qc, expected, marlin=True)
    assert got["model.layers.1.mlp.down_proj"] == got["model.layers.1.mlp.gate_up_proj"] == \
        {"bits": 8, "group_size": 64, "sym": True, "desc_act": False}
    replay_gptqmodel(qc, expected)
    g = GPTQModel.load(str(out), backend=BACKEND.TORCH, device="cpu", dtype=torch.float16)
    mods = dict(g.model.named_modules())
    for name, exp in expected.items():
        m = mods[name]
        if exp is None:
            assert not hasattr(m, "qweight"), name
        else:
            assert (m.bits, m.group_size) == (exp["bits"], exp["group_size"]), name
    ids = _ids(out)
    with torch.no_grad():
        lg, lq = g.model(input_ids=ids).logits, quantc.load(out)(input_ids=ids).logits
    assert _rel(lg, lq) < 0.01
