"""ONNX export: MatMulNBits packing against a float64 reference, logit and greedy-token parity of the
exported graph with quantc's torch runtime (every architecture, mixed 2/3/4/8 bits, act-order), the
KV-cache path against a full prefill, and the CLI (compile target, export, eval/generate backends)."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import quantc
from quantc.cli import main
from quantc.errors import QuantcError
from quantc.export.onnx import GraphBuilder, export_onnx, matmulnbits_tensors
from quantc.ort import OrtModel, generate_torch
from quantc.packing import dequantize_gptq, pack_gptq

from conftest import corpus, save_random, write_yaml


def run_single(m: dict, x: np.ndarray) -> np.ndarray:
    from onnx import TensorProto, helper
    g = GraphBuilder()
    inp = "x"
    if m["perm"] is not None:
        inp = g.op("Gather", ["x", g.const("perm", m["perm"].astype(np.int64))], axis=-1)
    ins = [inp, g.const("B", m["B"]), g.const("s", m["scales"])]
    if m["zero_points"] is not None:
        ins.append(g.const("zp", m["zero_points"]))
    y = g.op("MatMulNBits", ins, domain="com.microsoft", name="y", **m["attrs"])
    K, N = m["attrs"]["K"], m["attrs"]["N"]
    graph = helper.make_graph(g.nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, [None, N])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size,act_order,sym,K", [(32, False, True, 192), (64, True, False, 192),
                                                        (-1, False, False, 192), (96, True, True, 192),
                                                        (128, True, False, 192), (-1, False, True, 1024),
                                                        (512, True, False, 1024)])
def test_matmulnbits_matches_float64_reference(bits, group_size, act_order, sym, K):
    """Random GPTQ tensors (any zero points, act-order g_idx, non power-of-two groups, a partial last
    group: K = 192 with groups of 128; groups wider than ONNX Runtime's largest block, 256: per-channel
    and g512 at K = 1024) → MatMulNBits in ONNX Runtime equals x @ dequantize(W)ᵀ computed in float64."""
    torch.manual_seed(bits * 100 + group_size)
    N = 64
    gs = K if group_size <= 0 else group_size
    G = -(-K // gs)
    maxq = 2 ** bits - 1
    q = torch.randint(0, maxq + 1, (N, K))
    zeros = torch.full((G, N), (maxq + 1) // 2) if sym else torch.randint(1, maxq + 1, (G, N))
    scales = (torch.rand(G, N) * 0.1 + 0.01).half()
    g_idx = torch.arange(K) // gs
    if act_order:
        g_idx = g_idx[torch.randperm(K)]
    p = pack_gptq(q, zeros, scales, g_idx, bits)
    m = matmulnbits_tensors(p["qweight"], p["qzeros"], p["scales"], p["g_idx"], bits, group_size)
    assert (m["perm"] is not None) == act_order
    assert m["attrs"]["bits"] == (4 if bits == 3 else bits) and m["container"] == (bits == 3)
    assert (m["zero_points"] is None) == (sym or bits == 3)        # default zero 2^(b-1) is left out
    x = np.random.default_rng(0).standard_normal((5, K)).astype(np.float32)
    W = dequantize_gptq(p["qweight"], p["qzeros"], p["scales"], p["g_idx"], bits, torch.float64).numpy()
    ref = x.astype(np.float64) @ W.T
    got = run_single(m, x)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5
    if bits == 2:                                   # widened into the 4-bit container: the same product
        w = matmulnbits_tensors(p["qweight"], p["qzeros"], p["scales"], p["g_idx"], bits, group_size, widen_2bit=True)
        assert w["attrs"]["bits"] == 4 and w["container"] and w["zero_points"] is None
        assert np.linalg.norm(run_single(w, x) - ref) / np.linalg.norm(ref) < 1e-5


def test_group_size_without_power_of_two_block_is_refused():
    from quantc.export.onnx import block_size_for
    assert block_size_for(96) == 32 and block_size_for(128) == 128
    with pytest.raises(QuantcError, match="power-of-two block"):
        block_size_for(40)


MIXED = """
quant: {{bits: 4, group_size: 32, act_order: true, static_groups: false}}
overrides:
  - {{match: 'layers\\.0\\.self_attn\\.(q|k|v)_proj', bits: 2, sym: false}}
  - {{match: 'layers\\.0\\.mlp', bits: 8}}
  - {{match: 'layers\\.1\\.self_attn', bits: 3}}
calibration: {{source: {calib}, samples: 8, seq_len: 64, batch_size: 4}}
export: {{targets: [gptq, onnx]}}
"""


def compile_cli(yaml_path, out, *args):
    r = CliRunner().invoke(main, ["-q", "compile", str(yaml_path), "-o", str(out), *args])
    assert r.exit_code == 0, r.output + repr(r.exception)
    return json.loads((out / "quantc.json").read_text())


def ids_for(tok, n=2, s=40):
    return np.array(tok(corpus(800, seed=7))["input_ids"][: n * s]).reshape(n, s)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
def test_onnx_matches_torch_runtime(tmp_path, tiny_models, tiny_tokenizer, calib_file, kind):
    y = write_yaml(tmp_path / "b.yaml", f"model: {tiny_models[kind]}\n" + MIXED.format(calib=calib_file))
    out = tmp_path / "out"
    m = compile_cli(y, out)
    assert "onnx/model.onnx" in m["files"] and "onnx/model.onnx.data" in m["files"]
    info = json.loads((out / "onnx" / "onnx_export.json").read_text())
    nb = info["matmulnbits"]
    assert len(nb) == 14 and info["matmul"] == ([] if kind == "llama" else ["lm_head"])   # llama: tied → Gemm
    assert {v["bits"] for v in nb.values()} == {2, 4, 8}                         # 3-bit → 4-bit container
    assert sorted(info["container_4bit"]) == sorted(f"model.layers.1.self_attn.{p}_proj" for p in "qkvo")
    assert any(v["act_order"] for v in nb.values())                             # K reordered at export

    q = quantc.load(out)
    om = OrtModel(out, providers=["CPUExecutionProvider"])
    assert om.providers[0] == "CPUExecutionProvider"
    ids = ids_for(tiny_tokenizer)
    lo, past = om.forward(ids)
    with torch.no_grad():
        lt = q(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.linalg.norm(lo - lt) / np.linalg.norm(lt) < 1e-4
    assert past["past_key_values.0.key"].shape == (2, 2, 40, 16)

    # the KV-cache path: prefill 30 tokens, then 10 single-token steps = the full prefill's logits
    lp, past = om.forward(ids[:, :30])
    steps = []
    for j in range(30, 40):
        lj, past = om.forward(ids[:, j:j + 1], past, j)
        steps.append(lj[:, 0])
    assert np.abs(np.stack(steps, 1) - lo[:, 30:]).max() < 1e-4 * np.abs(lo).max()

    prompt = ids[0, :8]
    assert om.generate(prompt, 20) == generate_torch(q, prompt, 20)


def test_attention_mask_padding_matches_torch(tmp_path, tiny_models, tiny_tokenizer, calib_file):
    """Left padding: masked keys are ignored, positions come from position_ids."""
    y = write_yaml(tmp_path / "b.yaml", f"model: {tiny_models['llama']}\n" + MIXED.format(calib=calib_file))
    out = tmp_path / "out"
    compile_cli(y, out)
    q = quantc.load(out)
    om = OrtModel(out)
    ids = ids_for(tiny_tokenizer, 2, 24)
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **om.empty_past(2)}
    lo = om.session.run(["logits"], feeds)[0]
    with torch.no_grad():
        lt = q(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits.numpy()
    keep = mask.astype(bool)
    assert np.linalg.norm(lo[keep] - lt[keep]) / np.linalg.norm(lt[keep]) < 1e-4


def test_cli_export_eval_generate(tmp_path, tiny_models, calib_file):
    y = write_yaml(tmp_path / "b.yaml", f"""model: {tiny_models['qwen2']}
quant: {{bits: 4, group_size: 32}}
calibration: {{source: {calib_file}, samples: 8, seq_len: 64, batch_size: 4}}
""")
    out = tmp_path / "out"
    compile_cli(y, out)
    assert not (out / "onnx").exists()
    r = CliRunner().invoke(main, ["export", "onnx", str(out)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "MatMulNBits" in r.output and (out / "onnx" / "model.onnx").is_file()
    assert json.loads((out / "onnx" / "genai_config.json").read_text())["model"]["decoder"]["num_key_value_heads"] == 2
    r = CliRunner().invoke(main, ["export", "onnx", str(out)])
    assert r.exit_code == 2 and "already exists; pass --force" in r.output
    res = {}
    for backend in ("torch", "onnx"):
        r = CliRunner().invoke(main, ["-q", "eval", str(out), "--text", str(calib_file), "--seq-len", "64",
                                      "--windows", "4", "--backend", backend, "--no-kl"])
        assert r.exit_code == 0, r.output + repr(r.exception)
        res[backend] = json.loads(r.output.strip().splitlines()[-1])
    assert abs(res["onnx"]["ppl"] - res["torch"]["ppl"]) < 1e-3 * res["torch"]["ppl"]
    assert res["onnx"]["providers"] == ["CPUExecutionProvider"]
    gen = {}
    for backend in ("torch", "onnx"):
        r = CliRunner().invoke(main, ["generate", str(out), "-p", "the quick brown", "-n", "12", "--backend", backend])
        assert r.exit_code == 0, r.output + repr(r.exception)
        gen[backend] = r.output.splitlines()[0]
    assert gen["torch"] == gen["onnx"] and gen["onnx"].startswith("the quick brown")


def test_fp32_folder_exports_plain_matmul(tmp_path, tiny_models, tiny_tokenizer):
    """An unquantized HF folder exports too (the float baseline): MatMul, same logits as transformers."""
    from transformers import AutoModelForCausalLM
    info = export_onnx(tiny_models["qwen3"], tmp_path / "fp")
    assert not info["matmulnbits"] and len(info["matmul"]) == 15            # 14 linears + untied lm_head
    ids = ids_for(tiny_tokenizer)
    lo, _ = OrtModel(tmp_path / "fp").forward(ids)
    ref = AutoModelForCausalLM.from_pretrained(tiny_models["qwen3"], dtype=torch.float32).eval()
    with torch.no_grad():
        lt = ref(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.linalg.norm(lo - lt) / np.linalg.norm(lt) < 1e-5


def test_export_bad_inputs(tmp_path, tiny_models):
    with pytest.raises(QuantcError, match="no config.json"):
        export_onnx(tmp_path, tmp_path / "o")
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(QuantcError, match="model_type 'gpt2' is not supported by the ONNX exporter"):
        export_onnx(bad, tmp_path / "o")
    r = CliRunner().invoke(main, ["eval", str(tiny_models["llama"]), "--text", str(bad / "config.json"),
                                  "--backend", "onnx"])
    assert r.exit_code == 2 and "no model.onnx" in r.output and "quantc export onnx" in r.output


def test_onnxruntime_genai_runs_the_folder(tmp_path, tiny_models, tiny_tokenizer, calib_file):
    """genai_config.json fits ONNX Runtime GenAI: its greedy search gives quantc's tokens."""
    og = pytest.importorskip("onnxruntime_genai")
    y = write_yaml(tmp_path / "b.yaml", f"model: {tiny_models['qwen3']}\n" + MIXED.format(calib=calib_file))
    out = tmp_path / "out"
    compile_cli(y, out)
    model = og.Model(str(out / "onnx"))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=28, do_sample=False)
    gen = og.Generator(model, params)
    prompt = [int(t) for t in ids_for(tiny_tokenizer)[0, :8]]
    gen.append_tokens(prompt)
    got = []
    while not gen.is_done():
        gen.generate_next_token()
        got.append(int(gen.get_next_tokens()[0]))
    ours = OrtModel(out).generate(np.array(prompt), 20)
    assert got == ours[:len(got)]
    # GenAI stops at an end-of-sequence token (quantc's own loop runs on); otherwise all 20 tokens
    eos = json.loads((out / "onnx" / "genai_config.json").read_text())["model"]["eos_token_id"]
    assert len(got) == 20 or (got[-1] in (eos if isinstance(eos, list) else [eos]) and len(got) > 1)


def test_attention_wider_than_hidden(tmp_path, tiny_tokenizer, calib_file):
    """heads × head_dim ≠ hidden_size (Qwen3-0.6B: 16 × 128 against 1024): o_proj reads the attention
    output at its own width, so the exported graph reshapes to heads × head_dim, not to hidden."""
    from transformers import Qwen3Config
    cfg = Qwen3Config(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = save_random(cfg, tmp_path / "m", tiny_tokenizer)
    assert model.model.layers[0].self_attn.o_proj.in_features == 128 != cfg.hidden_size
    y = write_yaml(tmp_path / "b.yaml", f"model: {tmp_path / 'm'}\nquant: {{bits: 4, group_size: 32, method: rtn}}\n"
                                        "export: {targets: [gptq, onnx]}\n")
    out = tmp_path / "out"
    compile_cli(y, out)
    ids = ids_for(tiny_tokenizer)
    lo, _ = OrtModel(out, providers=["CPUExecutionProvider"]).forward(ids)
    with torch.no_grad():
        lt = quantc.load(out)(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.linalg.norm(lo - lt) / np.linalg.norm(lt) < 1e-4


@pytest.mark.parametrize("rope", ["longrope", "dynamic"])
def test_length_dependent_rope_is_exported_up_to_where_its_tables_hold(tmp_path, tiny_tokenizer, rope):
    """longrope (Phi-3 128k) switches every position to its long factors once a call passes the
    original context, and dynamic NTK rescales there; fixed tables built for longer sequences would
    rotate a short prompt wrongly. The exporter caps max_length at that context (the logits then
    match transformers) and refuses a longer --max-length, naming it."""
    from transformers import AutoModelForCausalLM
    from conftest import tiny_config
    cfg = tiny_config("phi3" if rope == "longrope" else "llama", tiny_tokenizer)
    half = cfg.hidden_size // cfg.num_attention_heads // 2
    if rope == "longrope":
        cfg.rope_parameters = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 64,
                               "partial_rotary_factor": 1.0,
                               "short_factor": [1.0 + 0.1 * i for i in range(half)],
                               "long_factor": [2.0 + 0.5 * i for i in range(half)]}
        cfg.original_max_position_embeddings = 64
    else:
        cfg.max_position_embeddings = 64
        cfg.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}
    save_random(cfg, tmp_path / "m", tiny_tokenizer)
    info = export_onnx(tmp_path / "m", tmp_path / "o")
    assert info["max_length"] == 64
    ids = ids_for(tiny_tokenizer)
    lo, _ = OrtModel(tmp_path / "o").forward(ids)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    with torch.no_grad():
        lt = ref(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.linalg.norm(lo - lt) / np.linalg.norm(lt) < 1e-5
    with pytest.raises(QuantcError, match=r"config.json: .*past 64 tokens.*--max-length 64 or less"):
        export_onnx(tmp_path / "m", tmp_path / "o2", max_length=128)
    assert export_onnx(tmp_path / "m", tmp_path / "o3", max_length=32)["max_length"] == 32
