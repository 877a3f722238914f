"""The solve between the two sweeps: measurements (cached on disk) → allocation → Plan.

A measurement is keyed by the model, the calibration tokens and the candidate options, so one
measurement serves any number of budgets: re-planning for another budget takes seconds.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from .config import Config
from .errors import ConfigError, QuantcError
from .model import CPU, Activations, Placement, capture_layer0_inputs, keep_in_fp16, units
from .options import Option
from .passes.allocate import allocate, least_bytes, size_range
from .passes.measure import Measurements, measure, option_key, unit_dkl

log = logging.getLogger("quantc")
MEASURE_VERSION = 3


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
                "units": {k: {"modules": self.unit_names[k], **o.to_dict()} for k, o in self.choices.items()}}

    def save(self, path: Path) -> None:
        tmp = Path(f"{path}.tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, width=120))
        os.replace(tmp, path)


def read_plan_options(path: str | Path, cfg: Config) -> tuple[dict[str, Option], dict[str, list[str]], dict]:
    """Read an (edited) plan file without the model: unit key -> option (checked: bits, group size, and
    every runtime the compile targets: serve.targets_for), unit key -> the modules the file lists, and
    the raw mapping."""
    from .config import _bits, _group
    from .serve import check, refuse, targets_for
    file = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(file, "", f"cannot read the plan: {e}") from None
    if not isinstance(raw, dict) or "units" not in raw or not isinstance(raw["units"], dict):
        raise ConfigError(file, "units", "not a quantc plan (written by `quantc plan`)")
    choices, listed = {}, {}
    for key, entry in raw["units"].items():
        if not isinstance(entry, dict):
            raise ConfigError(file, f"units.{key}", "expected a mapping with bits, group_size, ...")
        fields = {k: v for k, v in entry.items() if k in Option.__dataclass_fields__}
        try:
            opt = Option(**fields)
        except TypeError as e:
            raise ConfigError(file, f"units.{key}", str(e)) from None
        _bits(opt.bits, file, f"units.{key}.bits")
        _group(opt.group_size, file, f"units.{key}.group_size")
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
    """Read an (edited) plan file and check it against the model's units."""
    file = str(path)
    choices, _, raw = read_plan_options(path, cfg)
    model_units = {u.key: list(u.names) for u in units(model, cfg.units)}
    for key in choices:
        if key not in model_units:
            raise ConfigError(file, f"units.{key}", "the plan does not match the model: no such unit "
                              f"(the model has {len(model_units)} units, e.g. {next(iter(model_units))})")
    names = {key: model_units[key] for key in choices}
    return Plan(choices, names, raw.get("predicted", {}), raw.get("meta", {}))


def cache_dir() -> Path:
    return Path(os.environ.get("QUANTC_CACHE", Path.home() / ".cache" / "quantc")) / "measurements"


def measurement_key(cfg: Config, tokens: torch.Tensor, model) -> str:
    """Model identity (config + weight file sizes and mtimes), calibration tokens, options, method."""
    h = hashlib.sha256()
    src = Path(cfg.model)
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    if src.is_dir():
        for f in sorted(src.iterdir()):
            if f.suffix in (".safetensors", ".bin", ".gguf"):
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    else:
        h.update(cfg.model.encode())
    h.update(tokens.numpy().tobytes())
    h.update(json.dumps([o.to_dict() for o in cfg.candidates], sort_keys=True).encode())
    p = cfg.plan
    h.update(f"{cfg.method}:{cfg.damp}:{cfg.units}:{p.noise}:{p.direct_bits}:{p.predictor}:{p.probes}:"
             f"{cfg.compute_dtype}:{MEASURE_VERSION}".encode())
    return h.hexdigest()[:20]


def get_measurements(cfg: Config, model, tokens: torch.Tensor, progress: bool = True,
                     place: Placement = CPU) -> tuple[Measurements, bool]:
    """Measure (sweep 1), or read the cached measurement of the same model/calibration/options.
    The calibration tokens are split: the first `measure_samples` sequences give the Hessians,
    the held-out `alpha_samples` give α (truncated to `alpha_seq_len` tokens)."""
    p = cfg.plan
    n_measure = min(p.measure_samples, max(1, tokens.shape[0] - p.alpha_samples))
    calib = tokens[:n_measure]
    hold = tokens[-p.alpha_samples:, : p.alpha_seq_len]
    key = measurement_key(cfg, torch.cat([calib.flatten(), hold.flatten()]), model)
    path = cache_dir() / f"{key}.json"
    if path.is_file():
        log.info("measurements read from cache %s", path)
        return Measurements.from_dict(json.loads(path.read_text())), True
    t = time.perf_counter()
    bs = cfg.calibration.batch_size
    hidden, kw = capture_layer0_inputs(model, calib, bs)
    hh, hkw = capture_layer0_inputs(model, hold, bs)
    ms = measure(model, Activations(hidden, kw, bs, place=place), Activations(hh, hkw, bs, place=place), hold,
                 cfg.candidates, predictor=p.predictor, probes=p.probes, unit_mode=cfg.units, method=cfg.method,
                 damp=cfg.damp, seed=cfg.calibration.seed, noise=p.noise, direct_bits=p.direct_bits,
                 progress=progress, place=place)
    ms.meta = {**ms.meta, "key": key, "model": cfg.model, "measure_samples": int(n_measure),
               "alpha_tokens": int(hold.numel()), "seconds": time.perf_counter() - t, "method": cfg.method}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(ms.to_dict()))
    os.replace(tmp, path)
    return ms, False


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
    free, fixed = [], 0
    for key, u in ms.units.items():
        pinned = [_pinned_option(n, cfg) for n in u["names"]]
        if all(p is False for p in pinned):
            free.append(key)
            continue
        for p, (i, o) in zip(pinned, u["shapes"]):
            opt = cfg.default_option if p is False else p
            fixed += opt.bytes_for(i, o) if opt is not None else 0
    return free, fixed


def budget_bytes(cfg: Config, ms: Measurements) -> int | None:
    if cfg.budget.memory is not None:
        return cfg.budget.memory
    if cfg.budget.avg_bits is not None:
        weights = sum(u["weights"] for u in ms.units.values())
        return int(cfg.budget.avg_bits * weights / 8)
    return None




def solve(ms: Measurements, cfg: Config, budget: int | None = None, target: float | None = None) -> Plan:
    from .serve import check, targets_for
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
        sol = allocate(costs, values, budget - fixed)
    choices = {k: offered[o] for k, o in zip(keys, sol.choice)}
    lo, hi = size_range(costs)
    weights = sum(ms.units[k]["weights"] for k in keys)
    predicted = {"bytes": sol.bytes + fixed, "allocated_bytes": sol.bytes, "fixed_bytes": fixed,
                 "avg_bits": 8 * sol.bytes / max(weights, 1), "delta_kl": sol.value,
                 "budget_bytes": budget, "dp_quantum_bytes": sol.quantum, "min_bytes": lo + fixed,
                 "max_bytes": hi + fixed}
    meta = {"model": cfg.model, "measurement": ms.meta.get("key"), "units_mode": cfg.units}
    return Plan(choices, {k: ms.units[k]["names"] for k in keys}, predicted, meta)


def make_plan(cfg: Config, model, tokens: torch.Tensor, progress: bool = True, place: Placement = CPU) -> Plan:
    ms, _ = get_measurements(cfg, model, tokens, progress, place)
    return solve(ms, cfg, budget_bytes(cfg, ms), cfg.budget.max_delta_loss)
