"""Preflight: everything a compile or a plan can check before heavy work, in seconds.

It reads the model's config.json into a skeleton on the meta device (every module's name and shape,
no weights), the names of the weight files, and the calibration file; it never loads weights nor
runs the model. So a typo in a pattern, an infeasible budget, pickled weights, a bad calibration line
or a missing export package is an error before the model loads, not after the measurement.
"""
from __future__ import annotations

import importlib.util
import logging
import re
import time
from pathlib import Path

import torch

from .config import Config
from .errors import ConfigError, QuantcError
from .model import (check_supported, check_weight_files, keep_in_fp16, linear_names, read_model_type,
                     resolve_device)

log = logging.getLogger("quantc")


def skeleton(cfg: Config):
    """The model built from its config on the meta device: module names and shapes, no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM
    model_type = read_model_type(cfg.model)           # a corrupt config.json: its own clear message
    if model_type is not None:
        check_supported(model_type, cfg.model)
    kw = {"trust_remote_code": cfg.trust_remote_code, "revision": cfg.revision}
    if cfg.gguf_file and not (Path(cfg.model) / "config.json").is_file():
        kw["gguf_file"] = cfg.gguf_file
    try:
        config = AutoConfig.from_pretrained(cfg.model, **kw)
    except (OSError, ValueError) as e:
        msg = f"{cfg.model}: cannot read the model config: {str(e).splitlines()[0] if str(e) else e!r}"
        if not Path(cfg.model).exists():       # config.py took it for a hub id: perhaps a mistyped folder
            msg += (f" (read as a Hugging Face hub id: no folder {cfg.model!r} exists beside "
                    f"{cfg.source_file or 'the config'}; if you meant a local folder, check `model`)")
        raise QuantcError(msg) from None
    check_supported(config.model_type, cfg.model)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:   # a config.json that transformers cannot build a model from
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise QuantcError(f"{cfg.model}: cannot build the model from its config.json ({type(e).__name__}: {msg})") from None


def check_patterns(cfg: Config, model) -> None:
    """Every keep_fp16 regex must match a module of the model, and every override a decoder linear
    that neither keep_fp16 nor an earlier override (the first match wins) has taken: a pattern that
    matches nothing is a typo (`down_porj`) and would otherwise do nothing, silently."""
    file = cfg.source_file
    modules = [n for n, _ in model.named_modules() if n]
    linears = linear_names(model)
    example = f"names look like {linears[0]}" if linears else "the model has no decoder linears"
    for i, p in enumerate(cfg.keep_fp16):
        if not any(re.search(p, n) for n in modules):
            raise ConfigError(file, f"keep_fp16[{i}]", f"'{p}' matches no module of the model ({example}, "
                              "lm_head, model.embed_tokens); check the spelling or remove it")
    taken = {n: "keep_fp16" for n in linears if keep_in_fp16(n, cfg.keep_fp16)}
    for i, (p, _) in enumerate(cfg.overrides):
        hits = [n for n in linears if re.search(p, n)]
        if not hits:
            raise ConfigError(file, f"overrides[{i}].match", f"'{p}' matches no decoder linear of the model "
                              f"({example}); check the spelling or remove the override")
        free = [n for n in hits if n not in taken]
        if not free:
            by = sorted({taken[n] for n in hits})
            raise ConfigError(file, f"overrides[{i}].match", f"'{p}' has no effect: every linear it matches "
                              f"({len(hits)}, e.g. {hits[0]}) is already decided by {', '.join(by)} (the first "
                              "match wins); remove it or move it up")
        for n in free:
            taken[n] = f"overrides[{i}]"


def check_calibration(cfg: Config) -> None:
    """The calibration source now: its format, then its tokens, the held-out check's included
    (remembered, so the compile does not read, stream or tokenize again): too short, no long-enough
    document, a bad line or row anywhere in what the compile will read."""
    from .calibration.data import calibration_tokens, check_source
    from .model import load_tokenizer
    cal = cfg.calibration
    check_source(cal)
    if cal.source == "self":
        return
    calibration_tokens(cal, load_tokenizer(cfg.model, cfg.gguf_file, cfg.trust_remote_code))


def check_context(cfg: Config, model) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and cfg.calibration.seq_len > limit:      # runs, but calibrates on positions never trained
        log.warning("%s: calibration.seq_len %d is longer than the model's context (%d, max_position_embeddings); "
                    "lower it", cfg.source_file, cfg.calibration.seq_len, limit)


def check_export(cfg: Config) -> None:
    if "onnx" in cfg.export_targets and importlib.util.find_spec("onnx") is None:
        raise ConfigError(cfg.source_file, "export.targets", "onnx needs the `onnx` package, which is not "
                          "installed: pip install 'quantc[onnx]', or remove onnx from the targets")
    folder = Path(cfg.model)
    if "onnx" in cfg.export_targets and (folder / "config.json").is_file():   # a family without an ONNX graph
        from .export.onnx import SUPPORTED
        mt = read_model_type(str(folder))
        if mt not in SUPPORTED:
            raise ConfigError(cfg.source_file, "export.targets", f"onnx: model_type {mt!r} is not supported by the "
                              f"ONNX exporter (supported: {', '.join(SUPPORTED)}); remove onnx from the targets")
    if "gguf" in cfg.export_targets and (folder / "config.json").is_file():   # found now, not after the sweep
        import json
        from .export.gguf import check_source
        try:
            source = str(folder / cfg.gguf_file) if cfg.gguf_file else None
            check_source(folder, json.loads((folder / "config.json").read_text()), source, cfg.gguf_pre)
        except QuantcError as e:
            raise ConfigError(cfg.source_file, "export.targets", f"gguf: {e}") from None


def check_output(cfg: Config, out, plan_file=None) -> None:
    """The output folder is replaced as a whole (--force): it must not hold an input of this run."""
    o = Path(out).resolve()
    inputs = [("the model folder", cfg.model), ("the budget file", cfg.source_file), ("the plan file", plan_file),
              ("the calibration file", cfg.calibration.source)]
    for what, p in inputs:
        if not p or not Path(p).exists():
            continue
        p = Path(p).resolve()
        if p == o or o in p.parents:
            raise QuantcError(f"the output {out} holds {what} {p}, and writing the output replaces that folder; "
                              "choose another -o")


def check_disk(cfg: Config, model, out) -> None:
    """The output's folder must have room for at least the smallest possible output (quantized linears at
    the smallest size, everything else in 16 bits) and the resume point's activations, or the compile
    would fail at its very end."""
    import shutil
    from .planning import shape_units, size_bounds
    parent = Path(out).resolve().parent
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        return
    linear = set(linear_names(model))
    other = sum(p.numel() for n, p in model.named_parameters() if n.rsplit(".", 1)[0] not in linear) * 2
    from .rotate import untied_head_bytes
    quantized = size_bounds(shape_units(model, cfg), cfg, untied_head_bytes(model, cfg))["min"]
    acts = 0
    if cfg.method != "rtn":
        acts = cfg.calibration.samples * cfg.calibration.seq_len * model.config.hidden_size * 4
        acts *= 2 if cfg.qep_alpha > 0 else 1
    need = quantized + other + acts
    if free < need:
        gib = lambda n: f"{n / 2**30:.2f} GiB"                            # noqa: E731
        raise QuantcError(f"{parent} has {gib(free)} free, but the output needs at least {gib(need)} (quantized "
                          f"linears {gib(quantized)}, other weights {gib(other)}, resume-point activations "
                          f"{gib(acts)}); free some space or choose another -o")


def preflight(cfg: Config, out=None, plan_file=None, *, budget_key: str | None = None,
              calibrate: bool | None = None):
    """Run every early check; return the skeleton. `calibrate` (default: when the run calibrates)
    checks the calibration source; `budget_key` names a command-line budget in messages."""
    t = time.perf_counter()
    if out is not None:
        check_output(cfg, out, plan_file)
    resolve_device(cfg.device)              # `cuda` asked for on a machine without one: now, not after the load
    check_weight_files(cfg.model, cfg.gguf_file, cfg.allow_pickle)
    check_export(cfg)
    model = skeleton(cfg)
    if cfg.rotate != "none":                # a size with no known Hadamard matrix: now, not after the load
        from .rotate import check_config
        try:
            check_config(model.config)
        except QuantcError as e:
            raise ConfigError(cfg.source_file, "quant.rotate", str(e)) from None
    check_patterns(cfg, model)
    plans = plan_file is None and not cfg.uniform
    if plan_file is not None:
        from .planning import read_plan
        read_plan(plan_file, model, cfg)
        if not cfg.uniform:
            log.warning("%s: the budget is not used: the plan file %s decides every unit", cfg.source_file, plan_file)
    elif cfg.uniform and len(cfg.candidates) > 1:     # most likely a forgotten budget
        log.warning("%s: %d candidate options and no budget: every linear gets the largest, %s; add budget.avg_bits "
                    "or budget.memory to allocate among them, or list one option", cfg.source_file,
                    len(cfg.candidates), cfg.default_option.label)
    elif plans and cfg.budget.max_delta_loss is None:
        from .planning import check_budget, shape_units
        from .rotate import untied_head_bytes
        check_budget(shape_units(model, cfg), cfg, key=budget_key, head=untied_head_bytes(model, cfg))
    if out is not None:
        check_disk(cfg, model, out)
    if calibrate if calibrate is not None else (cfg.method != "rtn" or plans):
        check_context(cfg, model)
        check_calibration(cfg)
    log.debug("preflight checks: %.1f s", time.perf_counter() - t)
    return model
