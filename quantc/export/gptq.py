"""GPTQ-format checkpoint: model.safetensors (qweight/qzeros/scales/g_idx per quantized linear,
other weights in 16-bit), config.json with quantization_config (+ quantize_config.json), the
`dynamic` field for modules whose option differs from the default, tokenizer files, and quantc.json
(provenance, per-module options, bytes and file hashes)."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import __version__
from ..gptq import QuantResult
from ..lazy import tensor as lazy_tensor
from ..options import Option
from ..packing import pack_gptq
from ..serve import FUSED_OF


def default_option(options: dict[str, Option]) -> Option:
    """The option most modules use (ties: more bits): it goes in the top-level config."""
    counts = Counter(options.values())
    return max(counts, key=lambda o: (counts[o], o.bits))


def _desc_act(o: Option) -> bool:
    # static groups keep g_idx = i // group_size, so readers need no reordering
    return o.act_order and not o.static_groups


def _fields(o: Option) -> dict:
    return {"bits": o.bits, "group_size": o.group_size, "sym": o.sym, "desc_act": _desc_act(o)}


def _pattern(names: list[str]) -> str:
    """One anchored regex for linears under one sub-module prefix: their own names and, for members of
    a linear vLLM fuses (q/k/v → qkv_proj, gate/up → gate_up_proj), the fused name too."""
    prefix = names[0].rsplit(".", 1)[0]
    own = [n.rsplit(".", 1)[1] for n in names]
    alts = list(dict.fromkeys(own + [FUSED_OF[s][1] for s in own if s in FUSED_OF]))
    body = alts[0] if len(alts) == 1 else "(" + "|".join(alts) + ")"
    return "^" + re.escape(prefix) + r"\." + body + "$"


def dynamic_field(options: dict[str, Option], skipped: list[str], default: Option) -> dict:
    """GPTQModel/vLLM `dynamic`: "+:regex" overrides the default option, "-:regex" leaves a module
    unquantized; the first matching entry wins. Linears of the same sub-module prefix (self_attn, mlp)
    with the same option share one entry, and every entry also names vLLM's fused linear of its
    members, so vLLM (which asks with qkv_proj / gate_up_proj) finds the same option."""
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


def quantization_config(options: dict[str, Option], skipped: list[str], damp: float, true_sequential: bool) -> dict:
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
    return qc


def quantized_tensors(name: str, res: QuantResult, opt: Option, bias: torch.Tensor | None, dtype) -> dict:
    t = pack_gptq(res.q, res.zeros, res.scales, res.g_idx, opt.bits)
    out = {f"{name}.{k}": v for k, v in t.items()}
    if bias is not None:
        out[f"{name}.bias"] = bias.detach().to(dtype).contiguous()
    return out


def write_gptq(folder: Path, model, results: dict[str, QuantResult], options: dict[str, Option],
               skipped: list[str], *, tokenizer=None, damp: float = 0.01, true_sequential: bool = True,
               dtype: torch.dtype = torch.float16) -> dict:
    """Write the checkpoint into `folder` (an empty temporary folder: the caller renames it into
    place). Returns the quantization_config written."""
    mods = dict(model.named_modules())
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for name, res in results.items():
        bias = lazy_tensor(model, f"{name}.bias", state) if mods[name].bias is not None else None
        tensors.update(quantized_tensors(name, res, options[name], bias, dtype))
    quantized = set(results)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for key in state:
        owner, _, leaf = key.rpartition(".")
        if owner in quantized:
            continue
        if tied and key == "lm_head.weight":
            continue                     # tied to the embeddings: readers re-tie it
        value = lazy_tensor(model, key, state)  # released layers of a lazy model are read from disk again
        tensors[key] = value.detach().to(dtype if value.is_floating_point() else value.dtype).contiguous()
    tensors = dict(sorted(tensors.items()))      # canonical order: a resumed compile writes the same bytes
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})  # one key: stable bytes

    qc = quantization_config(options, skipped, damp, true_sequential)
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
