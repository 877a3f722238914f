"""The budget YAML: parsed and validated before any heavy work.

Every error names the file, the key and what is allowed (ConfigError). See README for the schema.
"""
from __future__ import annotations

import itertools
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .ggml import GRID_BITS, GRIDS
from .options import Option
from .packing import SUPPORTED_BITS
from .rotate import ROTATIONS

log = logging.getLogger("quantc")

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
EXPORT_TARGETS = ("gptq", "onnx", "gguf")   # the GPTQ checkpoint is always written; onnx/gguf add out/onnx|gguf/
METHODS = ("gptq", "rtn")
UNIT_MODES = ("shared", "linear")

SCHEMA: dict[str, tuple] = {
    "model": (str, dict),
    "budget": (dict,),
    "quant": (dict,),
    "candidates": (list, str),
    "keep_fp16": (list,),
    "overrides": (list,),
    "calibration": (dict,),
    "export": (dict,),
    "plan": (dict,),
    "resources": (dict,),
    "serve": (list, str),
}
MODEL_KEYS = {"path": str, "gguf_file": str, "trust_remote_code": bool, "revision": str, "allow_pickle": bool}
BUDGET_KEYS = {"avg_bits": (int, float), "memory": (int, float, str), "max_delta_loss": (int, float)}
QUANT_KEYS = {"bits": (int, list), "group_size": (int, list), "sym": bool, "act_order": bool,
              "static_groups": bool, "mse": bool, "method": str, "damp": (int, float),
              "qep_alpha": (int, float), "units": str, "true_sequential": bool, "block_size": int,
              "rotate": str, "rotate_seed": int, "grid": str}
OPTION_KEYS = {"bits": int, "group_size": int, "sym": bool, "act_order": bool, "static_groups": bool,
               "mse": bool, "grid": str}
CALIB_KEYS = {"source": str, "samples": int, "seq_len": int, "seed": int, "text_field": str,
              "batch_size": int, "check_samples": int}
EXPORT_KEYS = {"targets": (list, str), "dtype": str, "gguf_heads": str, "gguf_pre": str}
RESOURCE_KEYS = {"lazy_load": bool, "offload_activations": bool, "device": str, "compute_dtype": str}
PLAN_KEYS = {"measure_samples": int, "alpha_samples": int, "alpha_seq_len": int, "noise": (int, float),
             "direct_bits": int, "predictor": str, "probes": int, "solve": str, "qep_discount": (int, float),
             "check_uniform": bool}
PREDICTORS = ("fisher", "exact")          # see passes/measure.py
SOLVES = ("anchors", "all")               # fisher: which options GPTQ solves for every unit (passes/measure.py)

# Error propagation (QEP) is on by default for GPTQ: α = 0.5 lowered the perplexity of uniform 4-bit on
# both benchmark models and of SmolLM2's unrotated mixed plans (benchmarks/RESULTS.md: bench_ablation,
# bench_mixed), for about 2× the compile time. `quant.qep_alpha: 0` gives plain sequential GPTQ.
DEFAULT_QEP_ALPHA = 0.5

# Named candidate sets (`candidates: NAME`). Options are (bits, group_size, sym); quant.act_order,
# static_groups and mse apply to each. Symmetric and asymmetric grids cost the same bytes (GPTQ v1
# stores qzeros either way), so both are offered where the zero point buys accuracy (3, 4 bits);
# 2-bit only asymmetric (a symmetric 2-bit grid wastes a level), 8-bit only symmetric (what vLLM and
# llama.cpp run, and the zero point buys nothing measurable there).
_WIDE_GROUPS = (32, 64, 128)
CANDIDATE_SETS: dict[str, tuple[tuple[int, int, bool], ...]] = {
    "wide": tuple([(2, g, False) for g in _WIDE_GROUPS]
                  + [(b, g, s) for b in (3, 4) for s in (True, False) for g in _WIDE_GROUPS]
                  + [(8, g, True) for g in _WIDE_GROUPS]),
}
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class PlanSettings:
    measure_samples: int = 32      # calibration sequences whose Hessians measure every option
    alpha_samples: int = 16        # held-out sequences on which the fisher predictor is scaled (and α measured):
    #                                4 left its level at the luck of 4 documents (measured/predicted 1.27–1.33 on
    #                                Qwen2.5-Coder, 0.96–1.12 with 16; RESULTS.md "held-out slice"), for 1.5× the
    #                                measurement's time
    alpha_seq_len: int = 256       # ... truncated to this many tokens
    noise: float = 0.01            # relative output error injected to estimate α
    direct_bits: int = 4           # exact predictor: options with ≤ this many bits get their ΔKL measured (0: α·err only)
    predictor: str = "fisher"      # fisher: O(L) backward-sweep estimate, calibrated; exact: measured tails, O(L²)
    probes: int = 8                # fisher: sampled-label probes of the backward sweep
    solve: str = "anchors"         # fisher: GPTQ solves one option per bit width, the others are predicted; all: every option
    qep_discount: float = 0.0      # fisher: ρ, the share of an error's effect through each later linear that QEP
    #                                removes; the backward sweep scales the gradient into every linear by 1 − α·ρ
    #                                (α = quant.qep_alpha). 0: the measurement ignores QEP, as before.
    #                                Experimental: on SmolLM2 every ρ > 0 tried gave worse plans (RESULTS.md)
    check_uniform: bool = False    # fisher: also carry the whole model at each solved option to the head and keep
    #                                its measured ΔKL beside the predicted one (meta.calibration): a check of the
    #                                predictor that no plan reads, at one held-out stream per option and layer


@dataclass
class Budget:
    avg_bits: float | None = None
    memory: int | None = None          # bytes of the quantized linears
    max_delta_loss: float | None = None  # inverse problem: least bytes with predicted Δloss ≤ this


@dataclass
class Calibration:
    source: str = "self"               # self | path to .jsonl/.txt | hf:name[:config[:split]]
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    text_field: str = "text"
    batch_size: int = 8
    check_samples: int = 4             # held-out sequences after the calibration's, which no pass calibrates on:
    #                                    the compile measures its checkpoint's KL to the original model on them
    #                                    (passes/quantize.py HeldOut); 0: no check


@dataclass
class Config:
    model: str
    gguf_file: str | None = None
    trust_remote_code: bool = False
    revision: str | None = None
    allow_pickle: bool = False         # load pickled weights (*.bin, *.pt) through torch's restricted unpickler
    budget: Budget = field(default_factory=Budget)
    candidates: list[Option] = field(default_factory=lambda: [Option()])
    method: str = "gptq"
    damp: float = 0.01
    qep_alpha: float = 0.0             # parse_config gives GPTQ compiles DEFAULT_QEP_ALPHA
    units: str = "shared"
    true_sequential: bool = True
    block_size: int = 128
    rotate: str = "none"               # hadamard: R1/R2 folded into the weights before calibration (rotate.py)
    rotate_seed: int = 0               # seed of the rotations' random signs
    candidate_set: str | None = None   # the name of a CANDIDATE_SETS entry, when `candidates:` named one
    keep_fp16: list[str] = field(default_factory=lambda: ["lm_head", "embed_tokens"])
    overrides: list[tuple[str, dict]] = field(default_factory=list)
    calibration: Calibration = field(default_factory=Calibration)
    export_targets: list[str] = field(default_factory=lambda: ["gptq"])
    export_dtype: str = "float16"
    gguf_heads: str = "llama"          # GGUF embeddings/output: llama.cpp's quantizer types, or f16 (export/gguf.py)
    gguf_pre: str | None = None        # GGUF tokenizer.ggml.pre, where quantc cannot name it (export/gguf.py)
    plan: PlanSettings = field(default_factory=PlanSettings)
    lazy_load: bool = True             # decoder layers read from disk one at a time (local safetensors)
    offload_activations: bool = False  # calibration hidden states in files beside the output, not in RAM
    device: str = "auto"               # auto (a GPU when torch sees one) | cpu | cuda | cuda:N
    compute_dtype: str = "float32"     # layer forwards; Hessians and GPTQ solves stay float32
    source_file: str = ""
    hub: str | None = None             # the hub id the YAML named, once `model` is its downloaded folder
    serve: list[str] = field(default_factory=list)   # runtimes the plan must load in (serve.py)

    @property
    def default_option(self) -> Option:
        """The option used where no budget asks for an allocation: the largest candidate."""
        return max(self.candidates, key=lambda o: o.size_order)

    @property
    def uniform(self) -> bool:
        return self.budget.avg_bits is None and self.budget.memory is None and self.budget.max_delta_loss is None

    def to_dict(self) -> dict:
        return {
            "model": self.hub or self.model, "gguf_file": self.gguf_file, "revision": self.revision,
            "trust_remote_code": self.trust_remote_code, "allow_pickle": self.allow_pickle, "method": self.method,
            "damp": self.damp,
            "qep_alpha": self.qep_alpha, "units": self.units, "true_sequential": self.true_sequential,
            # GPTQ's lazy-update block changes the codes (the order of the updates' sums), so a compile
            # with another one must not resume from this one's shards; only when changed, as gguf_heads
            **({"block_size": self.block_size} if self.block_size != 128 else {}),
            "rotate": self.rotate, "rotate_seed": self.rotate_seed, "candidate_set": self.candidate_set,
            "candidates": [o.to_dict() for o in self.candidates], "keep_fp16": self.keep_fp16,
            "overrides": [[p, o] for p, o in self.overrides], "budget": vars(self.budget),
            "calibration": vars(self.calibration), "export": {"targets": self.export_targets,
                                                              "dtype": self.export_dtype,
                                                              # only when changed: older records stay as they were
                                                              **({"gguf_heads": self.gguf_heads}
                                                                 if self.gguf_heads != "llama" else {}),
                                                              **({"gguf_pre": self.gguf_pre} if self.gguf_pre else {})},
            "plan": vars(self.plan), "resources": {"lazy_load": self.lazy_load,
                                                               "offload_activations": self.offload_activations,
                                                               "device": self.device,
                                                               "compute_dtype": self.compute_dtype},
            "serve": self.serve,
        }


def parse_size(value: Any, file: str, key: str) -> int:
    """'60MiB', '1.5GB', 1234 -> bytes."""
    if isinstance(value, bool):
        raise ConfigError(file, key, "expected a size such as 60MiB, 1.5GB or a number of bytes")
    if isinstance(value, (int, float)):
        n = float(value)
    else:
        m = re.fullmatch(r"\s*(-?[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS and m.group(2) != "":
            raise ConfigError(file, key, f"cannot read size {value!r}: use a number with a unit "
                                         f"({', '.join(u for u in ['B', 'KiB', 'MiB', 'GiB', 'MB', 'GB'])})")
        n = float(m.group(1)) * _UNITS[m.group(2).lower() or "b"]
    if not 0 < n < float("inf"):                   # NaN and inf too
        raise ConfigError(file, key, f"must be positive and finite, got {value!r}")
    if int(n) < 1:
        raise ConfigError(file, key, f"{value!r} is less than one byte; give a size such as 48MiB")
    return int(n)


# how each top-level section is written, for a value of the wrong shape (e.g. `budget: 4.5`)
_SECTION_FORM = {"budget": "budget: {avg_bits: 4.5}, or budget: {memory: 60MiB}",
                 "quant": "quant: {bits: 4, group_size: 128}", "keep_fp16": "keep_fp16: [lm_head]",
                 "overrides": "overrides: [{match: down_proj, bits: 8}]",
                 "calibration": "calibration: {source: data.jsonl, samples: 128}",
                 "export": "export: {targets: [onnx]}", "plan": "plan: {predictor: fisher}",
                 "resources": "resources: {device: cuda}", "model": "model: org/name, or model: {path: ./folder}",
                 "candidates": "candidates: [{bits: 4}, {bits: 8}], or candidates: wide", "serve": "serve: [vllm]"}


def _typed(d: dict, allowed: dict, file: str, prefix: str) -> dict:
    if not isinstance(d, dict):
        raise ConfigError(file, prefix, f"expected a mapping, got {type(d).__name__}")
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in allowed:
            raise ConfigError(file, key, f"unknown key; allowed keys: {', '.join(sorted(allowed))}")
        types = allowed[k] if isinstance(allowed[k], tuple) else (allowed[k],)
        ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in types)
        if not ok:
            names = " or ".join(t.__name__ for t in types)
            if isinstance(v, str) and {int, float} & set(types) and re.fullmatch(r"\s*-?[0-9.]+\s*", v):
                raise ConfigError(file, key, f"{v!r} is a string, not a number; write it without quotes: {v.strip()}")
            if isinstance(v, str) and list in types and "," in v:        # `bits: 4, 8` (YAML reads one string)
                raise ConfigError(file, key, f"{v!r} is one string; write a list: {k}: [{v.strip()}]")
            if isinstance(v, float) and v.is_integer() and int in types:             # `samples: 128.0`
                raise ConfigError(file, key, f"{v!r} is not an integer; write {int(v)}")
            if isinstance(v, int) and not isinstance(v, bool) and types == (str,):   # e.g. an all-digit commit hash
                raise ConfigError(file, key, f"{v!r} was read as a number; write it in quotes: {k}: '{v}'")
            form = f"; write it as `{_SECTION_FORM[key]}`" if key in _SECTION_FORM else ""
            raise ConfigError(file, key, f"expected {names}, got {type(v).__name__} {v!r}{form}")
    return d


def _not_a_number(v: Any, file: str, key: str, what: str) -> None:
    """A string, float or bool where an integer belongs: say so (not "4 is not supported")."""
    if isinstance(v, str):
        hint = f"write it without quotes: {v.strip()}" if re.fullmatch(r"\s*-?\d+\s*", v) else "give an integer"
        raise ConfigError(file, key, f"{what} {v!r} is a string, not a number; {hint}")
    if isinstance(v, bool):
        raise ConfigError(file, key, f"{what} {v!r} is a boolean, not a number; give an integer")
    if isinstance(v, float):
        hint = f"write {int(v)}" if v.is_integer() else "give an integer"
        raise ConfigError(file, key, f"{what} {v!r} is not an integer; {hint}")
    if not isinstance(v, int):
        raise ConfigError(file, key, f"{what} must be an integer, got {type(v).__name__} {v!r}")


def _bits(v: Any, file: str, key: str, grid: str = "gptq") -> int:
    _not_a_number(v, file, key, "bits")
    allowed = (sorted({*SUPPORTED_BITS, *(b for bs in GRID_BITS.values() for b in bs)}) if grid == "any"
               else GRID_BITS.get(grid, SUPPORTED_BITS))
    if v not in allowed:
        on = "" if grid == "gptq" else f" on grid {grid}"
        more = " (5 and 6 bits: grid k, llama.cpp's K-quants)" if grid == "gptq" and v in (5, 6) else ""
        raise ConfigError(file, key, f"bits {v!r} is not supported{on}; allowed: {', '.join(map(str, allowed))}{more}")
    return v


def _grid(v: Any, file: str, key: str) -> str:
    if v not in GRIDS:
        raise ConfigError(file, key, f"grid {v!r} is not known; allowed: gptq (GPTQ's grid, the default), k "
                          "(llama.cpp's K-quants Q2_K…Q6_K by bits), ggml (llama.cpp's Q4_0/Q4_1/Q5_0/Q5_1/Q8_0)")
    return v


# on a llama.cpp grid the type fixes these (ggml.py); `sym` only chooses between ggml's types
_FIXED_BY_TYPE = {"k": ("group_size", "sym", "act_order", "static_groups"),
                  "ggml": ("group_size", "act_order", "static_groups")}


def _check_fixed(d: dict, grid: str, file: str, key: str) -> None:
    for k in _FIXED_BY_TYPE.get(grid, ()):
        if k in d:
            raise ConfigError(file, f"{key}.{k}" if key else k, f"grid {grid} takes {k} from llama.cpp's type "
                              f"(ggml.py); remove {k} here (or use grid: gptq)")


def _make_option(fields: dict, file: str, key: str) -> Option:
    try:
        return Option(**fields)
    except ValueError as e:
        raise ConfigError(file, key, str(e)) from None


def _group(v: Any, file: str, key: str) -> int:
    _not_a_number(v, file, key, "group size")
    if not (v == -1 or (v >= 32 and v % 32 == 0)):
        raise ConfigError(file, key, f"group size {v!r} is not allowed; use -1 (per channel) or a "
                                     "multiple of 32 such as 32, 64, 128")
    return v


def _as_list(v):
    return v if isinstance(v, list) else [v]


def load_config(path: str | Path) -> Config:
    path = Path(path)
    file = str(path)
    if not path.is_file():
        raise ConfigError(file, "", "budget file not found; pass the path of a budget YAML (see README)")
    return parse_config(read_yaml(path), file, base=path.parent)


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: str, first: int, second: int):
        self.key, self.first, self.second = key, first, second
        super().__init__(f"{key} given twice")


class UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a mapping key given twice (plain YAML silently keeps the last one,
    so a second `bits:` or a second `quant:` block would quietly replace the first)."""

    def construct_document(self, node):
        self._check_unique(node, "", set())
        return super().construct_document(node)

    def _check_unique(self, node, path: str, seen: set) -> None:
        if id(node) in seen:                       # aliases: each node once (and no endless recursion)
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            lines: dict = {}
            for k, v in node.value:
                if k.tag == "tag:yaml.org,2002:merge":   # `<<: *base` may be overridden: that is its purpose
                    self._check_unique(v, path, seen)
                    continue
                child = path
                if isinstance(k, yaml.ScalarNode):
                    value = self.construct_object(k)   # `bits` and "bits", `1` and `01`: the same key
                    child = f"{path}.{value}" if path else str(value)
                    try:
                        if value in lines:
                            raise DuplicateKeyError(child, lines[value], k.start_mark.line + 1)
                        lines[value] = k.start_mark.line + 1
                    except TypeError:                  # unhashable: the constructor reports it
                        pass
                self._check_unique(v, child, seen)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                self._check_unique(v, f"{path}[{i}]", seen)


def read_yaml(path: str | Path, what: str = "budget") -> Any:
    """A YAML file (budget or plan) through UniqueKeyLoader; every problem is a ConfigError naming
    the file, the line and (for a duplicate) the key path."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(file, "", "not a UTF-8 text file") from None
    except OSError as e:
        raise ConfigError(file, "", f"cannot read the {what} file: {e.strerror}") from None
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)
    except DuplicateKeyError as e:
        lines = f"line {e.first}" if e.first == e.second else f"lines {e.first} and {e.second}"
        raise ConfigError(file, e.key, f"given twice ({lines}); YAML would keep only the last one: "
                          "remove one or merge them") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(file, "", f"malformed YAML{where}: {getattr(e, 'problem', e)}") from None


def parse_config(raw: Any, file: str = "<budget>", base: Path | None = None) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(file, "", f"the top level must be a mapping with at least `model`, got {type(raw).__name__}")
    # an empty section (`budget:` with its keys commented out) is YAML's null: the same as leaving it out
    raw = {str(k): v for k, v in raw.items() if v is not None or str(k) == "model"}
    if "model" in raw and raw["model"] is None:
        raise ConfigError(file, "model", "empty: name a local Hugging Face model folder or a hub id")
    _typed(raw, SCHEMA, file, "")
    if "model" not in raw:
        raise ConfigError(file, "model", "missing: name a local Hugging Face model folder or a hub id")

    m = raw["model"] if isinstance(raw["model"], dict) else {"path": raw["model"]}
    _typed(m, MODEL_KEYS, file, "model")
    if "path" not in m:
        raise ConfigError(file, "model.path", "missing: name a local model folder or a hub id")
    model = _resolve_model(m["path"], file, base)
    cfg = Config(model=model, gguf_file=m.get("gguf_file"), trust_remote_code=m.get("trust_remote_code", False),
                 revision=m.get("revision"), allow_pickle=m.get("allow_pickle", False), source_file=file)
    if cfg.gguf_file and not (Path(model) / cfg.gguf_file).is_file():
        raise ConfigError(file, "model.gguf_file", f"{cfg.gguf_file!r} not found in {model}")

    if isinstance(raw.get("quant"), dict) and "candidates" in raw["quant"]:
        raise ConfigError(file, "quant.candidates", "`candidates` is a top-level key: write `candidates: "
                          f"{next(iter(CANDIDATE_SETS))}` (a named set: {', '.join(CANDIDATE_SETS)}) or a list of "
                          "options at the top level, not under quant")
    q = _typed(raw.get("quant", {}) or {}, QUANT_KEYS, file, "quant")
    grid = _grid(q.get("grid", "gptq"), file, "quant.grid")
    _check_fixed(q, grid, file, "quant")
    bits = [_bits(b, file, "quant.bits", grid) for b in _as_list(q.get("bits", 4))]
    groups = [_group(g, file, "quant.group_size") for g in _as_list(q.get("group_size", 128))]
    if not bits or not groups:
        raise ConfigError(file, "quant.bits" if not bits else "quant.group_size", "needs at least one candidate")
    # quantc's defaults: act-order with static groups (g_idx stays i // group_size) and the clipped grid
    shared = {"act_order": True, "static_groups": True, "mse": True,
              **{k: q[k] for k in ("sym", "act_order", "static_groups", "mse") if k in q}}
    if isinstance(raw.get("candidates"), str):
        cands = _candidate_set(raw["candidates"], q, shared, file)
        cfg.candidate_set = raw["candidates"]
    elif "candidates" in raw:
        if "bits" in q:
            raise ConfigError(file, "quant.bits", "has no effect when `candidates` lists the options: put the "
                              "bit-widths in `candidates` and remove quant.bits")
        if not raw["candidates"]:
            raise ConfigError(file, "candidates", "empty: list at least one option such as {bits: 4}, name a set "
                              f"({', '.join(CANDIDATE_SETS)}), or remove the key")
        if isinstance(q.get("group_size"), list) and len(q["group_size"]) > 1:
            raise ConfigError(file, "quant.group_size", "a list has no effect when `candidates` lists the options: "
                              "put group_size in each candidate, or give one group size here")
        cands = []
        for i, c in enumerate(raw["candidates"]):
            key = f"candidates[{i}]"
            if isinstance(c, (int, float)) and not isinstance(c, bool):
                raise ConfigError(file, key, f"expected a mapping, got {c!r}: write `- {{bits: {c}}}`, or leave "
                                  f"`candidates` out and write quant.bits: [{', '.join(map(str, raw['candidates']))}]")
            c = _typed(c, OPTION_KEYS, file, key)
            if "bits" not in c:
                raise ConfigError(file, f"{key}.bits", "missing")
            cgrid = _grid(c.get("grid", grid), file, f"{key}.grid")
            _check_fixed(c, cgrid, file, key)
            _bits(c["bits"], file, f"{key}.bits", cgrid)
            _group(c.get("group_size", groups[0]), file, f"{key}.group_size")
            extra = {"grid": cgrid} if cgrid != "gptq" else {}
            cands.append(_make_option({**shared, "group_size": groups[0], **c, **extra}, file, key))
    else:
        extra = {"grid": grid} if grid != "gptq" else {}
        cands = [_make_option(dict(bits=b, group_size=g, **shared, **extra), file, "quant.bits")
                 for b, g in itertools.product(bits, groups)]
    cfg.candidates = list(dict.fromkeys(cands))

    cfg.method = q.get("method", "gptq")
    if cfg.method not in METHODS:
        raise ConfigError(file, "quant.method", f"{cfg.method!r} is not known; allowed: {', '.join(METHODS)}")
    cfg.damp = float(q.get("damp", 0.01))
    if not 0 < cfg.damp <= 1:
        raise ConfigError(file, "quant.damp", f"must be in (0, 1], got {cfg.damp}")
    cfg.qep_alpha = float(q.get("qep_alpha", DEFAULT_QEP_ALPHA if cfg.method == "gptq" else 0.0))
    if not 0 <= cfg.qep_alpha <= 1:
        raise ConfigError(file, "quant.qep_alpha", f"must be in [0, 1] (0 = plain GPTQ), got {cfg.qep_alpha}")
    if cfg.method == "rtn" and cfg.qep_alpha > 0:
        raise ConfigError(file, "quant.qep_alpha", "error propagation needs calibration and has no effect with "
                          "method: rtn; use method: gptq or remove qep_alpha")
    cfg.units = q.get("units", "shared")
    if cfg.units not in UNIT_MODES:
        raise ConfigError(file, "quant.units", f"{cfg.units!r} is not known; allowed: {', '.join(UNIT_MODES)} "
                          "(shared: q/k/v and gate/up each share one option; linear: every linear its own)")
    cfg.true_sequential = q.get("true_sequential", True)
    cfg.block_size = q.get("block_size", 128)
    if cfg.block_size < 1:
        raise ConfigError(file, "quant.block_size", "must be positive")
    cfg.rotate = q.get("rotate", "none")
    if cfg.rotate not in ROTATIONS:
        raise ConfigError(file, "quant.rotate", f"{cfg.rotate!r} is not known; allowed: {', '.join(ROTATIONS)} "
                          "(hadamard: randomized Hadamard rotations folded into the weights)")
    if "rotate_seed" in q and cfg.rotate == "none":
        raise ConfigError(file, "quant.rotate_seed", "has no effect without a rotation: add quant.rotate: hadamard "
                          "or remove rotate_seed")
    cfg.rotate_seed = q.get("rotate_seed", 0)
    if cfg.rotate_seed < 0:
        raise ConfigError(file, "quant.rotate_seed", f"must be a non-negative integer, got {cfg.rotate_seed}")

    b = _typed(raw.get("budget", {}) or {}, BUDGET_KEYS, file, "budget")
    if sum(k in b for k in BUDGET_KEYS) > 1:
        raise ConfigError(file, "budget", "give one of avg_bits, memory or max_delta_loss, not several")
    if "avg_bits" in b:
        if not 0 < b["avg_bits"] <= 16:
            raise ConfigError(file, "budget.avg_bits", f"must be in (0, 16], got {b['avg_bits']}")
        cfg.budget.avg_bits = float(b["avg_bits"])
    if "memory" in b:
        cfg.budget.memory = parse_size(b["memory"], file, "budget.memory")
    if "max_delta_loss" in b:
        if not b["max_delta_loss"] >= 0:            # NaN too
            raise ConfigError(file, "budget.max_delta_loss", f"must be a number ≥ 0 (nats per token), got {b['max_delta_loss']}")
        cfg.budget.max_delta_loss = float(b["max_delta_loss"])

    keep = raw.get("keep_fp16", cfg.keep_fp16)
    for i, k in enumerate(keep):
        _regex(k, file, f"keep_fp16[{i}]")
    cfg.keep_fp16 = list(keep)

    for i, o in enumerate(raw.get("overrides", [])):
        key = f"overrides[{i}]"
        if not isinstance(o, dict) or "match" not in o:
            raise ConfigError(file, key, "each override is a mapping with `match` (a regex) and option keys")
        pat = _regex(o["match"], file, f"{key}.match")
        rest = _typed({k: v for k, v in o.items() if k != "match"}, {**OPTION_KEYS, "skip": bool}, file, key)
        if "grid" in rest:
            _check_fixed(rest, _grid(rest["grid"], file, f"{key}.grid"), file, key)
        if "bits" in rest:
            _bits(rest["bits"], file, f"{key}.bits", rest.get("grid", "gptq") if "grid" in rest else "any")
        if "group_size" in rest:
            _group(rest["group_size"], file, f"{key}.group_size")
        changes = {k: v for k, v in rest.items() if k != "skip"}
        if rest.get("skip") and changes:
            raise ConfigError(file, key, f"skip: true keeps the matched linears in float, so {', '.join(changes)} "
                              "has no effect; remove it, or remove skip")
        for cand in cfg.candidates:        # what the override makes of every candidate must exist
            o = _make_option({**cand.to_dict(), **changes}, file, key)
            _bits(o.bits, file, f"{key}.bits", o.grid)
            _check_fixed(changes, o.grid, file, key)     # not silently dropped by the llama.cpp type
        cfg.overrides.append((pat, rest))

    c = _typed(raw.get("calibration", {}) or {}, CALIB_KEYS, file, "calibration")
    cal = Calibration(**c)
    for k in ("samples", "seq_len", "batch_size"):
        if getattr(cal, k) < 1:
            raise ConfigError(file, f"calibration.{k}", f"must be a positive integer, got {getattr(cal, k)}")
    if not -2**63 <= cal.seed < 2**64 - 1:          # torch.manual_seed's range, with `self`'s check at seed + 1
        raise ConfigError(file, "calibration.seed", f"must be an integer from {-2**63} to {2**64 - 2}, got "
                          f"{cal.seed}")
    if c.get("check_samples", 0) > 0 and cfg.method == "rtn":
        raise ConfigError(file, "calibration.check_samples", "has no effect with method: rtn (the held-out check "
                          "runs in GPTQ's sweep); remove it, or use method: gptq")
    if cal.check_samples < 0:
        raise ConfigError(file, "calibration.check_samples", f"must be 0 (no check) or a positive integer, got "
                          f"{cal.check_samples}")
    if cal.source not in ("self",) and not cal.source.startswith("hf:"):
        src = Path(cal.source).expanduser()
        if base is not None and not src.is_absolute():
            src = base / src
        if not src.is_file():
            raise ConfigError(file, "calibration.source", f"file {cal.source!r} not found; use a .jsonl "
                              "(field `text`) or .txt file, `hf:<dataset>[:config[:split]]`, or `self`")
        if src.suffix.lower() not in (".jsonl", ".txt", ".json"):
            raise ConfigError(file, "calibration.source", f"{cal.source!r}: expected a .jsonl, .json or .txt file")
        if src.suffix.lower() == ".txt" and c.get("text_field", "text") != "text":
            raise ConfigError(file, "calibration.text_field", "has no effect: a .txt source is plain text, with no "
                              "fields; remove text_field, or use a .jsonl source")
        cal.source = str(src)
    cfg.calibration = cal

    e = _typed(raw.get("export", {}) or {}, EXPORT_KEYS, file, "export")
    targets = _as_list(e.get("targets", ["gptq"]))
    for t in targets:
        if t not in EXPORT_TARGETS:
            raise ConfigError(file, "export.targets", f"{t!r} is not known; allowed: {', '.join(EXPORT_TARGETS)}")
    cfg.export_targets = targets
    cfg.export_dtype = e.get("dtype", "float16")
    from .export.gguf import HEADS
    cfg.gguf_heads = e.get("gguf_heads", "llama")
    if cfg.gguf_heads not in HEADS:
        raise ConfigError(file, "export.gguf_heads", f"{cfg.gguf_heads!r}; allowed: llama (embeddings and output "
                          "typed as llama.cpp's quantizer does, when the linears are on llama.cpp grids), f16")
    cfg.gguf_pre = e.get("gguf_pre")
    if cfg.gguf_pre is not None and not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", cfg.gguf_pre):
        raise ConfigError(file, "export.gguf_pre", f"{cfg.gguf_pre!r} is not a llama.cpp pre-tokenizer name; write "
                          "the name convert_hf_to_gguf.py gives the model (lower case, such as llama-bpe or qwen2)")

    res = _typed(raw.get("resources", {}) or {}, RESOURCE_KEYS, file, "resources")
    cfg.lazy_load = res.get("lazy_load", True)
    cfg.offload_activations = res.get("offload_activations", False)
    cfg.device = res.get("device", "auto")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise ConfigError(file, "resources.device", f"{cfg.device!r}; allowed: auto, cpu, cuda, cuda:N")
    cfg.compute_dtype = res.get("compute_dtype", "float32")
    if cfg.compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError(file, "resources.compute_dtype", f"{cfg.compute_dtype!r}; allowed: {', '.join(COMPUTE_DTYPES)}")

    pl = _typed(raw.get("plan", {}) or {}, PLAN_KEYS, file, "plan")
    cfg.plan = PlanSettings(**pl)
    for k in ("measure_samples", "alpha_samples", "alpha_seq_len"):
        if getattr(cfg.plan, k) < 1:
            raise ConfigError(file, f"plan.{k}", f"must be a positive integer, got {getattr(cfg.plan, k)}")
    if cfg.plan.predictor not in PREDICTORS:
        raise ConfigError(file, "plan.predictor", f"{cfg.plan.predictor!r}; allowed: {', '.join(PREDICTORS)} "
                          "(fisher: fast O(layers) estimate, the default; exact: measured, O(layers²))")
    if cfg.plan.probes < 1:
        raise ConfigError(file, "plan.probes", f"must be a positive integer, got {cfg.plan.probes}")
    if cfg.plan.solve not in SOLVES:
        raise ConfigError(file, "plan.solve", f"{cfg.plan.solve!r}; allowed: {', '.join(SOLVES)} (anchors: GPTQ "
                          "solves one option per bit width and predicts the others, the default; all: every option)")
    if cfg.plan.predictor == "exact" and pl.get("solve") == "anchors":
        raise ConfigError(file, "plan.solve", "anchors is the fisher predictor's; the exact predictor measures every "
                          "option with its own weights: remove plan.solve or set plan.predictor: fisher")
    if not 0 <= cfg.plan.qep_discount <= 1:
        raise ConfigError(file, "plan.qep_discount", f"must be in [0, 1] (0 = the measurement ignores QEP), got "
                          f"{cfg.plan.qep_discount}")
    if cfg.plan.qep_discount > 0 and cfg.qep_alpha == 0:
        log.warning("%s: plan.qep_discount has no effect with quant.qep_alpha: 0 (no error propagation to discount)",
                    file)
    other = {"fisher": ("noise", "direct_bits"),
             "exact": ("probes", "qep_discount", "check_uniform")}[cfg.plan.predictor]
    for k in other:            # kept for a switch back to the other predictor (the exact one validates): said, not refused
        if k in pl:
            log.warning("%s: plan.%s has no effect with plan.predictor: %s (it is the %s predictor's)", file, k,
                        cfg.plan.predictor, "exact" if cfg.plan.predictor == "fisher" else "fisher")
    if not 0 < cfg.plan.noise < 1:
        raise ConfigError(file, "plan.noise", f"must be in (0, 1), got {cfg.plan.noise}")
    if cfg.export_dtype not in ("float16", "bfloat16"):
        raise ConfigError(file, "export.dtype", f"{cfg.export_dtype!r}; allowed: float16, bfloat16")

    from .serve import check_config, parse_targets   # runtimes the plan must load in: serve.py
    if "serve" in raw:
        cfg.serve = parse_targets(raw["serve"], file)
    if cfg.candidate_set is not None:       # a named set offers what the targets run, not all of it
        cfg.candidates = _served(cfg, file)
    check_config(cfg, file, explicit_candidates=isinstance(raw.get("candidates"), list))
    return cfg


def _candidate_set(name: str, q: dict, shared: dict, file: str) -> list[Option]:
    """The options of the named set `candidates: NAME` (CANDIDATE_SETS)."""
    if name not in CANDIDATE_SETS:
        raise ConfigError(file, "candidates", f"{name!r} is not a known candidate set; known sets: "
                          f"{', '.join(CANDIDATE_SETS)}, or give a list of options ({{bits, group_size, sym}})")
    for k in ("bits", "group_size", "sym", "grid"):     # the set's options are on GPTQ's grid
        if k in q:
            raise ConfigError(file, f"quant.{k}", f"has no effect: `candidates: {name}` fixes bits, group sizes, "
                              f"sym and the grid (gptq); remove quant.{k}, or list the options in `candidates`")
    return [Option(bits=b, group_size=g, **{**shared, "sym": s}) for b, g, s in CANDIDATE_SETS[name]]


def _served(cfg: Config, file: str) -> list[Option]:
    """A named set's options that every serving target runs (serve.targets_for)."""
    from .serve import check, targets_for
    targets = targets_for(cfg)
    kept = [o for o in cfg.candidates if not check({"candidate": o}, targets)]
    if not kept:
        raise ConfigError(file, "candidates", f"no option of the set {cfg.candidate_set!r} runs on "
                          f"{', '.join(targets)}; list the options in `candidates`")
    return kept


def _regex(p: Any, file: str, key: str) -> str:
    if not isinstance(p, str):
        raise ConfigError(file, key, f"expected a regular expression string, got {type(p).__name__}")
    try:
        re.compile(p)
    except re.error as e:
        raise ConfigError(file, key, f"invalid regular expression {p!r}: {e}") from None
    return p


def _resolve_model(p: str, file: str, base: Path | None) -> str:
    local = Path(p).expanduser()
    if base is not None and not local.is_absolute():
        cand = base / local
        if cand.exists():
            local = cand
    if local.exists():
        if not local.is_dir():
            raise ConfigError(file, "model", f"{p!r} is a file; point at the model folder")
        if not (local / "config.json").is_file():
            raise ConfigError(file, "model", f"{local} has no config.json: not a Hugging Face model folder")
        return str(local.resolve())
    if _HUB_ID.match(p) and not p.startswith((".", "/", "~")):
        return p                                      # a hub id: resolved (online) when loaded
    raise ConfigError(file, "model", f"model folder {p!r} not found (relative paths are read from the "
                                     "YAML's folder); give an existing folder or a hub id like org/name")
