"""GGUF export (llama.cpp's Q4_0 / Q4_1 / Q8_0 at group 32) from the GPTQ integers: the blocks
dequantize to the checkpoint's values, and transformers loads the file (gguf_file=) with the logits
of quantc.load on the GPTQ artifact."""
import json

import pytest
import torch

import quantc
from quantc.config import parse_config
from quantc.errors import ConfigError
from quantc.packing import dequantize_gptq, pack_gptq
from quantc.pipeline import compile_model

from conftest import corpus

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install -e '.[gguf]')")


def _gptq(bits: int, sym: bool, n: int = 64, k: int = 96, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2 ** bits, (n, k), generator=g)
    groups = k // 32
    zeros = torch.full((groups, n), 2 ** (bits - 1)) if sym else torch.randint(1, 2 ** bits, (groups, n), generator=g)
    scales = (torch.rand(groups, n, generator=g) * 0.02 + 1e-3).half()
    g_idx = torch.arange(k, dtype=torch.int32) // 32
    t = pack_gptq(q, zeros, scales, g_idx, bits)
    return t["qweight"], t["qzeros"], t["scales"], t["g_idx"]


@pytest.mark.parametrize("bits,sym,qtype,exact", [(4, True, "Q4_0", True), (8, True, "Q8_0", True),
                                                  (4, False, "Q4_1", False)])
def test_blocks_dequantize_to_the_gptq_values(bits, sym, qtype, exact):
    from gguf.quants import dequantize
    from quantc.export.gguf import gguf_blocks
    qw, qz, sc, gi = _gptq(bits, sym)
    t, rows = gguf_blocks(qw, qz, sc, gi, bits)
    assert t.name == qtype
    got = torch.from_numpy(dequantize(rows, t)).float()
    ref = dequantize_gptq(qw, qz, sc, gi, bits)
    assert got.shape == ref.shape
    if exact:
        assert torch.equal(got, ref)
    else:   # Q4_1 stores m = -scale·zero in fp16: one rounding per block
        assert torch.allclose(got, ref, rtol=0, atol=float(ref.abs().max()) * 2 ** -10)


def test_act_order_and_other_groups_are_refused():
    from quantc.errors import QuantcError
    from quantc.export.gguf import gguf_blocks
    qw, qz, sc, gi = _gptq(4, True)
    with pytest.raises(QuantcError, match="act-order"):
        gguf_blocks(qw, qz, sc, gi.flip(0), 4)
    with pytest.raises(QuantcError, match="3-bit has no native GGUF type"):
        gguf_blocks(*_gptq(3, True)[:4], 3)


def _compile(tmp_path, model, calib, name, **quant):
    raw = {"model": str(model), "quant": {"bits": 4, "group_size": 32, **quant},
           "overrides": [{"match": r"layers\.1\.mlp\.", "bits": 8, "sym": True}],
           "keep_fp16": ["lm_head", "embed_tokens", r"layers\.0\.self_attn\.v_proj"],
           "calibration": {"source": str(calib), "samples": 8, "seq_len": 64},
           "export": {"targets": ["gptq", "gguf"]}}
    out = tmp_path / name
    compile_model(parse_config(raw, "b.yaml"), out, progress=False)
    return out


@pytest.mark.parametrize("kind,sym", [("llama", True), ("llama", False), ("qwen2", True)])
def test_transformers_loads_the_gguf_with_quantc_logits(tmp_path, tiny_models, calib_file, kind, sym):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = _compile(tmp_path, tiny_models[kind], calib_file, "ck", sym=sym)
    info = json.loads((out / "gguf" / "gguf_export.json").read_text())
    types = info["tensors"]
    assert types["blk.0.attn_q.weight"] == ("Q4_0" if sym else "Q4_1")
    assert types["blk.1.ffn_down.weight"] == types["blk.1.ffn_gate.weight"] == "Q8_0"
    assert types["blk.0.attn_v.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    assert ("output.weight" in types) == (kind != "llama")            # the tiny llama ties its embeddings
    manifest = json.loads((out / "quantc.json").read_text())
    assert "gguf/model.gguf" in manifest["files"]

    g = AutoModelForCausalLM.from_pretrained(out / "gguf", gguf_file="model.gguf", dtype=torch.float32).eval()
    q = quantc.load(out)
    src_tok = AutoTokenizer.from_pretrained(tiny_models[kind])
    text = corpus(400, seed=3)
    ids = torch.tensor(src_tok(text)["input_ids"][: 2 * 40]).reshape(2, 40)
    with torch.no_grad():
        lg, lq = g(input_ids=ids).logits, q(input_ids=ids).logits
    if sym:     # Q4_0 / Q8_0 / F16 hold the checkpoint's values exactly
        torch.testing.assert_close(lg, lq, rtol=1e-5, atol=1e-5)
    else:       # Q4_1: one fp16 rounding of m per block
        assert float((lg - lq).norm() / lq.norm()) < 2e-3
    gtok = AutoTokenizer.from_pretrained(out / "gguf", gguf_file="model.gguf")
    assert gtok(text)["input_ids"] == src_tok(text)["input_ids"]
    assert gtok.eos_token == src_tok.eos_token


def test_gguf_target_refuses_what_llama_cpp_has_no_type_for(tmp_path, tiny_models):
    raw = {"model": str(tiny_models["llama"]), "export": {"targets": ["gptq", "gguf"]}}
    with pytest.raises(ConfigError, match=r"`quant.group_size`: .*group 128\) cannot be served by gguf"):
        parse_config({**raw, "quant": {"group_size": 128}}, "b.yaml")
    with pytest.raises(ConfigError, match=r"`quant.bits`: .*3-bit sym, group 32\) cannot be served by gguf"):
        parse_config({**raw, "quant": {"bits": [3, 4], "group_size": 32}}, "b.yaml")
    with pytest.raises(ConfigError, match=r"`quant.act_order`: .*cannot be served by gguf.*static_groups"):
        parse_config({**raw, "quant": {"group_size": 32, "static_groups": False}}, "b.yaml")
    with pytest.raises(ConfigError, match=r"`overrides\[0\]`: .*8-bit asym"):
        parse_config({**raw, "quant": {"group_size": 32}, "overrides": [{"match": "mlp", "bits": 8, "sym": False}]},
                     "b.yaml")
    cfg = parse_config({**raw, "quant": {"group_size": 32, "sym": False}}, "b.yaml")   # Q4_1
    assert cfg.export_targets == ["gptq", "gguf"] and cfg.serve == []


def test_export_gguf_command_writes_the_same_file(tmp_path, tiny_models, calib_file):
    from click.testing import CliRunner
    from quantc.cli import main
    out = _compile(tmp_path, tiny_models["mistral"], calib_file, "ck")
    r = CliRunner().invoke(main, ["export", "gguf", str(out), "-o", str(tmp_path / "g")])
    assert r.exit_code == 0, r.output
    assert "Q4_0" in r.output and "Q8_0" in r.output
    assert (tmp_path / "g" / "model.gguf").read_bytes() == (out / "gguf" / "model.gguf").read_bytes()
    r = CliRunner().invoke(main, ["export", "gguf", str(out), "-o", str(tmp_path / "g")])
    assert r.exit_code == 2 and "--force" in r.output


def test_a_refused_gguf_export_leaves_nothing_behind(tmp_path, tiny_models):
    """A checkpoint with no llama.cpp type (g64): the export stops with the reason, and neither the
    output nor its partial folder and lock are left (the output would sit inside the checkpoint)."""
    from click.testing import CliRunner
    from quantc.cli import main
    raw = {"model": str(tiny_models["llama"]), "quant": {"bits": 4, "group_size": 64, "method": "rtn"}}
    out = tmp_path / "ck"
    compile_model(parse_config(raw, "b.yaml"), out, progress=False)
    before = sorted(p.name for p in out.iterdir())
    r = CliRunner().invoke(main, ["export", "gguf", str(out)])
    assert r.exit_code != 0 and "need group size 32" in r.output, r.output
    assert sorted(p.name for p in out.iterdir()) == before


QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")


def _split_then_bytes(regex: str) -> dict:
    """A tokenizer.json pre_tokenizer as Qwen2's and Llama 3's are written: one regex split, then bytes."""
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


def test_llama_cpp_is_told_the_pre_tokenizer_of_the_tokenizer():
    """Without tokenizer.ggml.pre (or with a name it does not know) llama.cpp splits text its own default
    way, which is not these tokenizers': Qwen2's, Llama 3's and GPT-2's splits get the names llama.cpp's
    converter writes for them; the source GGUF's name and export.gguf_pre win; an unknown split is refused,
    naming the key."""
    from quantc.errors import QuantcError
    from quantc.export.gguf import pre_tokenizer
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert pre_tokenizer({"pre_tokenizer": _split_then_bytes(QWEN2_SPLIT)}, "t") == "qwen2"
    llama3 = QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
    assert pre_tokenizer({"pre_tokenizer": _split_then_bytes(llama3)}, "t") == "llama-bpe"
    assert pre_tokenizer({"pre_tokenizer": byte_level}, "t") == "gpt-2"
    digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    assert pre_tokenizer({"pre_tokenizer": digits}, "t") == "smollm"
    assert pre_tokenizer({"pre_tokenizer": byte_level}, "t", source_pre="smollm") == "smollm"
    assert pre_tokenizer({"pre_tokenizer": byte_level}, "t", "smollm", override="gpt-2") == "gpt-2"
    other = _split_then_bytes(QWEN2_SPLIT.replace(r"\p{N}", r"\p{N}+"))
    with pytest.raises(QuantcError, match=r"^t: llama.cpp needs .*set export.gguf_pre"):
        pre_tokenizer({"pre_tokenizer": other}, "t")
    assert pre_tokenizer({"pre_tokenizer": other}, "t", override="deepseek-llm") == "deepseek-llm"


def test_the_gguf_names_the_pre_tokenizer_and_an_unknown_one_stops_the_compile_first(tmp_path, tiny_models,
                                                                                      calib_file):
    """A compile from a Hugging Face folder writes the tokenizer's name (the tiny models' byte-level
    BPE: gpt-2), not llama.cpp's fallback; a tokenizer whose split quantc cannot name stops the compile
    in the preflight, and export.gguf_pre lets it through with that name."""
    from gguf import GGUFReader
    out = _compile(tmp_path, tiny_models["mistral"], calib_file, "ck")
    field = GGUFReader(str(out / "gguf" / "model.gguf")).fields["tokenizer.ggml.pre"]
    assert bytes(field.parts[field.data[0]]).decode() == "gpt-2"
    import shutil
    model = tmp_path / "m"
    shutil.copytree(tiny_models["llama"], model)
    tj = json.loads((model / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = _split_then_bytes(r"\p{L}+|\p{N}+|[^\p{L}\p{N}]+")
    (model / "tokenizer.json").write_text(json.dumps(tj))
    raw = {"model": str(model), "quant": {"bits": 4, "group_size": 32}, "export": {"targets": ["gptq", "gguf"]}}
    from quantc.preflight import check_export
    with pytest.raises(ConfigError, match=r"`export.targets`: gguf: .*tokenizer.json: llama.cpp needs"):
        check_export(parse_config(raw, "b.yaml"))
    check_export(parse_config({**raw, "export": {**raw["export"], "gguf_pre": "gpt-2"}}, "b.yaml"))
    with pytest.raises(ConfigError, match=r"`export.gguf_pre`: 'GPT 2' is not a llama.cpp pre-tokenizer name"):
        parse_config({**raw, "export": {**raw["export"], "gguf_pre": "GPT 2"}}, "b.yaml")
