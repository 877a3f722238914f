"""GGUF export (llama.cpp) for the options llama.cpp runs natively, built from a quantc
checkpoint folder with the checkpoint's own integers (no linear is re-quantized):

- symmetric 4-bit → Q4_0: d = the GPTQ scale, the 4-bit codes as they are (value = d·(q − 8));
- asymmetric 4-bit → Q4_1: d = the scale, m = −scale·zero rounded to fp16 (value = d·q + m: equal to
  the GPTQ value up to that one fp16 rounding of m);
- symmetric 8-bit → Q8_0: d = the scale, int8 codes q − 128 (value = d·(q − 128)).

Which type a linear gets is read from its zero points (all 2^(bits−1): symmetric), so the file says
exactly what the checkpoint holds. Groups must be contiguous (g_idx = i // 32: no act-order
reordering, which GGUF cannot express).

Linears compiled on a llama.cpp grid (Option.grid k / ggml: K-quants, Q5_0/Q5_1...) are stored in the
checkpoint as llama.cpp blocks (`.qblocks`, the codes GPTQ chose on that grid) and written as they
are. With such linears the embeddings and output head get the types llama.cpp's quantizer would give
them (`head_types`), unless `heads="f16"`. Otherwise unquantized linears, embeddings and the output
head are F16 (the checkpoint's 16-bit values), norms F32. Llama's q/k rows are permuted as llama.cpp's converter
does (llama.cpp's rope layout); readers (llama.cpp, transformers' gguf loader) undo it.

The tokenizer (byte-level BPE, GGUF's "gpt2" model) and the model's hyper-parameters come from the
checkpoint folder; the pre-tokenizer name is carried from the source GGUF when there is one.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from .. import ggml
from ..errors import QuantcError
from ..family import FAMILIES, family_for, rope_kind, rope_settings
from ..staging import cleans_up_output
from ..packing import unpack_cols, unpack_rows

log = logging.getLogger("quantc")

ARCH = {t: a for f in FAMILIES for t, a in f.gguf.items()}     # model_type -> llama.cpp architecture
BLOCK = 32
# general.file_type from the type most linears have (informational: llama.cpp reads each tensor's type)
FILE_TYPES = {"Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q8_0": "MOSTLY_Q8_0", "Q5_0": "MOSTLY_Q5_0",
              "Q5_1": "MOSTLY_Q5_1", "IQ4_NL": "MOSTLY_IQ4_NL", "Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_M",
              "Q4_K": "MOSTLY_Q4_K_M", "Q5_K": "MOSTLY_Q5_K_M", "Q6_K": "MOSTLY_Q6_K"}


def _codes(qweight, qzeros, scales, g_idx, bits: int, name: str):
    """GPTQ v1 tensors → codes [N, K] (uint8), zero points and scales [N, K/32]."""
    q = unpack_rows(qweight, bits).t().contiguous()            # [N, K]
    zeros = (unpack_cols(qzeros, bits) + 1).t().contiguous()    # [N, G]
    K = q.shape[1]
    if K % BLOCK or scales.shape[0] * BLOCK != K:
        raise QuantcError(f"{name}: GGUF's native types need group size 32 (K={K}, {scales.shape[0]} groups)")
    if not torch.equal(g_idx.long(), torch.arange(K) // BLOCK):
        raise QuantcError(f"{name}: act-order groups (g_idx ≠ i // 32) cannot be written to GGUF; "
                          "compile with quant.static_groups: true or act_order: false")
    return q.numpy().astype(np.uint8), zeros.numpy(), scales.t().contiguous().numpy().astype(np.float16)


def gguf_blocks(qweight, qzeros, scales, g_idx, bits: int, name: str = "linear"):
    """One GPTQ linear → (GGML type, uint8 rows [N, K/32 · block bytes]). Only the mapping from GPTQ's
    (scale, zero) to the type's fields lives here; the block bytes are ggml.pack's (their one home)."""
    from gguf import GGMLQuantizationType as T
    q, z, s = _codes(qweight, qzeros, scales, g_idx, bits, name)
    N, K = q.shape
    mid = 2 ** (bits - 1)
    fields = {"d": torch.from_numpy(s)}                      # fp16 scales [N, K/32]
    if bits == 4:
        if np.all(z == mid):
            t = ggml.TYPES["Q4_0"]                           # value = d·(q − 8)
        else:
            t = ggml.TYPES["Q4_1"]                           # value = d·q + m, m = −scale·zero (fp16)
            fields["m"] = torch.from_numpy(-(s.astype(np.float32) * z.astype(np.float32)))
    elif bits == 8:
        if not np.all(z == mid):
            raise QuantcError(f"{name}: asymmetric 8-bit has no GGUF type (Q8_0 is symmetric)")
        t = ggml.TYPES["Q8_0"]                               # value = d·(q − 128)
    else:
        raise QuantcError(f"{name}: {bits}-bit has no native GGUF type at group 32 (Q4_0, Q4_1, Q8_0)")
    blocks = ggml.pack(t, torch.from_numpy(q), fields)
    return T[t.name], np.ascontiguousarray(blocks.reshape(N, -1).numpy())


def _rope_rows(n: int, heads: int) -> np.ndarray:
    """Row order llama.cpp's converter gives Llama's q/k weights (per head: the two rotary halves
    interleaved); readers undo it."""
    return np.arange(n).reshape(heads, 2, n // heads // 2).swapaxes(1, 2).reshape(-1)


def _rope_theta(cfg: dict, where: str) -> float:
    settings = rope_settings(cfg)
    for kind in (rope_kind(s) for s in settings):
        if kind != "default":
            raise QuantcError(f"{where}: rope type {kind!r} is not written to GGUF by quantc (plain RoPE only)")
    return float(settings[0].get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _tokenizer(writer, folder: Path, vocab_size: int, pre: str) -> None:
    import gguf
    tj_path = folder / "tokenizer.json"
    if not tj_path.is_file():
        raise QuantcError(f"{folder}: no tokenizer.json; GGUF export carries the tokenizer and needs it")
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(tj.get("pre_tokenizer")):
        raise QuantcError(f"{tj_path}: GGUF export writes byte-level BPE tokenizers (GGUF 'gpt2') only; "
                          f"this one is {model.get('type')!r}")
    # one token per embedding row (padded as llama.cpp does); tokens past the embeddings cannot be used
    n = vocab_size
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [gguf.TokenType.UNUSED] * n
    dropped = []
    for tok, i in model["vocab"].items():
        if i < n:
            tokens[i], types[i] = tok, gguf.TokenType.NORMAL
        else:
            dropped.append(tok)
    for a in tj.get("added_tokens", []):
        if a["id"] < n:
            tokens[a["id"]] = a["content"]
            types[a["id"]] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
        else:
            dropped.append(a["content"])
    if dropped:
        log.warning("GGUF: %d tokenizer entries past the %d embedding rows left out: %s", len(dropped), n,
                    ", ".join(dropped[:5]))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n)   # ids past n are left out
    special.add_to_gguf(writer)           # merges, bos/eos/unk/pad ids, add_bos flag, chat template


def _source_pre(source_gguf: str | None) -> str | None:
    """The source GGUF's tokenizer.ggml.pre, when the model came from one that names it."""
    if not source_gguf or not Path(source_gguf).is_file():
        return None
    from gguf import GGUFReader
    field = GGUFReader(source_gguf).fields.get("tokenizer.ggml.pre")
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


# llama.cpp picks its pre-tokenizer (the regexes that split text before BPE) by the name in
# tokenizer.ggml.pre; an unknown or missing name falls back to a default split that differs from
# these tokenizers', silently (llama-vocab.cpp). The name follows from tokenizer.json's pre_tokenizer:
# its split regexes, in order (ByteLevel with use_regex adds GPT-2's, Digits with individual_digits
# adds \p{N}). Each entry: the regexes -> the name llama.cpp's converter writes for that split.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS = {
    (_GPT2_SPLIT,): "gpt-2",                                   # GPT-2's byte-level split alone (SmolLM2)
    (r"\p{N}", _GPT2_SPLIT): "smollm",                        # digits one by one, then GPT-2's
    (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
     r"|\s+(?!\S)|\s+",): "qwen2",                           # Qwen2 / Qwen2.5 / Qwen3
    (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
     r"|\s+(?!\S)|\s+",): "llama-bpe",                       # Llama 3
}


def _splits(pre: dict | None) -> tuple[str, ...] | None:
    """The split regexes of a tokenizer.json pre_tokenizer, in order; None where a step is not a
    plain split (so no name can be inferred)."""
    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre]
    out = []
    for st in steps or []:
        kind = (st or {}).get("type")
        if kind == "Split" and st.get("behavior") == "Isolated" and not st.get("invert") \
                and "Regex" in (st.get("pattern") or {}):
            out.append(st["pattern"]["Regex"])
        elif kind == "Digits" and st.get("individual_digits"):
            out.append(r"\p{N}")
        elif kind == "ByteLevel":
            if st.get("use_regex", True):
                out.append(_GPT2_SPLIT)
        else:
            return None
    return tuple(out)


def pre_tokenizer(tj: dict, where: str, source_pre: str | None = None, override: str | None = None) -> str:
    """tokenizer.ggml.pre for this tokenizer: `override` (export.gguf_pre), else the source GGUF's,
    else the name of its pre_tokenizer's splits (PRE_TOKENIZERS); an unknown split is an error, not
    llama.cpp's silent default."""
    name = override or source_pre or PRE_TOKENIZERS.get(_splits(tj.get("pre_tokenizer")))
    if name is None:
        raise QuantcError(f"{where}: llama.cpp needs the name of this tokenizer's pre-tokenizer "
                          f"(tokenizer.ggml.pre), and quantc does not know its split "
                          f"({json.dumps(tj.get('pre_tokenizer'))[:300]}); set export.gguf_pre to the name llama.cpp's "
                          f"convert_hf_to_gguf.py gives this model, or compile from the model's own GGUF "
                          f"(model.gguf_file), whose name is carried over")
    return name


HEADS = ("llama", "f16")     # export.gguf_heads: embeddings/output as llama.cpp's quantizer types them, or F16


def head_types(folder: Path, cfg: dict, qc: dict, t: dict) -> dict[str, "ggml.GGMLType"]:
    """The types llama.cpp's quantizer (llama-quant.cpp, llama_tensor_get_type) gives the embeddings
    and the output head of a file whose linears are on llama.cpp grids: the output (or the embeddings
    where they are tied to it) Q6_K, Q8_0 when its rows are not whole super-blocks; untied embeddings
    the file's main type (the type most linears' options name), with llama.cpp's fallback.
    Checkpoints without llama.cpp-grid linears keep their 16-bit heads (as before)."""
    from collections import Counter

    from ..runtime import module_option
    named = Counter()
    for key in t:
        if key.endswith(".qblocks"):
            o = module_option(key[: -len(".qblocks")], qc)
            named[(o["grid"], int(o["bits"]), bool(o["sym"]))] += 1
    if not named:
        return {}
    hidden = cfg["hidden_size"]
    out = {}
    fam = family_for(cfg.get("model_type"))
    output, embed = fam.head + ".weight", fam.embed + ".weight"
    head = output if output in t else embed                # tied: one tensor
    main = ggml.main_type(*max(named, key=named.get))
    out[head] = ggml.TYPES["Q8_0" if main.name == "Q8_0" or hidden % 256 else "Q6_K"]
    if head == output and embed in t:
        grid, bits, sym = max(named, key=named.get)
        try:
            out[embed] = ggml.type_for(grid, bits, sym, hidden)
        except QuantcError:             # no type fits its rows: llama.cpp keeps it in 16-bit too
            pass
    return out


@cleans_up_output
def export_gguf(src: str | Path, out: str | Path, *, source_gguf: str | None = None, force: bool = False,
                heads: str = "llama", pre: str | None = None) -> dict:
    """Write out/model.gguf from the GPTQ checkpoint folder `src`; returns what was written per tensor.
    `heads`: "llama" gives the embeddings and output head the types llama.cpp's quantizer would (when
    the linears are on llama.cpp grids: `head_types`), "f16" keeps them as the checkpoint has them.
    `pre`: tokenizer.ggml.pre (export.gguf_pre), else the source GGUF's or the tokenizer's (pre_tokenizer)."""
    if heads not in HEADS:
        raise QuantcError(f"GGUF heads {heads!r}; allowed: {', '.join(HEADS)}")
    head_mode = heads
    import gguf

    from ..runtime import module_option, read_tensors
    folder, out = Path(src), Path(out)
    cfg = json.loads((folder / "config.json").read_text())
    mt = cfg.get("model_type")
    pre = check_source(folder, cfg, source_gguf, pre)
    from ..staging import finalize_output, prepare_output
    final, out = out, prepare_output(out, force, marker="gguf_export.json")   # checked and locked first
    qc = cfg.get("quantization_config") or {}
    t = read_tensors(folder)
    arch, fam = ARCH[mt], family_for(mt)
    layers, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), layers)

    path = out / "model.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(Path(str(cfg.get("_name_or_path") or folder.name)).name)
    w.add_quantized_by(f"quantc {__version__}")
    w.add_context_length(cfg.get("max_position_embeddings", 4096))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(layers)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    w.add_rope_freq_base(_rope_theta(cfg, str(folder / "config.json")))
    w.add_rope_dimension_count(head_dim)
    if arch == "qwen3" or head_dim * heads != cfg["hidden_size"]:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(cfg["vocab_size"])

    report: dict[str, str] = {}
    counts: dict = {}
    quantize_heads = head_types(folder, cfg, qc, t) if head_mode == "llama" else {}
    modules = {k.rsplit(".", 1)[0] for k in t if k.endswith(".qweight")}
    for key in sorted(t):
        base, _, leaf = key.rpartition(".")
        if base in modules and leaf in ("qzeros", "scales", "g_idx"):
            continue
        if leaf == "qblocks":       # a llama.cpp grid: the blocks GPTQ chose, written as they are
            opt = module_option(base, qc)
            if opt is None or opt.get("grid", "gptq") == "gptq":
                raise QuantcError(f"{folder}: {base} holds llama.cpp blocks but config.json names no llama.cpp grid")
            blocks = t[key]
            gt = ggml.stored_type(opt["grid"], int(opt["bits"]), bool(opt["sym"]), blocks.shape[-1])
            qtype = gguf.GGMLQuantizationType[gt.name]
            gname = _gguf_name(names, f"{base}.weight")
            rows = blocks.reshape(blocks.shape[0], -1).numpy()
            w.add_tensor(gname, np.ascontiguousarray(_permute(rows, base, arch, heads, kv_heads, fam)),
                         raw_dtype=qtype)
            report[gname] = qtype.name
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
            continue
        if base in modules and leaf == "qweight":
            opt = module_option(base, qc)
            if opt is None:
                raise QuantcError(f"{folder}: {base} has packed weights but `dynamic` excludes it")
            qtype, rows = gguf_blocks(t[f"{base}.qweight"], t[f"{base}.qzeros"], t[f"{base}.scales"],
                                      t[f"{base}.g_idx"], int(opt["bits"]), base)
            gname = _gguf_name(names, f"{base}.weight")
            w.add_tensor(gname, _permute(rows, base, arch, heads, kv_heads, fam), raw_dtype=qtype)
            report[gname] = qtype.name
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
            continue
        value = t[key]
        if not value.is_floating_point():
            continue
        if key in quantize_heads:      # round-to-nearest on the type's grid, as llama.cpp quantizes them
            gt = quantize_heads[key]
            # row chunks (ggml.RTN_ROWS), each packed at once: a 128k-vocab head's float32 copy, codes and
            # clip-search temporaries would be many GB in one call; the bits are the same
            blocks = torch.cat([ggml.pack(gt, *ggml.rtn(gt, value[r:r + ggml.RTN_ROWS], mse=True))
                                for r in range(0, value.shape[0], ggml.RTN_ROWS)])
            gname = _gguf_name(names, key)
            w.add_tensor(gname, np.ascontiguousarray(blocks.reshape(blocks.shape[0], -1).numpy()),
                         raw_dtype=gguf.GGMLQuantizationType[gt.name])
            report[gname] = gt.name
            continue
        # norms (1-D) in F32, 16-bit matrices as they are stored (F16), anything else in F32
        arr = value.numpy() if value.dim() == 2 and value.dtype == torch.float16 else value.float().numpy()
        gname = _gguf_name(names, key)
        w.add_tensor(gname, np.ascontiguousarray(_permute(arr, base, arch, heads, kv_heads, fam)))
        report[gname] = "F16" if arr.dtype == np.float16 else "F32"
    main = max(counts, key=counts.get) if counts else None
    if main:
        w.add_file_type(gguf.LlamaFileType[FILE_TYPES[main]])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer(w, folder, cfg["vocab_size"], pre)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    info = {"file": path.name, "tensors": report, "types": counts}
    (out / "gguf_export.json").write_text(json.dumps(info, indent=2))
    finalize_output(out, final)
    return info


def check_source(folder: Path, cfg: dict, source_gguf: str | None = None, pre: str | None = None) -> str:
    """What the GGUF writer needs from a model folder, checked before any work (the compile's preflight
    calls this on the source): the gguf package, plain RoPE, a byte-level BPE tokenizer.json whose
    pre-tokenizer llama.cpp can be told (its name is returned: `pre_tokenizer`)."""
    import importlib.util
    mt = cfg.get("model_type")
    if mt not in ARCH:
        raise QuantcError(f"{folder}/config.json: model_type {mt!r} is not supported by the GGUF exporter; "
                          f"supported: {', '.join(ARCH)}")
    if importlib.util.find_spec("gguf") is None:
        raise QuantcError("GGUF export needs the `gguf` package: pip install 'quantc[gguf]'")
    _rope_theta(cfg, str(folder / "config.json"))
    tj_path = folder / "tokenizer.json"
    if not tj_path.is_file():
        raise QuantcError(f"{folder}: no tokenizer.json; GGUF export carries the tokenizer and needs it")
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    if (tj.get("model") or {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(tj.get("pre_tokenizer")):
        raise QuantcError(f"{tj_path}: GGUF export writes byte-level BPE tokenizers (GGUF 'gpt2') only; "
                          f"this one is {(tj.get('model') or {}).get('type')!r}")
    return pre_tokenizer(tj, str(tj_path), _source_pre(source_gguf), pre)


def _gguf_name(names, key: str) -> str:
    g = names.get_name(key, try_suffixes=(".weight", ".bias"))
    if g is None:
        raise QuantcError(f"tensor {key} has no GGUF name")
    return g


def _permute(arr: np.ndarray, base: str, arch: str, heads: int, kv_heads: int, fam) -> np.ndarray:
    if arch != "llama":
        return arr
    q, k, _ = fam.q_k_v                                     # the family's q and k linears (family.py)
    if base.endswith("." + q):
        return arr[_rope_rows(arr.shape[0], heads)]
    if base.endswith("." + k):
        return arr[_rope_rows(arr.shape[0], kv_heads)]
    return arr
