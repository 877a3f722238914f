"""The families added through quantc/family.py, Gemma 3 text and Phi-3, on tiny random models built here:
compile + quantc.load against the float model with the checkpoint's own (dequantized) weights, the
quantize sweep's replay, GPTQModel loading the artifact, ONNX Runtime parity, a mixed plan's `dynamic`
field read module by module as vLLM and GPTQModel read it; and the message for an unsupported family."""
import json
import os
import re

import numpy as np
import pytest
import torch

import quantc
from quantc import ggml
from quantc.config import parse_config
from quantc.errors import QuantcError
from quantc.family import BY_TYPE, SUPPORTED_TYPES
from quantc.packing import dequantize_gptq
from quantc.pipeline import compile_model
from quantc.runtime import read_tensors

from conftest import build_tiny, corpus

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
KINDS = ["gemma3_text", "phi3"]
MIXED = {"quant": {"bits": 4, "group_size": 32, "act_order": True, "static_groups": False},
         "overrides": [{"match": r"layers\.0\.self_attn\.(q|k|v|qkv)_proj", "bits": 2, "sym": False},
                       {"match": r"layers\.0\.mlp\.", "bits": 8},
                       {"match": r"layers\.1\.self_attn\.", "bits": 3}]}


@pytest.fixture(scope="module")
def fam_models(tmp_path_factory, tiny_tokenizer):
    base = tmp_path_factory.mktemp("families")
    return {k: build_tiny(k, base / k, tiny_tokenizer) for k in KINDS}


def _compile(tmp_path, model, calib, name="out", **extra):
    raw = {"model": str(model), "quant": {"bits": 4, "group_size": 32},
           "calibration": {"source": str(calib), "samples": 8, "seq_len": 64, "batch_size": 4}, **extra}
    out = tmp_path / name
    compile_model(parse_config(raw), out, progress=False)
    return out


def _ids(tok, n=2, s=48):
    return torch.tensor(tok(corpus(800, seed=7))["input_ids"][: n * s]).reshape(n, s)


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def fake_quantized(src, out):
    """The float transformers model of `src` carrying the checkpoint's values: every packed linear
    dequantized (Phi-3's gate/up row blocks concatenated back), every other tensor as written."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    from quantc.runtime import module_option
    t = read_tensors(out)
    values = {}
    for k in t:
        if k.endswith(".qweight"):
            n = k[: -len(".qweight")]
            bits = int(module_option(n, qc)["bits"])
            values[f"{n}.weight"] = dequantize_gptq(t[k], t[f"{n}.qzeros"], t[f"{n}.scales"], t[f"{n}.g_idx"], bits,
                                                    torch.float32)
        elif k.endswith(".qblocks"):         # a llama.cpp grid: the blocks as gguf-py dequantizes them
            n = k[: -len(".qblocks")]
            o = module_option(n, qc)
            gt = ggml.stored_type(o["grid"], int(o["bits"]), bool(o["sym"]), t[k].shape[-1])
            values[f"{n}.weight"] = ggml.dequantize_blocks(gt, t[k])
        elif not k.endswith((".qzeros", ".scales", ".g_idx")):
            values[k] = t[k].float()
    fam = BY_TYPE[model.config.model_type]
    for i in range(model.config.num_hidden_layers):
        for fused in fam.export_split:
            parts = fam.exported(fam.prefix(i) + fused)
            if f"{parts[0]}.weight" in values:
                values[f"{fam.prefix(i)}{fused}.weight"] = torch.cat([values.pop(f"{p}.weight") for p in parts])
    state = model.state_dict()
    for k, v in values.items():
        assert state[k].shape == v.shape, k
        state[k].copy_(v)
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_compile_and_load_match_the_fake_quantized_model(tmp_path, fam_models, tiny_tokenizer, calib_file, kind):
    out = _compile(tmp_path, fam_models[kind], calib_file)
    m = json.loads((out / "quantc.json").read_text())
    fam = BY_TYPE[kind]
    assert sorted(m["modules"]) == sorted(f"model.layers.{i}.{n}" for i in range(2) for n in fam.linears())
    tensors = read_tensors(out)
    if kind == "phi3":      # qkv stays fused, gate/up is written as GPTQModel's phi3 model builds it
        assert "model.layers.0.self_attn.qkv_proj.qweight" in tensors
        assert {"model.layers.0.mlp.gate_proj.qweight", "model.layers.0.mlp.up_proj.qweight"} <= set(tensors)
        assert not any("gate_up_proj" in k for k in tensors)
    else:                   # tied embeddings: no lm_head in the checkpoint
        assert "lm_head.weight" not in tensors and "model.layers.0.post_feedforward_layernorm.weight" in tensors
    q = quantc.load(out)
    ref = fake_quantized(fam_models[kind], out)
    ids = _ids(tiny_tokenizer)
    with torch.no_grad():
        lq, lf = q(input_ids=ids).logits, ref(input_ids=ids).logits
    assert _rel(lq, lf) < 1e-5
    from transformers import AutoModelForCausalLM
    orig = AutoModelForCausalLM.from_pretrained(fam_models[kind], dtype=torch.float32).eval()
    with torch.no_grad():
        assert 0 < _rel(lq, orig(input_ids=ids).logits) < 0.3        # quantized: close, not equal
    assert q.generate(ids[:1, :8], max_new_tokens=5, min_new_tokens=5, do_sample=False).shape == (1, 13)
    from click.testing import CliRunner
    from quantc.cli import main
    from quantc.verify import verify
    r = CliRunner().invoke(main, ["inspect", str(out)])
    assert r.exit_code == 0 and ("qkv_proj" if kind == "phi3" else "q_proj") in r.output, r.output
    rows = verify(out)
    assert all(ok for _, ok, _ in rows), rows           # hashes, packed shapes, logits against the source


@pytest.mark.parametrize("grid", ["k", "ggml"])
def test_phi3_on_a_llama_cpp_grid_writes_and_loads_row_blocks(tmp_path, fam_models, tiny_tokenizer, calib_file, grid):
    """Phi-3's gate_up_proj on a llama.cpp grid is written as gate/up row blocks of llama.cpp blocks (codes
    and every per-row field split by rows) and quantc.load reads them back. The tiny model's 64/128 inputs
    are not whole super-blocks: grid k falls back to Q5_0; grid ggml with sym: false is Q4_1 (with mins)."""
    quant = {"bits": 4, "grid": grid, **({"sym": False} if grid == "ggml" else {})}
    out = _compile(tmp_path, fam_models["phi3"], calib_file, quant=quant)
    tensors = read_tensors(out)
    size = ggml.TYPES["Q5_0" if grid == "k" else "Q4_1"].size
    for p in ("gate_proj", "up_proj"):
        assert tensors[f"model.layers.0.mlp.{p}.qblocks"].shape == (128, 64 // 32, size)
    assert "model.layers.0.self_attn.qkv_proj.qblocks" in tensors
    assert not any("gate_up_proj" in k or k.endswith(".qweight") for k in tensors)
    q = quantc.load(out)
    assert type(q.model.layers[0].mlp.gate_proj).__name__ == "GGMLLinear"
    ref = fake_quantized(fam_models["phi3"], out)
    ids = _ids(tiny_tokenizer)
    with torch.no_grad():
        assert _rel(q(input_ids=ids).logits, ref(input_ids=ids).logits) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_replay_matches_full_forward_and_layer_kinds(fam_models, calib_file, kind):
    """The sweep's cached attention/MLP replay (LayerRunner, from the family's replay facts) gives what a
    plain forward of each quantized layer gives; Gemma 3's layers get their own kind's mask and RoPE."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from quantc.calibration.data import windows_from_text
    from quantc.model import KINDS as KEY, Activations, capture_layer0_inputs, decoder_layers, layer_kwargs, units
    from quantc.options import Option
    from quantc.passes.quantize import quantize_gptq
    from quantc.pipeline import linear_names
    model = AutoModelForCausalLM.from_pretrained(fam_models[kind], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(fam_models[kind])
    ids = windows_from_text(calib_file.read_text(), tok, 6, 32, 0, "c")
    hidden, kw = capture_layer0_inputs(model, ids, 4)
    layers = decoder_layers(model)
    if kind == "gemma3_text":
        assert set(kw[0][KEY][1]) == {"sliding_attention", "full_attention"}
        a, b = (layer_kwargs(layer, kw[0]) for layer in layers)
        assert not torch.equal(a["position_embeddings"][0], b["position_embeddings"][0])   # local vs global RoPE
    assert [u.key for u in units(model)][:4] == (["0.qkv", "0.o", "0.gate_up", "0.down"] if kind == "phi3"
                                                  else ["0.q+k+v", "0.o", "0.gate+up", "0.down"])
    # the plain float model: the captured inputs through every layer give the model's own last hidden state
    x = Activations(hidden, kw, 4)
    for layer in layers:
        x = x.through(layer)
    with torch.no_grad():
        ref = model.model(input_ids=ids).last_hidden_state
    from quantc.model import final_norm
    torch.testing.assert_close(final_norm(model)(x.hidden), ref, rtol=1e-5, atol=1e-5)

    acts = Activations(hidden, kw, 4)
    seen = {}
    quantize_gptq(model, acts, {n: Option(3, 32) for n in linear_names(model)}, progress=False,
                  on_layer=lambda i, r, xh, xr, chk: seen.__setitem__(i, xh))
    x = acts
    for i, layer in enumerate(layers):
        x = x.through(layer)
        torch.testing.assert_close(seen[i].hidden, x.hidden, rtol=1e-5, atol=1e-5)


@pytest.mark.interop
@pytest.mark.parametrize("kind", KINDS)
def test_gptqmodel_loads_the_artifact(tmp_path, fam_models, tiny_tokenizer, calib_file, kind):
    pytest.importorskip("gptqmodel", reason="gptqmodel==7.6.0 is not installed (pip install -e '.[gptq]')")
    from gptqmodel import BACKEND, GPTQModel
    out = _compile(tmp_path, fam_models[kind], calib_file, **MIXED)
    g = GPTQModel.load(str(out), backend=BACKEND.TORCH, device="cpu", dtype=torch.float16)
    bits = {n: m.bits for n, m in g.model.named_modules() if hasattr(m, "qweight")}
    qkv = ["self_attn.qkv_proj"] if kind == "phi3" else [f"self_attn.{s}_proj" for s in "qkv"]
    expect = {**{f"model.layers.0.{n}": 2 for n in qkv}, **{f"model.layers.1.{n}": 3 for n in qkv},
              "model.layers.0.self_attn.o_proj": 4, "model.layers.1.self_attn.o_proj": 3,
              **{f"model.layers.0.mlp.{s}_proj": 8 for s in ("gate", "up", "down")},
              **{f"model.layers.1.mlp.{s}_proj": 4 for s in ("gate", "up", "down")}}
    assert bits == expect
    ids = _ids(tiny_tokenizer)
    with torch.no_grad():
        lg, lq = g.model(input_ids=ids).logits, quantc.load(out)(input_ids=ids).logits
    assert _rel(lg, lq) < 0.01            # fp16 (GPTQModel) against fp32 (quantc): rounding only


@pytest.mark.parametrize("kind", KINDS)
def test_onnx_runtime_parity(tmp_path, fam_models, tiny_tokenizer, calib_file, kind):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from quantc.export.onnx import export_onnx
    from quantc.ort import OrtModel, generate_torch
    out = _compile(tmp_path, fam_models[kind], calib_file, export={"targets": ["gptq", "onnx"]}, **MIXED)
    info = json.loads((out / "onnx" / "onnx_export.json").read_text())
    assert len(info["matmulnbits"]) == (10 if kind == "phi3" else 14)          # phi3: gate/up as two blocks
    assert info["container_4bit"]                                             # the 3-bit layer
    q = quantc.load(out)
    om = OrtModel(out, providers=["CPUExecutionProvider"])
    ids = _ids(tiny_tokenizer, 2, 40).numpy()          # longer than Gemma's test window (12)
    lo, _ = om.forward(ids)
    with torch.no_grad():
        lt = q(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.linalg.norm(lo - lt) / np.linalg.norm(lt) <= 1e-4
    lp, past = om.forward(ids[:, :30])                 # the KV-cache path against the full prefill
    steps = []
    for j in range(30, 40):
        lj, past = om.forward(ids[:, j:j + 1], past, j)
        steps.append(lj[:, 0])
    assert np.abs(np.stack(steps, 1) - lo[:, 30:]).max() < 1e-4 * np.abs(lo).max()
    prompt = ids[0, :8]
    greedy = om.generate(prompt, 32)
    assert greedy == generate_torch(q, prompt, 32)
    try:                                  # genai_config.json: ONNX Runtime GenAI's greedy search agrees
        import onnxruntime_genai as og
    except ImportError:
        og = None
    if og is not None:
        gm = og.Model(str(out / "onnx"))
        params = og.GeneratorParams(gm)
        params.set_search_options(max_length=8 + 32, do_sample=False)
        gen = og.Generator(gm, params)
        gen.append_tokens([int(t) for t in prompt])
        got = []
        while not gen.is_done():
            gen.generate_next_token()
            got.append(int(gen.get_next_tokens()[0]))
        assert got and got == greedy[:len(got)]        # (it stops at an end-of-sequence token)

    # the unquantized source folder (Phi-3's fused qkv_proj and gate_up_proj split in the graph)
    from transformers import AutoModelForCausalLM
    fp = export_onnx(fam_models[kind], tmp_path / "fp")
    assert not fp["matmulnbits"]
    lo, _ = OrtModel(tmp_path / "fp").forward(ids)
    ref = AutoModelForCausalLM.from_pretrained(fam_models[kind], dtype=torch.float32).eval()
    with torch.no_grad():
        lt = ref(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.linalg.norm(lo - lt) / np.linalg.norm(lt) <= 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_plan_dynamic_gives_every_module_its_option(tmp_path, fam_models, calib_file, kind, monkeypatch):
    """A budget between 4 and 8 bits under serve: [vllm] with a sub-module kept in 16-bit: the allocator's
    mixed plan; vLLM's rules (fused and unfused names) and GPTQModel's parser give every written module
    what quantc.json says it got."""
    from vllm_replay import expected_from_manifest, replay_gptqmodel, replay_vllm
    monkeypatch.setenv("QUANTC_CACHE", str(tmp_path / "cache"))
    keep = r"layers\.1\.mlp\.(gate_up|gate|up)_proj"
    out = _compile(tmp_path, fam_models[kind], calib_file, serve=["vllm"], budget={"avg_bits": 6},
                   quant={"bits": [4, 8], "group_size": 32}, keep_fp16=["lm_head", "embed_tokens", keep],
                   plan={"measure_samples": 4, "alpha_samples": 2, "alpha_seq_len": 32})
    manifest = json.loads((out / "quantc.json").read_text())
    assert {m["bits"] for m in manifest["modules"].values()} == {4, 8}               # mixed
    fam = BY_TYPE[kind]
    expected = {p: v for n, v in expected_from_manifest(manifest).items() for p in fam.exported(n)}
    tensors = read_tensors(out)
    assert all((f"{n}.qweight" in tensors) == (v is not None) for n, v in expected.items())
    assert sum(v is None for v in expected.values()) == 2                           # gate and up of layer 1
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    got = replay_vllm(qc, expected, marlin=True)
    assert len(got) == 4 * 2                         # qkv, o, gate_up, down per layer, as vLLM builds them
    assert got["model.layers.1.mlp.gate_up_proj"] is None
    pytest.importorskip("gptqmodel", reason="gptqmodel==7.6.0 is not installed (pip install -e '.[gptq]')")
    replay_gptqmodel(qc, expected)


def test_unsupported_model_type_names_the_supported_ones(tmp_path, calib_file):
    from quantc.export.onnx import export_onnx
    from quantc.model import load_model
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    from safetensors.torch import save_file
    save_file({"wte.weight": torch.zeros(4, 4)}, str(bad / "model.safetensors"))
    for run in (lambda: load_model(str(bad)), lambda: _compile(tmp_path, bad, calib_file)):
        with pytest.raises(QuantcError) as e:
            run()
        msg = str(e.value)
        assert "model_type 'gpt2' is not supported" in msg and str(bad) in msg
        assert all(t in msg for t in SUPPORTED_TYPES) and "gemma3_text" in msg and "phi3" in msg
    with pytest.raises(QuantcError, match="model_type 'gpt2' is not supported by the ONNX exporter; supported: .*phi3"):
        export_onnx(bad, tmp_path / "o")


def test_gguf_target_refused_before_the_compile_for_a_family_without_it(tmp_path, fam_models, calib_file,
                                                                         monkeypatch):
    import quantc.pipeline as pipeline
    from quantc.errors import ConfigError
    monkeypatch.setattr(pipeline, "load_source", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ConfigError, match=r"`export.targets`: gguf: .*model_type 'phi3' is not supported by the "
                                          r"GGUF exporter; supported: llama, mistral, qwen2, qwen3"):
        _compile(tmp_path, fam_models["phi3"], calib_file, export={"targets": ["gptq", "gguf"]})


def test_vllm_builds_every_quantized_phi3_linear_with_gptq(tmp_path, fam_models, calib_file):
    """vLLM's Phi-3 maps its fused gate_up_proj to itself, so it finds gate_up quantized only through
    an entry of modules_in_block_to_quantize inside that name; without the field it lists the modules of
    the quantized tensors, and the checkpoint's gate_proj / up_proj are not inside `mlp.gate_up_proj`:
    the layer would be built in 16-bit and its GPTQ tensors fail to load. Replayed with vLLM's rules
    (tests/vllm_replay.py); a Llama-family checkpoint needs no such field and gets none."""
    from vllm_replay import PACKED, vllm_quantized
    out = _compile(tmp_path, fam_models["phi3"], calib_file, keep_fp16=["lm_head", "embed_tokens", r"layers\.1\.mlp\.gate"])
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    names = list(read_tensors(out))
    for i, leaf in ((0, "self_attn.qkv_proj"), (0, "self_attn.o_proj"), (0, "mlp.gate_up_proj"), (1, "mlp.down_proj")):
        assert vllm_quantized(qc, f"model.layers.{i}.{leaf}", names, PACKED["phi3"]), leaf
    # layer 1's gate/up is kept in 16-bit: the dynamic field's "-:" entry names the fused linear for vLLM
    assert any(k.startswith("-:") and re.match(k[2:], "model.layers.1.mlp.gate_up_proj") for k in qc["dynamic"])
    bare = {k: v for k, v in qc.items() if k != "modules_in_block_to_quantize"}
    assert not vllm_quantized(bare, "model.layers.0.mlp.gate_up_proj", names, PACKED["phi3"])
    assert vllm_quantized(bare, "model.layers.0.self_attn.qkv_proj", names, PACKED["phi3"])
    llama = _compile(tmp_path, fam_models["gemma3_text"], calib_file, name="g")
    assert "modules_in_block_to_quantize" not in json.loads((llama / "config.json").read_text())["quantization_config"]


def test_bytes_counted_are_the_bytes_written_for_phi3s_row_blocks(tmp_path, fam_models, calib_file):
    """Phi-3's gate_up_proj is written as two row blocks, each with its own g_idx, scales and zeros: the
    bytes the budget and the manifest count are those of the tensors written, module by module, and the
    measurement's unit bytes agree with the shapes-only count the preflight uses."""
    from quantc.family import BY_TYPE
    from quantc.planning import shape_units, unit_bytes
    from quantc.preflight import skeleton
    out = _compile(tmp_path, fam_models["phi3"], calib_file)
    m = json.loads((out / "quantc.json").read_text())
    tensors = read_tensors(out)
    fam = BY_TYPE["phi3"]
    for name, mod in m["modules"].items():
        written = sum(tensors[f"{p}.{part}"].numel() * tensors[f"{p}.{part}"].element_size()
                      for p in fam.exported(name) for part in ("qweight", "qzeros", "scales", "g_idx"))
        assert mod["bytes"] == written, name
    gate_up = "model.layers.0.mlp.gate_up_proj"
    assert fam.parts(gate_up) == 2 and fam.parts("model.layers.0.self_attn.qkv_proj") == 1
    cfg = parse_config({"model": str(fam_models["phi3"]), "quant": {"bits": 4, "group_size": 32}})
    entries = shape_units(skeleton(cfg), cfg)
    assert entries["0.gate_up"]["parts"] == [2] and "parts" not in entries["0.qkv"]
    assert unit_bytes(entries["0.gate_up"], cfg.candidates[0]) == m["modules"][gate_up]["bytes"]
