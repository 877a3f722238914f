"""The solve between the two sweeps: measurements (cached on disk) → allocation → Plan.

A measurement is keyed by the model, the calibration tokens and the candidate options, so one
measurement serves any number of budgets: re-planning for another budget takes seconds.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from . import durable
from .config import Config
from .errors import ConfigError, QuantcError
from .family import family_of
from .model import CPU, Activations, Placement, capture_layer0_inputs, keep_in_fp16, source_identity, units
from .options import Option
from .passes.allocate import allocate, least_bytes, size_range
from .passes.measure import CALIBRATION_UNITS, PROXY_DTYPE, PROXY_STEPS, Measurements, anchors, measure, option_key, unit_dkl

log = logging.getLogger("quantc")
MEASURE_VERSION = 4


@dataclass
class Plan:
    choices: dict[str, Option]                 # unit key -> option
    unit_names: dict[str, list[str]]           # unit key -> module names
    predicted: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def module_options(self) -> dict[str, Option]:
        return {n: self.choices[k] for k, names in self.unit_names.items() for n in names if k in self.choices}

    def to_dict(self) -> dict:
        return {"quantc_plan": 1, "meta": self.meta, "predicted": self.predicted,
                "units": {k: {"modules": self.unit_names[k], **_editable(o)} for k, o in self.choices.items()}}

    def save(self, path: Path) -> None:
        durable.write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False, width=120))


def _editable(o: Option) -> dict:
    """An option as a plan file writes it: without the fields a llama.cpp type fixes (config._FIXED_BY_TYPE),
    so that an edit of `bits` alone gives the new type's groups."""
    from .config import _FIXED_BY_TYPE
    return {k: v for k, v in o.to_dict().items() if k not in _FIXED_BY_TYPE.get(o.grid, ())}


def read_plan_options(path: str | Path, cfg: Config) -> tuple[dict[str, Option], dict[str, list[str]], dict]:
    """Read an (edited) plan file without the model: unit key -> option (checked: bits, group size,
    duplicate keys, unknown keys, strings for numbers, and every runtime the compile targets:
    serve.targets_for), unit key -> the modules the file lists, and the raw mapping."""
    from .config import _FIXED_BY_TYPE, OPTION_KEYS, _bits, _grid, _group, _make_option, _typed, read_yaml
    from .serve import check, refuse, targets_for
    file = str(path)
    if not Path(path).is_file():
        raise ConfigError(file, "", "plan file not found; pass a plan.yaml written by `quantc plan` or `quantc compile`")
    raw = read_yaml(path, "plan")
    if not isinstance(raw, dict) or "units" not in raw or not isinstance(raw["units"], dict):
        raise ConfigError(file, "units", "not a quantc plan (written by `quantc plan`)")
    if not raw["units"]:
        raise ConfigError(file, "units", "empty: the plan gives no unit an option; write it again with `quantc plan`")
    made_with = raw["meta"].get("units_mode") if isinstance(raw.get("meta"), dict) else None
    if made_with not in (None, cfg.units):
        raise ConfigError(file, "meta.units_mode", f"the plan was made with quant.units: {made_with}, and the budget "
                          f"file says {cfg.units}; set quant.units: {made_with}, or make the plan again")
    choices, listed = {}, {}
    for key, entry in raw["units"].items():
        if not isinstance(entry, dict):
            raise ConfigError(file, f"units.{key}", "expected a mapping with bits, group_size, ...")
        fields = {k: v for k, v in entry.items() if k != "modules"}
        _typed(fields, OPTION_KEYS, file, f"units.{key}")        # a typo such as `bit: 3` is not ignored
        if "bits" not in fields:
            raise ConfigError(file, f"units.{key}.bits", "missing")
        grid = _grid(fields.get("grid", "gptq"), file, f"units.{key}.grid")
        _bits(fields["bits"], file, f"units.{key}.bits", grid)
        if grid == "gptq":              # a llama.cpp type fixes its own groups (16 or 32)
            _group(fields.get("group_size", Option.group_size), file, f"units.{key}.group_size")
        opt = _make_option(fields, file, f"units.{key}")
        stale = [k for k in _FIXED_BY_TYPE.get(grid, ()) if k in fields and fields[k] != getattr(opt, k)]
        if stale:          # the type sets these (an older plan file wrote them; bits may have been edited since)
            log.warning("%s: units.%s: %s fixes %s; the file's %s ignored (remove %s, or use grid: gptq)", file, key,
                        opt.label, ", ".join(f"{k} to {getattr(opt, k)!r}" for k in stale),
                        ", ".join(f"{k}: {fields[k]!r}" for k in stale), "them" if len(stale) > 1 else "it")
        mods = entry.get("modules")
        listed[key] = [str(m) for m in mods] if isinstance(mods, list) else []
        choices[key] = opt
        refuse(check({f"unit {key}": opt}, targets_for(cfg)), file, f"units.{key}")
    unit_of = {m: key for key, mods in listed.items() for m in mods}
    vs = check({m: choices[key] for m, key in unit_of.items()}, targets_for(cfg))   # fused members: one option
    if vs:
        refuse(vs, file, f"units.{unit_of[vs[0].name]}")
    return choices, listed, raw


def read_plan(path: str | Path, model, cfg: Config) -> Plan:
    """Read an (edited) plan file and check it against the model's units (a meta-device skeleton is
    enough: names only)."""
    file = str(path)
    choices, listed, raw = read_plan_options(path, cfg)
    model_units = {u.key: list(u.names) for u in units(model, cfg.units)}
    for key in choices:
        if key not in model_units:
            raise ConfigError(file, f"units.{key}", "the plan does not match the model: no such unit "
                              f"(the model has {len(model_units)} units, e.g. {next(iter(model_units))})")
        if listed[key] and sorted(listed[key]) != sorted(model_units[key]):     # modules are the model's, not the file's
            raise ConfigError(file, f"units.{key}.modules", f"lists {listed[key]}, but the unit holds "
                              f"{model_units[key]}; modules cannot move between units: edit the unit's option only")
    missing = [k for k in model_units if k not in choices]
    if missing and choices:
        log.warning("%s: the plan leaves %d of %d units (e.g. %s) to the default option %s", file, len(missing),
                    len(model_units), missing[0], cfg.default_option.label)
    names = {key: model_units[key] for key in choices}
    return Plan(choices, names, raw.get("predicted", {}), raw.get("meta", {}))


def cache_dir() -> Path:
    return Path(os.environ.get("QUANTC_CACHE", Path.home() / ".cache" / "quantc")) / "measurements"


def measurement_key(cfg: Config, calib: torch.Tensor, hold: torch.Tensor, model, candidates: bool = True) -> str:
    """Model identity (model.source_identity: config, weight files, GGUF file, revision, hub commit),
    the Hessians' and the held-out tokens (each with its shape: moving the boundary between them,
    `plan.alpha_samples`, can leave their concatenation the same), options, method.
    `candidates=False`: the same without the candidate options (the key a measurement shares with
    every measurement of other candidates on the same model, tokens and settings; see `_subset_of`)."""
    h = hashlib.sha256()
    h.update(source_identity(cfg.model, cfg.gguf_file, cfg.revision, model).encode())
    for t in (calib, hold):
        h.update(f"{tuple(t.shape)}".encode())
        h.update(t.contiguous().numpy().tobytes())
    if candidates:
        h.update(json.dumps([o.to_dict() for o in cfg.candidates], sort_keys=True).encode())
    p = cfg.plan                     # only the settings the chosen predictor reads
    own = f"{p.probes}:{CALIBRATION_UNITS}" if p.predictor == "fisher" else f"{p.noise}:{p.direct_bits}"
    if p.predictor == "fisher" and cfg.method == "gptq" and p.solve == "anchors" and \
            (not candidates or any(a != j for j, a in enumerate(anchors(cfg.candidates)))):
        own += f":solve:anchors:{PROXY_STEPS}:{str(PROXY_DTYPE).removeprefix('torch.')}"     # only where some option is predicted: solve: all and
        #                                           one-option-per-bits sets measure as before, under their keys
    h.update(f"{cfg.method}:{cfg.damp}:{cfg.units}:{p.predictor}:{own}:{cfg.compute_dtype}:{MEASURE_VERSION}".encode())
    beta = qep_beta(cfg)
    if beta != 1.0:                 # another Fisher weighting (only then: keys without it stay as they were)
        h.update(f"qep_beta:{beta!r}".encode())
    if p.check_uniform and p.predictor == "fisher":     # more in meta (only then: keys without it stay as they were)
        h.update(b"check_uniform")
    if cfg.rotate != "none":        # another model's weights (only then: unrotated keys stay as they were)
        h.update(f"rotate:{cfg.rotate}:{cfg.rotate_seed}".encode())
    if cfg.calibration.seed != 0:   # the probes' labels and the noise are drawn from it, and a source whose
        #                             windows do not depend on it gives the same tokens (only then: seed-0 keys
        #                             stay as they were)
        h.update(f"seed:{cfg.calibration.seed}".encode())
    return h.hexdigest()[:20]


def qep_beta(cfg: Config) -> float:
    """The fisher backward sweep's factor on the gradient into every linear: 1 − α·ρ (quant.qep_alpha,
    plan.qep_discount); 1 where either is 0 or the exact predictor measures."""
    if cfg.plan.predictor != "fisher" or cfg.method != "gptq":
        return 1.0
    return 1.0 - cfg.qep_alpha * cfg.plan.qep_discount


def get_measurements(cfg: Config, model, tokens: torch.Tensor, progress: bool = True,
                     place: Placement = CPU, offload: Path | None = None) -> tuple[Measurements, bool]:
    """Measure (sweep 1), or read the cached measurement of the same model/calibration/options.
    The calibration tokens are split: the first `measure_samples` sequences give the Hessians,
    the held-out `alpha_samples` give α (truncated to `alpha_seq_len` tokens). `offload`: a folder
    for the sweep's hidden states (`resources.offload_activations`: the calibration's, every
    held-out stream and every layer's held-out input, which the fisher predictor's backward sweep
    reads back), as unlinked files."""
    p = cfg.plan
    n_measure = min(p.measure_samples, max(1, tokens.shape[0] - p.alpha_samples))
    if place.world.main and tokens.shape[0] <= p.alpha_samples:     # the held-out rows are then every row, the Hessians' too
        log.warning("%s: the calibration has %d sequences, not more than plan.alpha_samples (%d): the held-out "
                    "slice the predictor's ΔKL is measured on includes the Hessians' sequence; raise "
                    "calibration.samples to %d for the full measurement", cfg.source_file or "config",
                    tokens.shape[0], p.alpha_samples, p.measure_samples + p.alpha_samples)
    elif place.world.main and n_measure < p.measure_samples:   # the held-out slice is taken first, silently
        log.warning("%s: the calibration has %d sequences, fewer than plan.measure_samples + plan.alpha_samples "
                    "(%d + %d): the measurement's Hessians use %d sequences; raise calibration.samples to %d (or "
                    "lower plan.alpha_samples) for the full measurement", cfg.source_file or "config",
                    tokens.shape[0], p.measure_samples, p.alpha_samples, n_measure, p.measure_samples + p.alpha_samples)
    calib = tokens[:n_measure]
    hold = tokens[-p.alpha_samples:, : p.alpha_seq_len]
    key, base = measurement_key(cfg, calib, hold, model), measurement_key(cfg, calib, hold, model, candidates=False)
    path = cache_dir() / f"{key}.json"
    world = place.world
    cached = None
    if world.main:
        if path.is_file():
            cached = json.loads(path.read_text())
            _write_about(key, base, cached)         # measurements cached before the subset lookup
            log.info("measurements read from cache %s", path)
        else:
            cached = _subset_of(base, cfg)
    cached = world.broadcast(cached, 0)           # rank 0's cache (other machines may not see the file)
    if cached is not None:
        return Measurements.from_dict(cached), True
    t = time.perf_counter()
    bs = cfg.calibration.batch_size
    hidden, kw = capture_layer0_inputs(model, world.local_rows(calib, bs), bs)   # this rank's batches
    hh, hkw = capture_layer0_inputs(model, hold, bs)
    acts, held = Activations(hidden, kw, bs, offload, place), Activations(hh, hkw, bs, offload, place)
    del hidden, hh          # handed over: no name here keeps the layer-0 inputs (offloaded: their RAM copies go
    #                         now), and measure releases them once layer 0 is done
    from .resume import MeasurePoint, other_points
    point = MeasurePoint(cache_dir() / f"partial-{key}", world)    # each layer saved: an interrupted run resumes
    note = other_points(cache_dir(), key) if world.main else None
    if note:
        log.warning(note)
    ms = measure(model, acts, held, hold,
                 cfg.candidates, predictor=p.predictor, probes=p.probes, unit_mode=cfg.units, method=cfg.method,
                 damp=cfg.damp, seed=cfg.calibration.seed, noise=p.noise, direct_bits=p.direct_bits,
                 progress=progress, place=place, solve=p.solve, release_inputs=True, point=point,
                 qep_beta=qep_beta(cfg), check_uniform=p.check_uniform)
    ms.meta = {**ms.meta, "key": key, "model": cfg.hub or cfg.model, "measure_samples": int(n_measure),
               "alpha_tokens": int(hold.numel()), "seconds": time.perf_counter() - t, "method": cfg.method}
    if not world.main:
        return ms, False
    path.parent.mkdir(parents=True, exist_ok=True)
    durable.write_text(path, json.dumps(ms.to_dict()))   # two plans at once: each its own file
    _write_about(key, base, ms.to_dict())
    point.clear()                                  # the cache entry replaces the resume state
    return ms, False


def _write_about(key: str, base: str, ms: dict) -> None:
    """Beside measurement `key`, what `_subset_of` matches on without reading it: the key without the
    candidates, and each measured option's anchor (the option it was solved or predicted from)."""
    about = cache_dir() / f"{key}.about"
    if not about.is_file():
        anchors_of = ms["meta"].get("anchors") or {k: k for k in ms["options"]}
        durable.write_text(about, json.dumps({"base": base, "anchors": anchors_of}))


def _subset_of(base: str, cfg: Config) -> dict | None:
    """A cached measurement of more candidates on the same model, tokens and settings (`base`), cut
    down to this config's candidates: every number of an option is computed from the option, its
    anchor and the unit alone, so an option measured beside others, from the same anchor, has the
    numbers a measurement of fewer candidates gives it (to float rounding: GPTQ solves options in
    stacks). Lets a narrower candidate set (serve: [vllm], or a few options dropped) re-plan in
    seconds. None when no cached measurement holds every candidate with the same anchor."""
    want = {option_key(o): option_key(cfg.candidates[a]) for o, a in zip(cfg.candidates, anchors(cfg.candidates))}
    if cfg.plan.predictor == "exact" or cfg.plan.solve == "all" or cfg.method != "gptq":
        want = {k: k for k in want}                 # every option solved: no anchors
    for about in sorted(cache_dir().glob("*.about")):
        a = json.loads(about.read_text())
        src = about.with_name(about.name.removesuffix(".about") + ".json")
        if a["base"] != base or not src.is_file() or any(a["anchors"].get(k) != v for k, v in want.items()):
            continue
        ms = json.loads(src.read_text())
        keep = set(want)
        cal = ms["meta"].get("calibration") or {}
        if any(cal.get(k, {}).get("from") not in (None, *want.values()) for k in keep):
            continue        # an option's factor was borrowed from an anchor this config lacks
        for u in ms["units"].values():
            u["options"] = {k: v for k, v in u["options"].items() if k in keep}
        ms["options"] = {k: v for k, v in ms["options"].items() if k in keep}
        meta = ms["meta"]
        meta["anchors"] = {k: v for k, v in (meta.get("anchors") or {}).items() if k in keep} or None
        if isinstance(meta.get("calibration"), dict):
            meta["calibration"] = {k: v for k, v in meta["calibration"].items() if k in keep}
        meta["subset_of"] = meta.get("key")         # the plan names the measurement its numbers come from
        log.info("measurements read from cache %s (its candidates include this config's %d)", src, len(keep))
        return ms
    return None


def _pinned_option(name: str, cfg: Config) -> Option | None | bool:
    """False when the allocator decides `name`; else the option the YAML fixes (None = 16-bit)."""
    if keep_in_fp16(name, cfg.keep_fp16):
        return None
    for pattern, fields in cfg.overrides:
        if re.search(pattern, name):
            if fields.get("skip"):
                return None
            return Option(**{**cfg.default_option.to_dict(), **{k: v for k, v in fields.items() if k != "skip"}})
    return False


def allocatable(ms: Measurements, cfg: Config) -> tuple[list[str], int]:
    """Units the allocator decides (no member kept in 16-bit or overridden), and the bytes of the
    modules whose option the YAML fixes (they come off the budget)."""
    return _allocatable(ms.units, cfg)


def _allocatable(unit_entries: dict[str, dict], cfg: Config) -> tuple[list[str], int]:
    free, fixed = [], 0
    for key, u in unit_entries.items():
        pinned = [_pinned_option(n, cfg) for n in u["names"]]
        if all(p is False for p in pinned):
            free.append(key)
            continue
        for p, (i, o), k in zip(pinned, u["shapes"], _parts(u)):
            opt = cfg.default_option if p is False else p
            fixed += opt.bytes_for(i, o, k) if opt is not None else 0
    return free, fixed


def _parts(u: dict) -> list[int]:
    """How many linears the export writes each of a unit's modules as (Family.parts; 1 where not kept)."""
    return u.get("parts") or [1] * len(u["names"])


def unit_bytes(u: dict, o: Option) -> int:
    """The bytes a unit's modules take at option `o`, as written."""
    return sum(o.bytes_for(i, n, k) for (i, n), k in zip(u["shapes"], _parts(u)))


def quantized_weights(unit_entries: dict[str, dict], cfg: Config) -> int:
    """The weights of the modules that will be quantized: those keep_fp16 or a skip override keeps in
    16-bit count neither in an avg_bits budget (bits per quantized weight) nor in its bits/weight."""
    return sum(i * o for u in unit_entries.values() for n, (i, o) in zip(u["names"], u["shapes"])
               if _pinned_option(n, cfg) is not None)


def budget_bytes(cfg: Config, ms: Measurements) -> int | None:
    return _budget_bytes(cfg, quantized_weights(ms.units, cfg))


def _budget_bytes(cfg: Config, weights: int) -> int | None:
    if cfg.budget.memory is not None:
        return cfg.budget.memory
    if cfg.budget.avg_bits is not None:
        return int(cfg.budget.avg_bits * weights / 8)
    return None


# ------------------------------------------------------------------ the budget from tensor shapes alone

def shape_units(model, cfg: Config) -> dict[str, dict]:
    """Every unit's module names, shapes and weight count, like `Measurements.units` but from the
    module shapes alone: a meta-device skeleton (no weights, no calibration) is enough."""
    mods = dict(model.named_modules())
    fam = family_of(model)
    out = {}
    for u in units(model, cfg.units):
        shapes = [[mods[n].in_features, mods[n].out_features] for n in u.names]
        parts = [fam.parts(n) for n in u.names]
        out[u.key] = {"names": list(u.names), "shapes": shapes, "weights": sum(i * o for i, o in shapes),
                      **({"parts": parts} if set(parts) != {1} else {})}
    return out


def size_bounds(unit_entries: dict[str, dict], cfg: Config, head: int = 0) -> dict:
    """Smallest and largest total bytes any plan can have (Option.bytes_for of every shape, plus
    `head`: the lm_head a rotation unties, rotate.untied_head_bytes), the bytes the YAML fixes
    (keep_fp16/overrides), the head's, the weight count and the smallest/largest candidates."""
    free, fixed = _allocatable(unit_entries, cfg)
    per_option = [sum(unit_bytes(unit_entries[k], o) for k in free) for o in cfg.candidates]
    costs = [[unit_bytes(unit_entries[k], o) for o in cfg.candidates] for k in free]
    lo, hi = size_range(costs)
    return {"min": lo + fixed + head, "max": hi + fixed + head, "fixed": fixed, "head": head, "free": len(free),
            "weights": quantized_weights(unit_entries, cfg),
            "lowest": cfg.candidates[per_option.index(min(per_option))] if free else None,
            "largest": cfg.candidates[per_option.index(max(per_option))] if free else None}


def _size(b: int, weights: int) -> str:
    return f"{b:,} bytes ({b / 2**20:.2f} MiB, {8 * b / max(weights, 1):.2f} bits/weight)"


def _smallest(unit_entries, cfg: Config, head: int = 0, **change) -> int:
    """The smallest size with `change` applied to the config."""
    from dataclasses import replace
    return size_bounds(unit_entries, replace(cfg, **change), head)["min"]


def _pins(cfg: Config) -> list[str]:
    """The YAML entries that fix some units' options (their bytes come off the budget)."""
    pins = [f"overrides[{i}]" for i, (_, f) in enumerate(cfg.overrides) if not f.get("skip")]
    return pins + (["keep_fp16"] if cfg.keep_fp16 != Config(model="").keep_fp16 else [])


def _advice(unit_entries, cfg: Config, budget: int, b: dict) -> str:
    """What would make the budget feasible: raising it, and only those changes of the YAML that reach
    it (single changes first, then combinations), each with the smallest size it gives."""
    from dataclasses import replace
    from .packing import SUPPORTED_BITS
    w = b["weights"]
    bpw = lambda n: f"{8 * n / w:.2f} bits/weight"                      # noqa: E731
    raise_it = f"raise the budget to at least {b['min']:,} bytes ({bpw(b['min'])})"
    low = b["lowest"]
    changes = []                                    # (label, change) from the least to the most invasive
    def option(**kw) -> Option | None:     # None: no such option on this grid (ggml has no 3-bit type)
        try:
            o = replace(low, **kw)
        except (ValueError, QuantcError):
            return None
        return o if o.bytes_for(256, 256) != low.bytes_for(256, 256) else None   # a llama.cpp type fixes the group

    for bits in sorted((x for x in SUPPORTED_BITS if x < low.bits), reverse=True):
        if (o := option(bits=bits)) is not None:
            changes.append(("bits", f"add {bits}-bit to quant.bits", o))
    if low.group_size > 0:
        for g in [g for g in (64, 128, 256, 512, 1024) if g > low.group_size] + [-1]:
            name = "-1 (per channel)" if g == -1 else str(g)
            if (o := option(group_size=g)) is not None:
                changes.append(("group", f"add group_size {name} (fewer scales)", o))
    pins = _pins(cfg)
    if b["fixed"] and pins:
        changes.append(("pins", f"drop {', '.join(pins)} (fixing {b['fixed']:,} bytes)", None))
    if b["head"]:
        changes.append(("rotate", f"set quant.rotate: none (the lm_head it unties takes {b['head']:,} bytes)", None))

    def smallest(combo) -> int:
        opts = [c for _, _, c in combo if c is not None]
        if len({k for k, _, _ in combo if k != "pins"}) == 2:   # lower bits *with* the larger group
            bits_opt = next(c for k, _, c in combo if k == "bits")
            group_opt = next(c for k, _, c in combo if k == "group")
            opts.append(replace(low, bits=bits_opt.bits, group_size=group_opt.group_size))
        kw = {"candidates": [*cfg.candidates, *opts]}
        if any(k == "pins" for k, _, _ in combo):
            kw.update(overrides=[], keep_fp16=Config(model="").keep_fp16)
        head = 0 if any(k == "rotate" for k, _, _ in combo) else b["head"]
        return _smallest(unit_entries, cfg, head, **kw)

    singles, seen = [], set()
    for c in changes:                               # the first (least invasive) that works of each kind
        if c[0] not in seen and (lo := smallest([c])) <= budget:
            singles.append(f"{c[1]}: smallest size then {bpw(lo)}")
            seen.add(c[0])
    if singles:
        return "; or ".join([raise_it, *singles])
    kinds = {}
    for c in changes:
        kinds.setdefault(c[0], []).append(c)
    for n in (2, 3):                                # several changes together
        for group in itertools.combinations(sorted(kinds), n):
            for combo in itertools.product(*(kinds[k] for k in group)):
                if (lo := smallest(list(combo))) <= budget:
                    return f"{raise_it}; or, together, {' and '.join(c[1] for c in combo)}: smallest size then {bpw(lo)}"
    floor = _smallest(unit_entries, cfg, candidates=[Option(bits=min(SUPPORTED_BITS), group_size=-1)], overrides=[],
                      keep_fp16=Config(model="").keep_fp16)   # without the rotation (no untied head) too
    return (f"{raise_it} (nothing else reaches it: even {min(SUPPORTED_BITS)}-bit per channel everywhere needs "
            f"{bpw(floor)})")


def check_budget(unit_entries: dict[str, dict], cfg: Config, budget: int | None = None, key: str | None = None,
                 warn: bool = True, head: int = 0) -> None:
    """An infeasible avg_bits/memory budget is an error now, from shapes alone (not after the
    measurement): it names the budget and the achievable range in bytes, MiB and bits per weight, and
    only advice that would work. A budget above the largest size is clamped, with a warning. `head`:
    the bytes of an lm_head the rotation unties, which the budget pays for."""
    b = size_bounds(unit_entries, cfg, head)
    budget = _budget_bytes(cfg, b["weights"]) if budget is None else budget
    if budget is None or b["lowest"] is None:
        return
    kind = "memory" if cfg.budget.memory is not None else "avg_bits"
    file, key = (cfg.source_file, f"budget.{kind}") if key is None else ("", key)
    w = b["weights"]
    if budget < b["min"]:
        low = b["lowest"]
        lowest = f"every unit at {low.label}" + (", the lowest candidate already" if low.bits == 2 else "")
        fixed = f"; {b['fixed']:,} bytes of it fixed by {', '.join(_pins(cfg))}" if b["fixed"] else ""
        if b["head"]:
            fixed += f"; {b['head']:,} bytes of it the lm_head that quant.rotate unties from the embeddings"
        raise ConfigError(file, key, f"the budget of {_size(budget, w)} is infeasible: the smallest achievable size "
                          f"is {_size(b['min'], w)} ({lowest}{fixed}) and the largest {_size(b['max'], w)}. To fit: "
                          + _advice(unit_entries, cfg, budget, b))
    if budget > b["max"] and warn:
        top = b["largest"]
        more = "" if top.bits >= 8 else "; add 8-bit to quant.bits to use more of it"
        log.warning("the budget of %s is more than the largest achievable size %s (every unit at %s): "
                    "the plan uses at most that%s", _size(budget, w), _size(b["max"], w), top.label, more)


def solve(ms: Measurements, cfg: Config, budget: int | None = None, target: float | None = None,
          head: int = 0) -> Plan:
    """The plan for `budget` bytes (or the smallest one whose predicted ΔKL is ≤ `target`). The budget
    pays for the allocated units, the modules the YAML fixes and `head`, the lm_head a rotation unties
    (rotate.untied_head_bytes)."""
    from .serve import check, targets_for
    if budget is not None and target is None:
        check_budget(ms.units, cfg, budget, warn=False, head=head)

    keys, fixed = allocatable(ms, cfg)
    if not keys:
        raise QuantcError(f"{cfg.source_file}: every unit is pinned by keep_fp16/overrides; nothing to allocate")
    # only the options every runtime in `serve` runs (the YAML's candidates are checked when it is read)
    targets = targets_for(cfg)
    offered = [o for o in cfg.candidates if not check({"candidate": o}, targets)]
    if not offered:
        raise ConfigError(cfg.source_file, "serve", f"no candidate runs on {', '.join(targets)}")
    opt_keys = [option_key(o) for o in offered]
    costs = [[ms.units[k]["options"][o]["bytes"] for o in opt_keys] for k in keys]
    values = [[unit_dkl(ms.units[k], o) for o in opt_keys] for k in keys]
    if target is not None:
        sol = least_bytes(costs, values, target)
    else:
        sol = allocate(costs, values, budget - fixed - head)
    choices = {k: offered[o] for k, o in zip(keys, sol.choice)}
    lo, hi = size_range(costs)
    weights = sum(ms.units[k]["weights"] for k in keys)
    predicted = {"bytes": sol.bytes + fixed + head, "allocated_bytes": sol.bytes, "fixed_bytes": fixed,
                 "avg_bits": 8 * sol.bytes / max(weights, 1), "delta_kl": sol.value,
                 "untied_head_bytes": head,
                 "budget_bytes": budget, "dp_quantum_bytes": sol.quantum, "min_bytes": lo + fixed + head,
                 "max_bytes": hi + fixed + head}
    meta = {"model": cfg.hub or cfg.model, "measurement": ms.meta.get("key"), "units_mode": cfg.units}
    return Plan(choices, {k: ms.units[k]["names"] for k in keys}, predicted, meta)


def make_plan(cfg: Config, model, tokens: torch.Tensor, progress: bool = True, place: Placement = CPU,
              offload: Path | None = None) -> Plan:
    from .rotate import untied_head_bytes
    ms, _ = get_measurements(cfg, model, tokens, progress, place, offload)
    return solve(ms, cfg, budget_bytes(cfg, ms), cfg.budget.max_delta_loss, untied_head_bytes(model, cfg))
