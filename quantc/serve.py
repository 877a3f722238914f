"""Serving targets: which quantization options each runtime loads and runs, in one table.

`serve: [vllm, onnx]` in the budget YAML turns these into plan constraints. Config validation
(candidates, overrides, quant.units), plan reading (`--plan`), the allocator and the final
per-module options of a compile all ask `check`; nothing else in quantc knows a runtime's limits.

What each table says, and where it comes from:
- vllm: vLLM picks its GPTQ-Marlin kernels for a GPTQ checkpoint whose top-level config is
  symmetric 4/8-bit (`GPTQMarlinConfig.TYPE_MAP`: uint4b8, uint8b128; `MARLIN_SUPPORTED_GROUP_SIZES`
  -1, 32, 64, 128), and every `dynamic` override then goes through the same type check
  (`gptq_utils.override_config` raises on any other bits/sym). It loads q/k/v as one fused
  `qkv_proj` and gate/up as `gate_up_proj`: one config per fused module, and all shards either
  quantized or not (`is_layer_gptq_quantized`). (The legacy exllama `--quantization gptq` path reads
  2/3-bit too, but it is not what vLLM chooses, and quantc does not target it.) Which linears it
  fuses is a family fact (quantc/family.py: Llama/Mistral/Qwen2/Qwen3/Gemma 3 fuse q/k/v and
  gate/up; Phi-3's checkpoint holds qkv_proj and gate_up_proj, which vLLM maps to themselves, so its
  export names them in modules_in_block_to_quantize: Family.vllm_in_block).
- onnx: ONNX Runtime's `MatMulNBits` (quantc/export/onnx.py) runs 2, 4 and 8 bits, symmetric or
  not, at every group size quantc writes. 3-bit layers are exported in a 4-bit container: exact,
  but with the memory of 4-bit, so under a budget meant for ONNX Runtime a 3-bit option would
  cost 4-bit bytes with 3-bit error. It is not offered.
- gguf: llama.cpp's native group-32 types (Q4_0 = symmetric 4-bit, Q4_1 = asymmetric 4-bit,
  Q8_0 = symmetric 8-bit), contiguous groups only (no g_idx): what quantc/export/gguf.py writes.
  `export.targets: [gguf]` implies this target. Options on a llama.cpp grid (`grid: k`, the
  K-quants Q2_K…Q6_K, and `grid: ggml`, Q4_0…Q8_0 incl. Q5_0/Q5_1: ggml.py) are llama.cpp's own
  blocks: only this target runs them (vLLM and ONNX Runtime have no kernels for them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from .errors import ConfigError
from .family import FUSED_OF   # vLLM's fused linears (each family's packed_modules_mapping), by member
from .options import Option


@dataclass(frozen=True)
class Runtime:
    title: str
    kinds: tuple[tuple[int, bool], ...]          # (bits, sym) pairs the runtime runs
    group_sizes: tuple[int, ...] | None = None   # None: every group size quantc writes
    fused: bool = False            # q/k/v and gate/up load as one linear: one option for all members
    contiguous_groups: bool = False  # needs g_idx = i // group_size (no act-order reordering)
    why: str = ""                  # the runtime's rule, in words (shown in errors)
    grids: tuple[str, ...] = ("gptq",)   # Option.grid values it runs; a llama.cpp grid fixes the rest

    def allowed(self) -> str:
        kinds = ", ".join(f"{b}-bit {'sym' if s else 'asym'}" for b, s in self.kinds)
        gs = "any" if self.group_sizes is None else ", ".join(map(str, self.group_sizes))
        return f"{kinds}; group_size {gs}"


RUNTIMES: dict[str, Runtime] = {
    "vllm": Runtime(
        "vLLM (GPTQ-Marlin)", kinds=((4, True), (8, True)), group_sizes=(-1, 32, 64, 128), fused=True,
        why="vLLM runs GPTQ checkpoints with its GPTQ-Marlin kernels: symmetric 4- and 8-bit only, "
            "group size -1, 32, 64 or 128"),
    "onnx": Runtime(
        "ONNX Runtime (MatMulNBits)", kinds=((2, True), (2, False), (4, True), (4, False), (8, True), (8, False)),
        why="ONNX Runtime's MatMulNBits runs 2, 4 and 8 bits; 3-bit layers would sit in a 4-bit container "
            "(the memory of 4-bit with the error of 3-bit)"),
    "gguf": Runtime(
        "llama.cpp (GGUF)", kinds=((4, True), (4, False), (8, True)), group_sizes=(32,), contiguous_groups=True,
        why="llama.cpp's native types are Q4_0 (4-bit sym), Q4_1 (4-bit asym) and Q8_0 (8-bit sym), "
            "blocks of 32 contiguous weights, or an option on a llama.cpp grid (grid: k or ggml)",
        grids=("gptq", "k", "ggml")),
}
TARGETS = tuple(RUNTIMES)


@dataclass(frozen=True)
class Violation:
    """One thing a target cannot run: `name` (a module, a unit, `candidates[1]`...) gets `option`."""
    name: str
    option: Option | None          # None: kept in 16-bit
    target: str
    field: str                     # bits | sym | group_size | act_order | fused
    reason: str

    def __str__(self) -> str:
        return f"{self.name} ({describe(self.option)}) cannot be served by {self.target}: {self.reason}"


def describe(o: Option | None) -> str:
    if o is None:
        return "16-bit, unquantized"
    if o.grid != "gptq":
        return f"llama.cpp {o.ggml_type.name}, grid {o.grid}"
    gs = "per channel" if o.group_size <= 0 else f"group {o.group_size}"
    return f"{o.bits}-bit {'sym' if o.sym else 'asym'}, {gs}"


def option_problem(o: Option, target: str) -> Violation | None:
    """Why `target` cannot run option `o` (None when it can)."""
    rt = RUNTIMES[target]
    allowed = f"allowed for {target}: {rt.allowed()}"
    if o.grid not in rt.grids:
        return Violation("", o, target, "grid", f"{rt.title} has no kernels for llama.cpp's blocks (grid: {o.grid}); "
                                                f"only gguf serves them: use grid: gptq ({allowed})")
    if o.grid != "gptq":
        return None                   # the llama.cpp type fixes bits, sym and groups
    if (o.bits, o.sym) not in rt.kinds:
        field = "bits" if o.bits not in {b for b, _ in rt.kinds} else "sym"
        return Violation("", o, target, field, f"{rt.why} ({allowed})")
    if rt.group_sizes is not None and o.group_size not in rt.group_sizes:
        return Violation("", o, target, "group_size", f"{rt.why} ({allowed})")
    if rt.contiguous_groups and o.act_order and not o.static_groups:
        return Violation("", o, target, "act_order", f"{rt.title} has no g_idx: act-order needs "
                                                     "static_groups: true (contiguous groups)")
    return None


def check(options: Mapping[str, Option | None], targets: Iterable[str]) -> list[Violation]:
    """Everything in `options` (name → option, None = kept in 16-bit) that a target cannot run.
    Names that are full module names (…self_attn.q_proj) are also checked as vLLM fuses them: the
    members of one fused linear need one option (or all stay 16-bit)."""
    out: list[Violation] = []
    for target in targets:
        rt = RUNTIMES[target]
        for name, o in options.items():
            if o is not None:
                v = option_problem(o, target)
                if v is not None:
                    out.append(Violation(name, o, target, v.field, v.reason))
        if rt.fused:
            out.extend(_fused_problems(options, target))
    return out


def _fused_problems(options: Mapping[str, Option | None], target: str) -> list[Violation]:
    groups: dict[tuple[str, str], list[str]] = {}
    for name in options:
        prefix, _, short = name.rpartition(".")
        if short in FUSED_OF:
            groups.setdefault((prefix, FUSED_OF[short][1]), []).append(name)
    out = []
    for (prefix, fused), names in groups.items():
        first = options[names[0]]
        for n in names[1:]:
            if options[n] != first:
                out.append(Violation(
                    n, options[n], target, "fused",
                    f"{RUNTIMES[target].title} loads {prefix}.{fused} as one fused linear, so its members need "
                    f"one option, but {names[0].rpartition('.')[2]} has {describe(first)}; give "
                    f"{'/'.join(m.rpartition('.')[2] for m in names)} the same option (overrides and keep_fp16 "
                    "must match all of them)"))
                break
    return out


def parse_targets(value, file: str, key: str = "serve") -> list[str]:
    """The YAML's `serve` value (a name or a list of names) → checked target names."""
    items = value if isinstance(value, list) else [value]
    out = []
    for t in items:
        if not isinstance(t, str) or t not in RUNTIMES:
            raise ConfigError(file, key, f"{t!r} is not a known serving target; allowed: {', '.join(TARGETS)}")
        if t not in out:
            out.append(t)
    return out


def refuse(violations: list[Violation], file: str, key: str) -> None:
    """Raise a ConfigError (file, key) naming the first violation, if any."""
    if violations:
        v = violations[0]
        more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
        raise ConfigError(file, key, f"{v}{more}")


def targets_for(cfg) -> list[str]:
    """The runtimes a compile must fit: `serve`, plus gguf when it is an export target."""
    return list(cfg.serve) + (["gguf"] if "gguf" in cfg.export_targets and "gguf" not in cfg.serve else [])


def check_modules(options: Mapping[str, Option], skipped: Iterable[str], targets: Iterable[str],
                  file: str) -> None:
    """The final per-module options of a compile (skipped modules stay 16-bit)."""
    targets = list(targets)
    if targets:
        refuse(check({**options, **{n: None for n in skipped}}, targets), file, "serve")


_QUANT_KEY = {"bits": "quant.bits", "sym": "quant.sym", "group_size": "quant.group_size",
              "act_order": "quant.act_order", "grid": "quant.grid"}


def check_config(cfg, file: str, explicit_candidates: bool) -> None:
    """The budget YAML against its targets (targets_for), before any work: every candidate, every
    override (applied to every candidate, as the compile may apply it) and the unit mode."""
    targets = targets_for(cfg)
    if "onnx" in cfg.export_targets:     # the ONNX exporter writes MatMulNBits: no llama.cpp blocks
        onnx = [*(f"candidates[{i}]" for i, o in enumerate(cfg.candidates) if o.grid != "gptq"),
                *(f"overrides[{i}]" for i, (_, f) in enumerate(cfg.overrides) if f.get("grid", "gptq") != "gptq")]
        if onnx:
            raise ConfigError(file, "quant.grid" if onnx[0].startswith("cand") and not explicit_candidates else onnx[0],
                              "export.targets has onnx, but ONNX Runtime cannot run llama.cpp's blocks (grid: k / "
                              "ggml); use grid: gptq, or export gguf only")
    if not targets:
        return
    for i, o in enumerate(cfg.candidates):
        vs = check({f"candidate {o.label}": o}, targets)
        if vs:
            key = f"candidates[{i}]" if explicit_candidates else _QUANT_KEY.get(vs[0].field, "quant")
            refuse(vs, file, key)
    for i, (_, fields) in enumerate(cfg.overrides):
        if fields.get("skip"):
            continue
        changes = {k: v for k, v in fields.items() if k != "skip"}
        for base in cfg.candidates:
            try:
                o = Option(**{**base.to_dict(), **changes})
            except ValueError as e:
                raise ConfigError(file, f"overrides[{i}]", f"applied to candidate {base.label}: {e}") from None
            refuse(check({f"overrides[{i}]": o}, targets), file, f"overrides[{i}]")
    fused = [t for t in targets if RUNTIMES[t].fused]
    if fused and cfg.units != "shared":
        raise ConfigError(file, "quant.units", f"{cfg.units!r} lets q/k/v (and gate/up) get different options, but "
                          f"{RUNTIMES[fused[0]].title} (serve: {fused[0]}) loads them as one fused linear; "
                          "use quant.units: shared")
