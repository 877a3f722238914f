"""GPTQ-format checkpoint: model.safetensors, or shards with an index for big models (qweight/qzeros/
scales/g_idx per quantized linear, other weights in 16-bit), assembled from the quantize sweep's
per-layer shards, config.json with quantization_config (+ quantize_config.json), the
`dynamic` field for modules whose option differs from the default, tokenizer files, and quantc.json
(provenance, per-module options, bytes and file hashes)."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from .. import __version__, ggml, tensorfile
from ..gptq import QuantResult
from ..lazy import tensor as lazy_tensor
from ..options import Option
from ..packing import pack_gptq
from ..family import FUSED_OF, family_of
from ..model import decoder_layers


def default_option(options: dict[str, Option]) -> Option:
    """The option of the top-level config: the symmetric option most modules use (ties: more bits),
    or the most used one when none is symmetric. Symmetric first because GPTQModel refuses a v1
    checkpoint whose top-level `sym` is false unless GPTQModel wrote it (auto-gptq's old asymmetric
    zero-point bug), while it loads asymmetric modules named in `dynamic`."""
    counts = Counter(options.values())
    pool = [o for o in counts if o.sym] or list(counts)
    return max(pool, key=lambda o: (counts[o], o.bits))


def _desc_act(o: Option) -> bool:
    # static groups keep g_idx = i // group_size, so readers need no reordering
    return o.act_order and not o.static_groups


def _fields(o: Option) -> dict:
    f = {"bits": o.bits, "group_size": o.group_size, "sym": o.sym, "desc_act": _desc_act(o)}
    if o.grid != "gptq":          # llama.cpp blocks (`.qblocks`), read by quantc.load and the GGUF writer
        f["grid"] = o.grid
    return f


def _pattern(names: list[str]) -> str:
    """One anchored regex for linears under one sub-module prefix: their own names and, where every
    member of a linear vLLM fuses (q/k/v → qkv_proj, gate/up → gate_up_proj) is among them, the fused
    name too. vLLM asks with the fused name and applies the answer to every member, so a fused name
    written for some members only would give the others a width their tensors do not have."""
    prefix = names[0].rsplit(".", 1)[0]
    own = [n.rsplit(".", 1)[1] for n in names]
    alts = list(dict.fromkeys(own + [FUSED_OF[s][1] for s in own
                                     if s in FUSED_OF and set(FUSED_OF[s][0]) <= set(own)]))
    body = alts[0] if len(alts) == 1 else "(" + "|".join(alts) + ")"
    return "^" + re.escape(prefix) + r"\." + body + "$"


def dynamic_field(options: dict[str, Option], skipped: list[str], default: Option) -> dict:
    """GPTQModel/vLLM `dynamic`: "+:regex" overrides the default option, "-:regex" leaves a module
    unquantized; the first matching entry wins. Linears of the same sub-module prefix (self_attn, mlp)
    with the same option share one entry, and an entry that holds all members of one of vLLM's fused
    linears also names it, so vLLM (which asks with qkv_proj / gate_up_proj) finds the same option."""
    groups: dict[tuple, list[str]] = {}
    for name, opt in options.items():
        if opt != default:
            groups.setdefault((name.rsplit(".", 1)[0], opt), []).append(name)
    dyn = {"+:" + _pattern(names): _fields(opt) for (_, opt), names in groups.items()}
    unquantized: dict[str, list[str]] = {}
    for name in skipped:
        unquantized.setdefault(name.rsplit(".", 1)[0], []).append(name)
    dyn.update({"-:" + _pattern(names): {} for names in unquantized.values()})
    return dyn


def quantization_config(options: dict[str, Option], skipped: list[str], damp: float, true_sequential: bool,
                        in_block: tuple[str, ...] | None = None) -> dict:
    """The GPTQ quantization_config. `in_block`: the linears of one decoder layer as vLLM builds them,
    written as `modules_in_block_to_quantize` (family.Family.vllm_in_block: only where the checkpoint's
    names differ from them)."""
    default = default_option(options)
    qc = {
        **_fields(default),
        "static_groups": default.static_groups,
        "lm_head": False,
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "true_sequential": true_sequential,
        "damp_percent": damp,
        "meta": {"quantizer": [f"quantc:{__version__}"], "uri": "https://github.com/quantc/quantc"},
    }
    dyn = dynamic_field(options, skipped, default)
    if dyn:
        qc["dynamic"] = dyn
    if in_block:
        qc["modules_in_block_to_quantize"] = [[n] for n in in_block]
    return qc


def quantized_tensors(name: str, res: QuantResult, opt: Option, bias: torch.Tensor | None, dtype) -> dict:
    if res.ggml is not None:      # a llama.cpp grid: its blocks as llama.cpp stores them [out, blocks, bytes]
        t = {"qblocks": ggml.pack(ggml.TYPES[res.ggml], res.q, res.fields)}
    else:
        t = pack_gptq(res.q, res.zeros, res.scales, res.g_idx, opt.bits)
    out = {f"{name}.{k}": v for k, v in t.items()}
    if bias is not None:
        out[f"{name}.bias"] = bias.detach().to(dtype).contiguous()
    return out


MAX_SHARD_BYTES = 5 * 10**9     # as transformers' save_pretrained: one file below this, shards above


def layer_tensors(model, i: int, results: dict[str, QuantResult], options: dict[str, Option],
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor of decoder layer i: the packed quantized linears (+ bias) and the
    layer's other weights in `dtype` (read from the source, so a lazy layer may be released)."""
    fam = family_of(model)
    prefix = fam.prefix(i)
    layer = decoder_layers(model)[i]
    state = {prefix + k: v for k, v in layer.state_dict().items()}   # meta when released: read from disk
    out: dict[str, torch.Tensor] = {}
    for name, res in results.items():
        bias = f"{name}.bias"
        bias = lazy_tensor(model, bias, state) if bias in state else None
        parts = fam.exported(name)
        for k, part in enumerate(parts):        # one linear, or its equal row blocks (Phi-3's gate/up)
            out.update(quantized_tensors(part, _rows(res, k, len(parts)), options[name],
                                         None if bias is None else bias.chunk(len(parts))[k], dtype))
    for key in state:
        module, _, leaf = key.rpartition(".")
        if module not in results:
            parts = fam.exported(module)
            value = _export(lazy_tensor(model, key, state), dtype)
            out.update({f"{part}.{leaf}": v.contiguous() for part, v in zip(parts, value.chunk(len(parts)))}
                       if len(parts) > 1 else {key: value})
    return out


def _rows(res: QuantResult, k: int, n: int) -> QuantResult:
    """Row block k of n of a quantized linear (rows are quantized independently: each block is one)."""
    if n == 1:
        return res
    rows = res.q.shape[0] // n
    sl = slice(k * rows, (k + 1) * rows)
    if res.ggml is not None:      # llama.cpp blocks: codes and every field are [out, ...], no g_idx
        return QuantResult(res.q[sl], None, None, None, None, res.damp, ggml=res.ggml,
                           fields={f: v[sl] for f, v in res.fields.items()})
    return QuantResult(res.q[sl], res.scales[:, sl], res.zeros[:, sl], res.g_idx.clone(), None, res.damp)


def _export(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return value.detach().to(dtype if value.is_floating_point() else value.dtype).contiguous()


def outside_entries(model, dtype: torch.dtype) -> dict[str, tensorfile.Entry]:
    """The tensors outside the decoder layers (embeddings, final norm, untied lm_head), each made in
    `dtype` when it is written (tensorfile.write: one at a time)."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = model.state_dict()
    fam = family_of(model)
    layers, head = fam.layers + ".", fam.head + ".weight"
    out = {}
    for key, v in state.items():
        if key.startswith(layers) or (tied and key == head):
            continue                     # layers come from their shards; a tied lm_head is re-tied by readers
        out[key] = tensorfile.tensor_entry(lambda key=key: _export(lazy_tensor(model, key, state), dtype),
                                           dtype if v.is_floating_point() else v.dtype, v.shape)
    return out


def write_gptq(folder: Path, model, layer_shards: list[Path], options: dict[str, Option],
               skipped: list[str], *, tokenizer=None, damp: float = 0.01, true_sequential: bool = True,
               dtype: torch.dtype = torch.float16, max_shard_bytes: int | None = None) -> dict:
    """Write the checkpoint into `folder` (the staging folder: the caller renames it into place) from
    the per-layer shards the quantize sweep wrote (`layer_tensors`, one file per decoder layer, in
    order). Up to `max_shard_bytes` one `model.safetensors`; above, `model-0000k-of-0000n.safetensors`
    files of whole layers and `model.safetensors.index.json`, as transformers saves big models. Each
    file is written one tensor at a time (tensorfile.write: the layers' tensors copied from their
    shards by byte ranges, the others made one by one), so the export holds one tensor, not a
    file's worth; the bytes are those safetensors' own writer gives (a resumed compile writes the
    same bytes). Returns the quantization_config written."""
    max_shard_bytes = MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes
    outside = outside_entries(model, dtype)
    shards = [tensorfile.file_entries(p) for p in layer_shards]
    sizes = [p.stat().st_size for p in layer_shards]         # with their headers, as the layout has been decided
    meta = {"format": "pt"}
    if sum(sizes) + sum(e.nbytes for e in outside.values()) <= max_shard_bytes:
        entries = dict(outside)
        for s in shards:
            entries.update(s)
        tensorfile.write(folder / "model.safetensors", entries, meta)
    else:
        groups, cur, size = [], [], 0
        for s, n in zip(shards, sizes):
            if cur and size + n > max_shard_bytes:
                groups.append(cur)
                cur, size = [], 0
            cur.append(s)
            size += n
        groups.append(cur)
        total, weight_map, nbytes = len(groups) + 1, {}, 0
        for k, group in enumerate([[outside]] + groups, 1):
            name = f"model-{k:05d}-of-{total:05d}.safetensors"
            entries = {key: e for s in group for key, e in s.items()}
            nbytes += tensorfile.write(folder / name, entries, meta)
            weight_map.update({key: name for key in entries})
        index = {"metadata": {"total_size": nbytes},        # tensor bytes, as transformers writes it
                 "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    fam = family_of(model)            # `dynamic` names the modules as written (Phi-3: gate_proj, up_proj)
    qc = quantization_config({p: o for n, o in options.items() for p in fam.exported(n)},
                             [p for n in skipped for p in fam.exported(n)], damp, true_sequential,
                             fam.vllm_in_block())
    config = model.config.to_dict()
    config["quantization_config"] = qc
    config["dtype"] = str(dtype).replace("torch.", "")
    config.pop("torch_dtype", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (folder / "quantize_config.json").write_text(json.dumps(qc, indent=2))
    if getattr(model, "generation_config", None) is not None:
        try:
            model.generation_config.save_pretrained(folder)
        except Exception:  # an invalid generation config of the source must not lose the artifact
            pass
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return qc
