"""Test helper: what vLLM and GPTQModel give each linear of a GPTQ checkpoint under its `dynamic` field.

The vLLM half mirrors the rules read in vllm-project/vllm,
  vllm/model_executor/layers/quantization/utils/gptq_utils.py
    (get_dynamic_override, override_config, is_layer_gptq_quantized, get_linear_quant_method)
  vllm/model_executor/layers/quantization/gptq_marlin.py (GPTQMarlinConfig.TYPE_MAP)
written from scratch here, not copied:
- vLLM asks once per linear it builds, with its own module name: Llama/Mistral/Qwen2/Qwen3 load q/k/v
  as one `qkv_proj` and gate/up as one `gate_up_proj` (packed_modules_mapping); o/down as they are.
- The `dynamic` entries are tried in order, each regex with `re.match` (anchored at the start only):
  the first "-:" match leaves the linear unquantized, the first "+:" match returns its dict, whose keys
  (bits, group_size, desc_act, and sym for GPTQ-Marlin) replace the top-level value; a missing key keeps
  the top-level one. No match: the top-level config.
- A fused linear's shards must agree on being quantized (else vLLM raises).
- Under GPTQ-Marlin the resulting (bits, sym) must be (4, True) or (8, True), else vLLM raises.

The GPTQModel half calls GPTQModel's own parser (gptqmodel.quantization.config.QuantizeConfig
.dynamic_get, read in site-packages gptqmodel/quantization/config.py of gptqmodel 7.6.0).
"""
from __future__ import annotations

import re

FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
MARLIN_TYPES = {(4, True), (8, True)}
KEYS = ("bits", "group_size", "sym", "desc_act")


def vllm_match(dynamic: dict, layer_name: str):
    """False (a "-:" entry matched first), the dict of the first "+:" entry that matched, or None."""
    for pattern, fields in dynamic.items():
        if pattern.startswith("-:"):
            if re.match(pattern[2:], layer_name):
                return False
        elif re.match(pattern[2:] if pattern.startswith("+:") else pattern, layer_name):
            return fields
    return None


def vllm_config(qc: dict, layer_name: str) -> dict | None:
    """bits/group_size/sym/desc_act vLLM gives linear `layer_name` (None: unquantized)."""
    m = vllm_match(qc.get("dynamic") or {}, layer_name)
    if m is False:
        return None
    base = {k: qc[k] for k in KEYS}
    return {k: (m or {}).get(k, base[k]) for k in KEYS}


def vllm_linears(module_names) -> dict[str, list[str]]:
    """The linears vLLM builds for these HF module names → the HF modules (shards) each one loads."""
    out: dict[str, list[str]] = {}
    member_of = {m: f for f, ms in FUSED.items() for m in ms}
    for name in module_names:
        prefix, _, short = name.rpartition(".")
        key = f"{prefix}.{member_of[short]}" if short in member_of else name
        out.setdefault(key, []).append(name)
    return out


def replay_vllm(qc: dict, expected: dict[str, dict | None], marlin: bool = False) -> dict[str, dict | None]:
    """Replay vLLM on every linear, fused and unfused names both, and compare with `expected`
    (HF module name → {bits, group_size, sym, desc_act} or None for a module kept in 16-bit).
    Returns what each vLLM linear got. Raises AssertionError naming the first mismatch."""
    got = {}
    for vname, shards in vllm_linears(expected).items():
        status = {s: expected[s] is not None for s in shards}
        assert len(set(status.values())) == 1, f"{vname}: some but not all shards quantized {status}"
        cfg = vllm_config(qc, vname)
        got[vname] = cfg
        for s in shards:
            assert cfg == expected[s], f"vLLM gives {vname} {cfg}, but its shard {s} is {expected[s]}"
            own = vllm_config(qc, s)                  # the unfused name too (readers that do not fuse)
            assert own == expected[s], f"{s} (unfused) gets {own}, expected {expected[s]}"
        if marlin and cfg is not None:
            assert (cfg["bits"], cfg["sym"]) in MARLIN_TYPES, f"GPTQ-Marlin cannot run {vname}: {cfg}"
    return got


# vLLM's packed_modules_mapping by model: fused linear leaf -> the checkpoint leaves it loads. Phi-3's
# (vllm/model_executor/models/phi3.py) maps each fused name to itself: its HF checkpoints hold them fused.
PACKED = {"llama": FUSED, "phi3": {"qkv_proj": ("qkv_proj",), "gate_up_proj": ("gate_up_proj",)}}


def vllm_quantized(qc: dict, prefix: str, tensor_names, packed: dict) -> bool:
    """Whether vLLM builds linear `prefix` (its own name, fused or not) with the GPTQ method, by
    is_layer_gptq_quantized after maybe_update_config: the quantized modules are the entries of
    `modules_in_block_to_quantize`, or, without it, the modules of the checkpoint's tensors that are
    not 16/32-bit floats (qweight, qzeros, g_idx); a linear is quantized when one of them lies inside
    (is a substring of) the name of each of its shards, and its shards must agree."""
    layers = [n for group in qc.get("modules_in_block_to_quantize") or [] for n in group]
    if not layers:
        layers = sorted({n.rsplit(".", 1)[0] for n in tensor_names if n.endswith((".qweight", ".qzeros", ".g_idx"))})
    head, _, leaf = prefix.rpartition(".")
    shards = [f"{head}.{s}" for s in packed.get(leaf, (leaf,))]
    status = {s: any(layer in s for layer in layers) for s in shards}
    assert len(set(status.values())) == 1, f"vLLM raises: {prefix}'s shards disagree on being quantized {status}"
    return status[shards[0]]


def replay_gptqmodel(qc: dict, expected: dict[str, dict | None]) -> None:
    """Read `dynamic` through GPTQModel's own parser for every module and compare with `expected`."""
    from gptqmodel.quantization.config import QuantizeConfig
    c = QuantizeConfig.from_quant_config(dict(qc))
    base = {"bits": int(c.bits), "group_size": int(c.group_size), "sym": bool(c.sym), "desc_act": bool(c.desc_act)}
    for name, exp in expected.items():
        if c.dynamic_get(layer_name=name) is False:
            got = None
        else:
            got = {k: c.dynamic_get(name, k, base[k]) for k in KEYS}
            got = {"bits": int(got["bits"]), "group_size": int(got["group_size"]), "sym": bool(got["sym"]),
                   "desc_act": bool(got["desc_act"])}
        assert got == exp, f"GPTQModel reads {name} as {got}, expected {exp}"


def expected_from_manifest(manifest: dict) -> dict[str, dict | None]:
    """HF module name → what quantc wrote (quantc.json), in the `dynamic` fields' terms."""
    out: dict[str, dict | None] = {}
    for name, m in manifest["modules"].items():
        out[name] = {"bits": m["bits"], "group_size": m["group_size"], "sym": m["sym"],
                     "desc_act": bool(m["act_order"] and not m["static_groups"])}
    out.update({n: None for n in manifest["skipped"]})
    return out
