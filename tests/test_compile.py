"""End to end on tiny random models: compile through the CLI, load with quantc.load, evaluate."""
import json

import pytest
import torch
from click.testing import CliRunner

import quantc
from quantc.cli import main
from quantc.packing import dequantize_gptq

from conftest import write_yaml


def budget(tmp_path, model, extra=""):
    return write_yaml(tmp_path / "budget.yaml", f"model: {model}\n{extra}")


def compile_cli(yaml_path, out, *args):
    r = CliRunner().invoke(main, ["-q", "compile", str(yaml_path), "-o", str(out), *args])
    assert r.exit_code == 0, r.output + repr(r.exception)
    return json.loads((out / "quantc.json").read_text())


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
def test_compile_gptq_each_architecture(tmp_path, tiny_models, calib_file, kind):
    from transformers import AutoModelForCausalLM
    y = budget(tmp_path, tiny_models[kind], f"""
quant: {{bits: 4, group_size: 32, sym: true}}
calibration: {{source: {calib_file}, samples: 8, seq_len: 64, batch_size: 4}}
""")
    out = tmp_path / "out"
    m = compile_cli(y, out)
    assert m["totals"]["modules"] == 7 * 2
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "quantize_config.json", "quantc.json", "tokenizer.json"} <= files
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["quant_method"], qc["checkpoint_format"]) == \
        (4, 32, True, "gptq", "gptq")
    assert qc["meta"]["quantizer"][0].startswith("quantc:")
    assert "dynamic" not in qc
    assert not (tmp_path / ".out.partial").exists()

    q = quantc.load(out)
    ref = AutoModelForCausalLM.from_pretrained(tiny_models[kind], dtype=torch.float32).eval()
    from transformers import AutoTokenizer
    from conftest import corpus
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor(tok(corpus(800, seed=7))["input_ids"][: 2 * 48]).reshape(2, 48)
    with torch.no_grad():
        lq, lr = q(input_ids=ids).logits, ref(input_ids=ids).logits
    rel = float((lq - lr).norm() / lr.norm())
    assert 0 < rel < 0.3, rel                         # quantized: close to, not equal to, the original
    lin = q.model.layers[0].self_attn.q_proj
    assert type(lin).__name__ == "QuantLinear" and lin.bits == 4
    if kind == "qwen2":
        assert lin.bias is not None and torch.count_nonzero(lin.bias) > 0
    out_ids = q.generate(ids[:1, :8], max_new_tokens=5, do_sample=False)
    assert out_ids.shape == (1, 13)


def test_gptq_closer_than_rtn_end_to_end(tmp_path, tiny_models, calib_file):
    from quantc.evaluate import evaluate
    from transformers import AutoModelForCausalLM
    kl = {}
    for method in ("rtn", "gptq"):
        y = write_yaml(tmp_path / f"{method}.yaml", f"""model: {tiny_models['llama']}
quant: {{bits: 3, group_size: 64, method: {method}}}
calibration: {{source: {calib_file}, samples: 16, seq_len: 64}}
""")
        compile_cli(y, tmp_path / method)
    ref = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    from conftest import corpus
    from transformers import AutoTokenizer
    t = AutoTokenizer.from_pretrained(tiny_models["llama"])
    ids = torch.tensor(t(corpus(800, seed=7))["input_ids"][: 4 * 64]).reshape(4, 64)
    for method in ("rtn", "gptq"):
        kl[method] = evaluate(quantc.load(tmp_path / method), ids, ref, progress=False)["kl"]
    assert kl["gptq"] < kl["rtn"], kl


def test_act_order_and_overrides_write_dynamic(tmp_path, tiny_models, calib_file):
    y = budget(tmp_path, tiny_models["qwen2"], f"""
quant: {{bits: 4, group_size: 32, act_order: true, static_groups: false, sym: false}}
overrides:
  - {{match: 'layers\\.0\\.mlp\\.down_proj', bits: 8}}
  - {{match: 'layers\\.1\\.self_attn\\.(q|k|v)_proj', bits: 2, group_size: 64}}
  - {{match: 'layers\\.1\\.mlp\\.up_proj', skip: true}}
calibration: {{source: {calib_file}, samples: 8, seq_len: 64}}
""")
    out = tmp_path / "out"
    m = compile_cli(y, out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    dyn = qc["dynamic"]
    assert dyn == {
        r"+:^model\.layers\.0\.mlp\.down_proj$": {"bits": 8, "group_size": 32, "sym": False, "desc_act": True},
        r"+:^model\.layers\.1\.self_attn\.(q_proj|k_proj|v_proj|qkv_proj)$":
            {"bits": 2, "group_size": 64, "sym": False, "desc_act": True},
        # up_proj alone: not vLLM's gate_up_proj, whose other member (gate) is quantized; vLLM cannot build
        # that layer either way (serve: [vllm] refuses such a plan), and a fused name would claim both
        r"-:^model\.layers\.1\.mlp\.up_proj$": {},
    }
    assert m["skipped"] == ["model.layers.1.mlp.up_proj"]
    q = quantc.load(out)
    assert q.model.layers[0].mlp.down_proj.bits == 8
    assert q.model.layers[1].self_attn.k_proj.bits == 2
    assert isinstance(q.model.layers[1].mlp.up_proj, torch.nn.Linear)
    # act-order: g_idx is a real permutation of groups, not i // group_size
    g = q.model.layers[0].self_attn.q_proj.g_idx
    assert not torch.equal(g, torch.arange(g.numel(), dtype=torch.int32) // 32)
    w = q.model.layers[0].self_attn.q_proj
    dense = dequantize_gptq(w.qweight, w.qzeros, w.scales, w.g_idx, 4)
    assert torch.equal(dense, w.weight)


def test_existing_output_needs_force(tmp_path, tiny_models, calib_file):
    y = budget(tmp_path, tiny_models["llama"], "quant: {method: rtn, group_size: 32}\n")
    out = tmp_path / "out"
    compile_cli(y, out)
    r = CliRunner().invoke(main, ["-q", "compile", str(y), "-o", str(out)])
    assert r.exit_code == 2 and "--force" in r.output
    compile_cli(y, out, "--force")


def test_eval_and_inspect_cli(tmp_path, tiny_models, calib_file):
    y = budget(tmp_path, tiny_models["llama"], f"""
quant: {{bits: 4, group_size: 32}}
overrides: [{{match: 'layers\\.1\\.', bits: 8}}]
calibration: {{source: {calib_file}, samples: 8, seq_len: 64}}
""")
    out = tmp_path / "out"
    compile_cli(y, out)
    r = CliRunner().invoke(main, ["-q", "eval", str(out), "--text", str(calib_file), "--seq-len", "64",
                                  "--windows", "4", "--json", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["windows"] == 4 and res["ppl"] > 1 and res["kl"] > 0
    # the reference's own loss comes from the same forwards: against itself, KL 0 and the same loss
    import torch
    from quantc.evaluate import evaluate
    from quantc.model import load_model
    ref = load_model(str(tiny_models["llama"]))
    ids = torch.randint(0, ref.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    same = evaluate(ref, ids, ref, progress=False)
    assert abs(same["kl"]) < 1e-6 and same["ref_nll"] == same["nll"]
    assert res["ref_nll"] != res["nll"]
    r = CliRunner().invoke(main, ["inspect", str(out)])
    assert r.exit_code == 0, r.output
    assert "bits per module" in r.output and "quantc" in r.output
    kl = json.loads((out / "quantc.json").read_text())["check"]["kl"]
    assert f"held-out check: KL to the original model {kl:.4f} nats/token" in " ".join(r.output.split())
    lines = [ln for ln in r.output.splitlines() if ln.strip().startswith(("│ 0", "│ 1", "┃ 0", "┃ 1"))]
    assert any(" 8 " in ln for ln in lines) and any(" 4 " in ln for ln in lines)


def test_self_calibration_needs_no_data(tmp_path, tiny_models):
    y = budget(tmp_path, tiny_models["llama"], """
quant: {bits: 4, group_size: 32}
calibration: {source: self, samples: 4, seq_len: 32}
""")
    m = compile_cli(y, tmp_path / "out")
    assert m["config"]["calibration"]["source"] == "self"


def test_true_sequential_replay_matches_full_forward(tiny_models, calib_file):
    """The cached attention/MLP replay must give exactly what a full forward of the quantized layer gives."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from quantc.calibration.data import windows_from_text
    from quantc.model import Activations, capture_layer0_inputs, decoder_layers
    from quantc.options import Option
    from quantc.passes.quantize import quantize_gptq
    from quantc.pipeline import linear_names
    for kind in ("llama", "qwen3"):
        model = AutoModelForCausalLM.from_pretrained(tiny_models[kind], dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(tiny_models[kind])
        ids = windows_from_text(calib_file.read_text(), tok, 6, 32, 0, "c")
        hidden, kw = capture_layer0_inputs(model, ids, 4)
        acts = Activations(hidden, kw, 4)
        seen = {}
        quantize_gptq(model, acts, {n: Option(3, 32) for n in linear_names(model)}, progress=False,
                      on_layer=lambda i, r, xh, xr, chk: seen.__setitem__(i, xh))
        x = acts
        for i, layer in enumerate(decoder_layers(model)):
            x = x.through(layer)                     # plain forward of the quantized layer
            torch.testing.assert_close(seen[i].hidden, x.hidden, rtol=1e-5, atol=1e-5)


def test_qep_without_true_sequential(tiny_models, calib_file):
    """quant.true_sequential: false with qep_alpha > 0 (an AttributeError before): every group's Hessian
    and QEP cross term come from one forward of the original layer, batch by batch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from quantc.calibration.data import windows_from_text
    from quantc.model import Activations, capture_layer0_inputs
    from quantc.options import Option
    from quantc.passes.quantize import quantize_gptq
    from quantc.pipeline import linear_names
    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    ids = windows_from_text(calib_file.read_text(), tok, 6, 32, 0, "c")
    fitted = {}
    for alpha in (0.0, 0.5):
        model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
        hidden, kw = capture_layer0_inputs(model, ids, 4)
        quantize_gptq(model, Activations(hidden, kw, 4), {n: Option(3, 32) for n in linear_names(model)},
                      qep_alpha=alpha, true_sequential=False, progress=False)
        fitted[alpha] = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    assert torch.isfinite(fitted[0.5]).all()
    assert not torch.equal(fitted[0.0], fitted[0.5])
