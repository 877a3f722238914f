"""On the real SmolLM2-135M from ../shared (QUANTC_TEST_MODEL overrides): a short compile through the
CLI, loaded back with quantc.load. Reduced calibration/evaluation; the full protocol is in benchmarks/."""
import json

import pytest
import torch
from click.testing import CliRunner

import quantc
from quantc.cli import main
from quantc.evaluate import eval_tokens, evaluate
from quantc.model import load_model, load_tokenizer

from conftest import SHARED, write_yaml

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(smollm2, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real")
    tok = load_tokenizer(str(smollm2))
    text = "\n\n".join(l for l in (SHARED / "data" / "wikitext-2-raw-test.txt").read_text().splitlines() if l.strip())
    return smollm2, tmp, eval_tokens(text, tok, 256, 6)


def compile_(model, tmp, name, quant):
    y = write_yaml(tmp / f"{name}.yaml", f"""model: {model}
quant: {quant}
calibration: {{source: {SHARED / 'data' / 'c4-validation-1k.jsonl'}, samples: 12, seq_len: 256}}
""")
    r = CliRunner().invoke(main, ["-q", "compile", str(y), "-o", str(tmp / name)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    return tmp / name


def test_gptq_beats_rtn_on_smollm2(setup):
    model, tmp, tokens = setup
    fp = evaluate(load_model(str(model)), tokens, progress=False)["ppl"]
    ppl = {}
    for name, quant in (("rtn", "{bits: 4, group_size: 128, method: rtn, mse: false}"),
                        ("gptq", "{bits: 4, group_size: 128, mse: false}")):
        out = compile_(model, tmp, name, quant)
        q = quantc.load(out)
        assert sum(type(m).__name__ == "QuantLinear" for m in q.modules()) == 210
        ppl[name] = evaluate(q, tokens, progress=False)["ppl"]
    m = json.loads((tmp / "gptq" / "quantc.json").read_text())
    assert abs(m["totals"]["avg_bits"] - 4.0) < 0.3
    assert fp < ppl["gptq"] < ppl["rtn"], (fp, ppl)
    assert ppl["gptq"] < 1.8 * fp, (fp, ppl)


def test_generate_and_inspect(setup):
    model, tmp, _ = setup
    out = tmp / "gptq"
    if not out.exists():
        out = compile_(model, tmp, "gptq", "{bits: 4, group_size: 128, mse: false}")
    q = quantc.load(out)
    tok = load_tokenizer(str(out))
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    gen = q.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)   # 8 even past an end token
    assert gen.shape[1] == ids.shape[1] + 8
    r = CliRunner().invoke(main, ["inspect", str(out)])
    assert r.exit_code == 0 and "210" in r.output


def test_onnx_parity_mixed_248_on_smollm2(setup):
    """A mixed 2/4/8-bit SmolLM2 checkpoint in ONNX Runtime: the torch runtime's logits and greedy tokens."""
    pytest.importorskip("onnxruntime")
    import numpy as np
    from quantc.ort import OrtModel, generate_torch
    model, tmp, tokens = setup
    y = write_yaml(tmp / "mixed.yaml", f"""model: {model}
quant: {{bits: 4, group_size: 128, method: rtn, mse: false}}
overrides:
  - {{match: 'layers\\.[0-9]\\.self_attn\\.(q|k|v)_proj', bits: 2, sym: false}}
  - {{match: 'mlp\\.down_proj', bits: 8}}
export: {{targets: [gptq, onnx]}}
""")
    r = CliRunner().invoke(main, ["-q", "compile", str(y), "-o", str(tmp / "mixed")])
    assert r.exit_code == 0, r.output + repr(r.exception)
    info = json.loads((tmp / "mixed" / "onnx" / "onnx_export.json").read_text())
    assert {m["bits"] for m in info["matmulnbits"].values()} == {2, 4, 8} and len(info["matmulnbits"]) == 210
    q = quantc.load(tmp / "mixed")
    om = OrtModel(tmp / "mixed")
    ids = tokens[:1].numpy()
    lo, _ = om.forward(ids)
    with torch.no_grad():
        lt = q(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(lo - lt).max() / np.abs(lt).max() < 1e-4
    prompt = load_tokenizer(str(model))("The history of the city begins", add_special_tokens=False)["input_ids"]
    assert om.generate(prompt, 32) == generate_torch(q, prompt, 32)
