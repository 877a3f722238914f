"""llama.cpp grids (grid: k = Q2_K…Q6_K, grid: ggml = Q4_0…Q8_0 incl. Q5_0/Q5_1): the blocks quantc
writes dequantize in gguf-py exactly to quantc's weights, GPTQ on the grid beats round-to-nearest on
the same grid, bytes are counted exactly, and transformers loads the GGUF with quantc.load's logits."""
import json

import pytest
import torch

import quantc
from quantc import ggml
from quantc.config import parse_config
from quantc.errors import ConfigError
from quantc.gptq import gptq, relative_error, rtn
from quantc.options import Option
from quantc.pipeline import compile_model
from quantc.serve import check

from conftest import corpus, save_random

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install -e '.[gguf]')")


def _gguf_dequant(t: ggml.GGMLType, blocks: torch.Tensor) -> torch.Tensor:
    from gguf.quants import dequantize
    rows = blocks.reshape(blocks.shape[0], -1).numpy()
    return torch.from_numpy(dequantize(rows, gguf.GGMLQuantizationType[t.name])).float()


def _hessian(k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(k, 1024, generator=g) * torch.linspace(0.2, 3, k)[:, None]
    X = X + 0.7 * torch.randn(1, 1024, generator=g)        # correlated inputs: GPTQ has something to use
    return 2 * X @ X.t() / X.shape[1]


@pytest.mark.parametrize("name", sorted(ggml.TYPES))
def test_blocks_round_trip_through_gguf_py(name):
    t = ggml.TYPES[name]
    g = torch.Generator().manual_seed(1)
    W = torch.randn(6, 512, generator=g) * 0.05
    W[0, :40] = 0                                           # an all-zero sub-block (zero scales) too
    W[1, 7] = 1.5                                           # an outlier
    q, fields = ggml.rtn(t, W, mse=True)
    blocks = ggml.pack(t, q, fields)
    assert blocks.shape == (6, 512 // t.block, t.size)
    assert torch.equal(_gguf_dequant(t, blocks), ggml.dequantize(t, q, fields))
    q2, f2 = ggml.unpack(t, blocks)
    assert torch.equal(q2, q)
    for k in fields:
        assert torch.equal(f2[k].to(fields[k].dtype), fields[k]), k


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "Q4_1"])
def test_rtn_in_row_chunks_gives_the_bits_of_one_call(name, monkeypatch):
    """The GGUF writer quantizes a vocab-sized head RTN_ROWS rows at a time: rows are independent, so
    chunks (here 7 rows, the last one short) give the codes and fields of one call, as do the writer's
    packed blocks."""
    t = ggml.TYPES[name]
    g = torch.Generator().manual_seed(2)
    W = (torch.randn(45, 512, generator=g) * 0.05).to(torch.float16)   # 16-bit, as the checkpoint stores heads
    W[3, 100] = 1.0
    monkeypatch.setattr(ggml, "RTN_ROWS", 10**9)
    q1, f1 = ggml.rtn(t, W, mse=True)
    monkeypatch.setattr(ggml, "RTN_ROWS", 7)
    q2, f2 = ggml.rtn(t, W, mse=True)
    assert torch.equal(q1, q2) and f1.keys() == f2.keys()
    for k in f1:
        assert torch.equal(f1[k], f2[k]), k
    assert torch.equal(ggml.pack(t, q1, f1), ggml.pack(t, q2, f2))
    assert torch.equal(ggml.rtn(t, W, mse=True, rows=45)[0], ggml.rtn(t, W, mse=True, rows=44)[0])


@pytest.mark.parametrize("bits,grid,sym", [(2, "k", True), (3, "k", True), (4, "k", True), (5, "k", True),
                                           (6, "k", True), (5, "ggml", False), (5, "ggml", True)])
def test_gptq_on_the_grid_beats_rtn_and_writes_its_codes(bits, grid, sym):
    H = _hessian(512)
    W = torch.randn(32, 512, generator=torch.Generator().manual_seed(2)) * 0.05
    opt = Option(bits=bits, grid=grid, sym=sym, mse=True)
    res, base = gptq(W, H, opt), rtn(W, opt)
    assert res.ggml == base.ggml == opt.ggml_type.name
    assert relative_error(W, res.weight, H) < relative_error(W, base.weight, H)
    t = ggml.TYPES[res.ggml]
    blocks = ggml.pack(t, res.q, res.fields)               # the codes GPTQ chose, as written
    assert torch.equal(_gguf_dequant(t, blocks), res.weight)
    assert blocks.numel() == opt.bytes_for(512, 32)


def test_rows_that_are_not_whole_super_blocks_get_llama_cpps_fallback():
    W = torch.randn(8, 576) * 0.05                          # 576 = 2.25 super-blocks (SmolLM2's hidden size)
    for bits, fallback in [(2, "IQ4_NL"), (3, "IQ4_NL"), (4, "Q5_0"), (5, "Q5_1"), (6, "Q8_0")]:
        opt = Option(bits=bits, grid="k")
        res = gptq(W, _hessian(576), opt)
        assert res.ggml == fallback
        t = ggml.TYPES[fallback]
        assert opt.bytes_for(576, 8) == 8 * 576 // 32 * t.size == ggml.pack(t, res.q, res.fields).numel()
        assert torch.equal(_gguf_dequant(t, ggml.pack(t, res.q, res.fields)), res.weight)
    with pytest.raises(quantc.errors.QuantcError, match="not a multiple of 32"):
        Option(bits=4, grid="k").bytes_for(100, 8)


def test_options_name_their_type_and_gptq_records_are_unchanged():
    assert "grid" not in Option(bits=4, group_size=32).to_dict()
    assert Option(bits=4, group_size=32).label == "4b-g32-sym"
    k4 = Option(bits=4, grid="k", sym=True, group_size=128, act_order=True)
    assert (k4.label, k4.group_size, k4.sym, k4.act_order) == ("q4_k", 32, False, False)
    assert Option(**k4.to_dict()) == k4
    assert [Option(bits=b, grid="k").label for b in (2, 3, 5, 6, 8)] == ["q2_k", "q3_k", "q5_k", "q6_k", "q8_0"]
    assert Option(bits=5, grid="ggml", sym=False).label == "q5_1"
    # exact bytes: 256 weights of Q4_K are 144 bytes (4.5 bits), of Q6_K 210, of Q2_K 84
    assert [Option(bits=b, grid="k").bytes_for(256, 1) for b in (2, 3, 4, 5, 6)] == [84, 110, 144, 176, 210]
    with pytest.raises(ValueError, match="no 7-bit"):
        Option(bits=7, grid="k")


def test_only_gguf_serves_llama_cpp_grids(tmp_path, tiny_models):
    k4 = Option(bits=4, grid="k")
    assert not check({"x": k4}, ["gguf"])
    assert [v.field for v in check({"x": k4}, ["vllm", "onnx"])] == ["grid", "grid"]
    raw = {"model": str(tiny_models["llama"])}
    cfg = parse_config({**raw, "quant": {"bits": [2, 3, 4, 5, 6], "grid": "k"}, "serve": ["gguf"]}, "b.yaml")
    assert [o.label for o in cfg.candidates] == ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
    with pytest.raises(ConfigError, match=r"`quant.grid`: .*cannot be served by vllm"):
        parse_config({**raw, "quant": {"bits": 4, "grid": "k"}, "serve": ["vllm"]}, "b.yaml")
    with pytest.raises(ConfigError, match=r"`quant.grid`: export.targets has onnx"):
        parse_config({**raw, "quant": {"bits": 4, "grid": "k"}, "export": {"targets": ["gptq", "onnx"]}}, "b.yaml")
    with pytest.raises(ConfigError, match=r"`quant.group_size`: grid k takes group_size"):
        parse_config({**raw, "quant": {"bits": 4, "grid": "k", "group_size": 64}}, "b.yaml")
    with pytest.raises(ConfigError, match=r"`quant.bits`: bits 5 is not supported; .*grid k"):
        parse_config({**raw, "quant": {"bits": 5}}, "b.yaml")
    with pytest.raises(ConfigError, match=r"`overrides\[0\].group_size`: grid k takes group_size"):
        parse_config({**raw, "quant": {"bits": 4, "grid": "k"}, "overrides": [{"match": "mlp", "group_size": 64}]},
                     "b.yaml")
    with pytest.raises(ConfigError, match=r"`overrides\[0\].bits`: bits 6 is not supported"):
        parse_config({**raw, "quant": {"bits": 4, "group_size": 32}, "overrides": [{"match": "mlp", "bits": 6}]},
                     "b.yaml")


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama whose rows are whole super-blocks (hidden 256, MLP 512), untied head."""
    from transformers import LlamaConfig
    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    folder = tmp_path_factory.mktemp("wide") / "llama"
    save_random(cfg, folder, tiny_tokenizer, std=0.05)
    return folder


def test_transformers_loads_k_quant_gguf_with_quantc_logits(tmp_path, wide_llama, calib_file, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    raw = {"model": str(wide_llama), "quant": {"bits": 4, "grid": "k"},
           "overrides": [{"match": r"layers\.0\.mlp\.down_proj", "bits": 6},
                         {"match": r"layers\.1\.mlp\.down_proj", "bits": 5, "grid": "ggml", "sym": False},
                         {"match": r"layers\.1\.self_attn\.o_proj", "bits": 4, "grid": "gptq", "group_size": 32,
                          "sym": True},
                         {"match": r"layers\.1\.mlp\.(gate|up)_proj", "bits": 2}],
           "calibration": {"source": str(calib_file), "samples": 8, "seq_len": 64},
           "export": {"targets": ["gptq", "gguf"], "gguf_heads": "f16"}}
    out = tmp_path / "ck"
    compile_model(parse_config(raw, "b.yaml"), out, progress=False)
    types = json.loads((out / "gguf" / "gguf_export.json").read_text())["tensors"]
    assert types["blk.0.attn_q.weight"] == types["blk.0.ffn_gate.weight"] == "Q4_K"
    assert types["blk.0.ffn_down.weight"] == "Q6_K"
    assert types["blk.1.ffn_down.weight"] == "Q5_1"
    assert types["blk.1.attn_output.weight"] == "Q4_0"
    assert types["blk.1.ffn_up.weight"] == "Q2_K"
    manifest = json.loads((out / "quantc.json").read_text())
    mods = manifest["modules"]
    sizes = {}
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), framework="pt") as sf:
        for k in sf.keys():
            if k.endswith(".qblocks"):
                sizes[k[: -len(".qblocks")]] = sf.get_slice(k).get_shape()
    assert sizes, "no llama.cpp blocks in the checkpoint"
    for name, shape in sizes.items():            # the budget's bytes are the bytes written
        assert mods[name]["bytes"] == shape[0] * shape[1] * shape[2], name

    g = AutoModelForCausalLM.from_pretrained(out / "gguf", gguf_file="model.gguf", dtype=torch.float32).eval()
    q = quantc.load(out)
    assert type(q.model.layers[0].mlp.up_proj).__name__ == "GGMLLinear"
    ids = torch.tensor(AutoTokenizer.from_pretrained(wide_llama)(corpus(300, seed=3))["input_ids"][:64]).reshape(2, 32)
    with torch.no_grad():
        lg, lq = g(input_ids=ids).logits, q(input_ids=ids).logits
    torch.testing.assert_close(lg, lq, rtol=1e-5, atol=1e-5)
    assert types["output.weight"] == types["token_embd.weight"] == "F16"

    from quantc.verify import verify
    rows = {name: (ok, detail) for name, ok, detail in verify(out, logits=False)}
    assert rows["tensor shapes"][0], rows["tensor shapes"]
    assert f"{len(mods)} quantized linears" in rows["tensor shapes"][1]

    from quantc.export.onnx import export_onnx     # ONNX Runtime has no kernels for these blocks: said clearly
    with pytest.raises(quantc.errors.QuantcError, match=r"llama.cpp blocks .*quantc export gguf"):
        export_onnx(out, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()

    # by default the embeddings and output get the types llama.cpp's quantizer gives them, written in row
    # chunks (here 4 of the 320-token vocab, the last one short) with the bits of one call
    from quantc.export.gguf import export_gguf
    monkeypatch.setattr(ggml, "RTN_ROWS", 100)
    info = export_gguf(out, tmp_path / "g2")
    assert info["tensors"]["output.weight"] == "Q6_K" and info["tensors"]["token_embd.weight"] == "Q4_K"
    g2 = AutoModelForCausalLM.from_pretrained(tmp_path / "g2", gguf_file="model.gguf", dtype=torch.float32).eval()
    w16 = q.lm_head.weight.detach()
    wq = g2.lm_head.weight.detach()
    q6 = ggml.TYPES["Q6_K"]
    assert torch.equal(wq, ggml.dequantize(q6, *ggml.rtn(q6, w16, mse=True, rows=10**9)))    # Q6_K of the checkpoint's values
    q4 = ggml.TYPES["Q4_K"]
    e16 = q.model.embed_tokens.weight.detach()
    assert torch.equal(g2.model.embed_tokens.weight.detach(), ggml.dequantize(q4, *ggml.rtn(q4, e16, mse=True, rows=10**9)))
    assert not torch.equal(wq, w16)


def test_head_types_follow_llama_cpp():
    from quantc.export.gguf import head_types
    qc = {"bits": 4, "group_size": 32, "sym": False, "desc_act": False, "grid": "k"}
    blocks = {"model.layers.0.mlp.up_proj.qblocks": None, "model.embed_tokens.weight": None}
    tied = head_types(None, {"model_type": "llama", "hidden_size": 576}, qc, blocks)          # no lm_head: the embeddings are the output
    assert {k: v.name for k, v in tied.items()} == {"model.embed_tokens.weight": "Q8_0"}   # 576 % 256: Q8_0
    untied = head_types(None, {"model_type": "llama", "hidden_size": 576}, qc, {**blocks, "lm_head.weight": None})
    assert {k: v.name for k, v in untied.items()} == {"lm_head.weight": "Q8_0", "model.embed_tokens.weight": "Q5_0"}
    wide = head_types(None, {"model_type": "llama", "hidden_size": 512}, qc, {**blocks, "lm_head.weight": None})
    assert {k: v.name for k, v in wide.items()} == {"lm_head.weight": "Q6_K", "model.embed_tokens.weight": "Q4_K"}
    assert head_types(None, {"model_type": "llama", "hidden_size": 512}, {**qc, "grid": "gptq"}, {"model.embed_tokens.weight": None}) == {}


def test_budget_over_k_quant_candidates_holds_in_gguf_bytes(tmp_path, wide_llama, calib_file, monkeypatch):
    """The measurement solves every K-quant candidate, the allocator meets the budget in the bytes
    llama.cpp stores, and the plan file (with its grid) reads back."""
    from click.testing import CliRunner
    from quantc.cli import main
    monkeypatch.setenv("QUANTC_CACHE", str(tmp_path / "cache"))
    y = tmp_path / "b.yaml"
    y.write_text(f"""model: {wide_llama}
budget: {{avg_bits: 4.0}}
quant: {{bits: [2, 4, 6], grid: k}}
calibration: {{source: {calib_file}, samples: 8, seq_len: 64}}
plan: {{measure_samples: 6, alpha_samples: 2, alpha_seq_len: 32}}
export: {{targets: [gptq, gguf], gguf_heads: f16}}
""")
    r = CliRunner().invoke(main, ["compile", str(y), "-o", str(tmp_path / "ck")])
    assert r.exit_code == 0, r.output + repr(r.exception)
    m = json.loads((tmp_path / "ck" / "quantc.json").read_text())
    assert m["totals"]["quantized_linear_bytes"] <= 4.0 * m["totals"]["quantized_weights"] / 8
    labels = {Option(**{k: v for k, v in mod.items() if k not in ("in", "out", "bytes")}).label
              for mod in m["modules"].values()}
    assert labels <= {"q2_k", "q4_k", "q6_k"} and len(labels) > 1          # a mixed plan
    types = json.loads((tmp_path / "ck" / "gguf" / "gguf_export.json").read_text())["types"]
    assert set(types) <= {"Q2_K", "Q4_K", "Q6_K"}
    gguf_bytes = sum(t.numel() * t.element_size() for k, t in _blocks(tmp_path / "ck").items())
    assert gguf_bytes == m["totals"]["quantized_linear_bytes"]
    from quantc.planning import read_plan_options
    choices, _, _ = read_plan_options(tmp_path / "ck" / "plan.yaml", parse_config(
        __import__("yaml").safe_load(y.read_text()), str(y)))
    assert {o.label for o in choices.values()} == labels


def _blocks(folder):
    from safetensors.torch import load_file
    return {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if k.endswith(".qblocks")}
