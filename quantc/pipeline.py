"""The compile, top to bottom: load → calibrate → (measure → allocate) → quantize → export.

The passes know nothing of files, YAML or the CLI; this module owns those, plus timing and the
atomic write of the output folder.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import torch

from . import __version__
from .config import Config
from .errors import QuantcError
from .model import Activations, capture_layer0_inputs, decoder_layers, keep_in_fp16, layer_linears
from .options import Option
from .preflight import preflight
from .staging import cleans_up_output, finalize_output, prepare_output, staged_files

log = logging.getLogger("quantc")


def linear_names(model) -> list[str]:
    return [f"model.layers.{i}.{n}" for i, layer in enumerate(decoder_layers(model)) for n in layer_linears(layer)]


def resolve_options(model, cfg: Config, chosen: dict[str, Option] | None = None) -> tuple[dict[str, Option], list[str]]:
    """Option of every decoder linear: the plan's choice (or the default option), then the YAML's
    overrides (first matching regex wins); modules matching keep_fp16 stay unquantized."""
    options, skipped = {}, []
    for name in linear_names(model):
        if keep_in_fp16(name, cfg.keep_fp16):
            skipped.append(name)
            continue
        opt = (chosen or {}).get(name, cfg.default_option)
        for pattern, fields in cfg.overrides:
            if re.search(pattern, name):
                if fields.get("skip"):
                    opt = None
                else:
                    opt = Option(**{**opt.to_dict(), **{k: v for k, v in fields.items() if k != "skip"}})
                break
        if opt is None:
            skipped.append(name)
        else:
            options[name] = opt
    return options, skipped


class Checkpoint:
    """Resume point of the quantize sweep, inside the temporary output folder: after every decoder
    layer, its quantized tensors and the activations entering the next layer. A rerun of the same
    compile (same config, plan and calibration: `key`) continues after the last finished layer."""

    def __init__(self, tmp: Path, key: str):
        self.dir, self.key = tmp / "resume", key

    def load(self):
        from safetensors.torch import load_file
        from .gptq import QuantResult
        state = self.dir / "state.json"
        if not state.is_file():
            return None
        st = json.loads(state.read_text())
        if st.get("key") != self.key:
            log.info("resume state is from another compile; starting over")
            return None
        results = {}
        for i in range(st["next_layer"]):
            t = load_file(str(self.dir / f"layer-{i}.safetensors"))
            for name in {k.rsplit(".", 1)[0] for k in t}:
                r = QuantResult(t[f"{name}.q"], t[f"{name}.scales"], t[f"{name}.zeros"], t[f"{name}.g_idx"], None)
                r.weight = r.dequantize()
                results[name] = r
        acts = load_file(str(self.dir / "acts.safetensors"))
        log.warning("resuming after decoder layer %d (%s)", st["next_layer"] - 1, self.dir)
        return st["next_layer"], results, acts["x_hat"], acts.get("x_ref")

    def save(self, i: int, layer_results: dict, x_hat, x_ref) -> None:
        from safetensors.torch import save_file
        self.dir.mkdir(exist_ok=True)
        t = {}
        for name, r in layer_results.items():
            t.update({f"{name}.q": r.q.contiguous(), f"{name}.scales": r.scales.contiguous(),
                      f"{name}.zeros": r.zeros.contiguous(), f"{name}.g_idx": r.g_idx.contiguous()})
        _atomic_save(save_file, t, self.dir / f"layer-{i}.safetensors")
        acts = {"x_hat": x_hat.hidden.contiguous()}
        if x_ref is not None:
            acts["x_ref"] = x_ref.hidden.contiguous()
        _atomic_save(save_file, acts, self.dir / "acts.safetensors")
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps({"key": self.key, "next_layer": i + 1}))
        os.replace(tmp, self.dir / "state.json")
        if os.environ.get("QUANTC_FAULT_AFTER_LAYER") == str(i):   # fault injection for the resume test
            os.kill(os.getpid(), 9)


def _atomic_save(save_file, tensors, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def module_table(model, options: dict[str, Option]) -> dict[str, dict]:
    mods = dict(model.named_modules())
    return {n: {**o.to_dict(), "in": mods[n].in_features, "out": mods[n].out_features,
                "bytes": o.bytes_for(mods[n].in_features, mods[n].out_features)} for n, o in options.items()}


def _param_count(folder: Path, lazy: bool = False) -> int | None:
    """Parameters of a local safetensors model, from the file headers only (no tensor is read).
    With `lazy`: those held at once when decoder layers are loaded one at a time (everything outside
    the layers plus the largest layer)."""
    import struct
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    outside, per_layer = 0, {}
    for f in files:
        with f.open("rb") as fh:
            size = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(size))
        for k, v in header.items():
            if k != "__metadata__":
                count = 1
                for d in v["shape"]:
                    count *= d
                m = re.match(r"model\.layers\.(\d+)\.", k)
                if m:
                    per_layer[m.group(1)] = per_layer.get(m.group(1), 0) + count
                else:
                    outside += count
    if lazy:
        return outside + max(per_layer.values(), default=0)
    return outside + sum(per_layer.values())


def memory_estimate(cfg: Config) -> dict | None:
    """Expected peak memory of the compile: fp32 weights, calibration activations (quantized and,
    with QEP, original inputs, plus one layer's cached intermediate inputs and outputs), Hessians."""
    folder = Path(cfg.model)
    cfgp = folder / "config.json"
    try:
        # a plan's measurement and `self` calibration hold every layer
        lazy = cfg.lazy_load and cfg.uniform and not cfg.gguf_file and cfg.calibration.source != "self"
        n = _param_count(folder, lazy) if folder.is_dir() else None
        mc = json.loads(cfgp.read_text()) if cfgp.is_file() else None
    except (OSError, ValueError, KeyError):   # unreadable files: the model loader reports them clearly
        return None
    if n is None or mc is None:
        return None
    hidden, inter = mc.get("hidden_size", 0), mc.get("intermediate_size", 0)
    tokens = cfg.calibration.samples * cfg.calibration.seq_len
    streams = 2 + (2 if cfg.qep_alpha > 0 else 0) + 2        # x̂ in/out, x in/out, cached attn/mlp inputs
    if cfg.offload_activations:
        streams = 2                                           # only the cached attn/mlp inputs stay in RAM
    acts = tokens * hidden * 4 * streams
    hess = 4 * (hidden * hidden * 3 + inter * inter) * (2 if cfg.qep_alpha > 0 else 1)
    batch = cfg.calibration.batch_size * cfg.calibration.seq_len * max(inter, hidden) * 4 * 6
    runtime = RUNTIME_BYTES                                   # the process itself: torch, transformers, the skeleton
    return {"weights": n * 4, "activations": acts, "hessians": hess, "working": batch, "runtime": runtime,
            "total": n * 4 + acts + hess + batch + runtime}


RUNTIME_BYTES = 500 * 2**20     # measured: python + torch + transformers + a meta skeleton ≈ 474 MiB


def available_memory() -> int | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(cfg: Config) -> None:
    est = memory_estimate(cfg)
    if est is None:
        return
    avail = available_memory()
    log.info("expected peak memory %.2f GiB (weights %.2f, activations %.2f, Hessians and working %.2f, "
             "runtime %.2f); available %s", est["total"] / 2**30, est["weights"] / 2**30, est["activations"] / 2**30,
             (est["hessians"] + est["working"]) / 2**30, est["runtime"] / 2**30,
             f"{avail / 2**30:.2f} GiB" if avail else "unknown")
    if avail is not None and est["total"] > avail:
        raise QuantcError(f"the compile needs about {est['total'] / 2**30:.2f} GiB but only {avail / 2**30:.2f} GiB "
                          f"is available (calibration activations alone {est['activations'] / 2**30:.2f} GiB); "
                          "lower calibration.samples or calibration.seq_len, or free memory")


@cleans_up_output
def compile_model(cfg: Config, out: str | Path, *, force: bool = False, plan_file: str | None = None,
                  progress: bool = True) -> dict:
    """Run the whole compile; return the manifest written to out/quantc.json."""
    from .calibration import calibration_tokens
    from .export.gptq import write_gptq
    from .model import load_model, load_tokenizer
    from .passes.quantize import quantize_gptq, quantize_rtn

    out = Path(out)
    check_memory(cfg)
    tmp = prepare_output(out, force)
    preflight(cfg, out, plan_file)          # seconds: patterns, budget from shapes, weights, calibration
    timings = {}
    t0 = time.perf_counter()
    torch.manual_seed(cfg.calibration.seed)
    model = load_model(cfg.model, cfg.gguf_file, cfg.trust_remote_code, cfg.revision, lazy=cfg.lazy_load,
                       allow_pickle=cfg.allow_pickle)
    tokenizer = load_tokenizer(cfg.model, cfg.gguf_file, cfg.trust_remote_code)
    timings["load_s"] = time.perf_counter() - t0
    from .lazy import is_lazy, materialize_all, release_all, release_outside, trim_heap
    if is_lazy(model):
        log.info("lazy loading: decoder layers are read from %s one at a time", cfg.model)

    plan = None
    chosen = None
    tokens = None
    if plan_file is not None or not cfg.uniform:
        from .planning import make_plan, read_plan
        if plan_file is not None:
            plan = read_plan(plan_file, model, cfg)
        else:
            t = time.perf_counter()
            tokens = calibration_tokens(cfg.calibration, tokenizer, model)
            materialize_all(model)          # the measurement runs every layer many times (then cached)
            plan = make_plan(cfg, model, tokens, progress=progress)
            release_all(model)
            timings["plan_s"] = time.perf_counter() - t
        chosen = plan.module_options()
    options, skipped = resolve_options(model, cfg, chosen)
    if not options:
        raise QuantcError(f"{cfg.source_file}: no linear layer is left to quantize (keep_fp16/overrides skip all)")

    t = time.perf_counter()
    if cfg.method == "rtn":
        results = quantize_rtn(model, options, progress=progress)
    else:
        if tokens is None:
            tokens = calibration_tokens(cfg.calibration, tokenizer, model)
        bs = cfg.calibration.batch_size
        hidden, kwargs = capture_layer0_inputs(model, tokens, bs)
        offload = tmp / "offload" if cfg.offload_activations else None
        release_outside(model)
        same = {k: v for k, v in cfg.to_dict().items() if k != "resources"}   # memory settings: same bytes
        key = hashlib.sha256(json.dumps([same, {n: o.to_dict() for n, o in options.items()}],
                                        sort_keys=True, default=str).encode() + tokens.numpy().tobytes())
        ckpt = Checkpoint(tmp, key.hexdigest()[:24])
        start, done, ref = 0, {}, None
        resumed = ckpt.load()
        if resumed is not None:
            start, done, hidden, ref_hidden = resumed
            ref = Activations(ref_hidden, kwargs, bs, offload) if ref_hidden is not None else None
        results = quantize_gptq(model, Activations(hidden, kwargs, bs, offload), options, damp=cfg.damp,
                                qep_alpha=cfg.qep_alpha, true_sequential=cfg.true_sequential,
                                block_size=cfg.block_size, start_layer=start, ref_acts=ref,
                                on_layer=ckpt.save, progress=progress)
        results = {**done, **results}
    timings["quantize_s"] = time.perf_counter() - t

    t = time.perf_counter()
    trim_heap()
    dtype = getattr(torch, cfg.export_dtype)
    qc = write_gptq(tmp, model, results, options, skipped, tokenizer=tokenizer, damp=cfg.damp,
                    true_sequential=cfg.true_sequential, dtype=dtype)
    if plan is not None:
        plan.save(tmp / "plan.yaml")
    timings["export_s"] = time.perf_counter() - t
    if "onnx" in cfg.export_targets:        # built from the GPTQ files just written: the same integers
        from .export.onnx import export_onnx
        t = time.perf_counter()
        export_onnx(tmp, tmp / "onnx")
        timings["export_onnx_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    modules = module_table(model, options)
    qbytes = sum(m["bytes"] for m in modules.values())
    weights = sum(m["in"] * m["out"] for m in modules.values())
    manifest = {
        "quantc": __version__,
        "source": {"model": cfg.model, "gguf_file": cfg.gguf_file},
        "config": cfg.to_dict(),
        "quantization_config": qc,
        "totals": {"quantized_linear_bytes": qbytes, "quantized_weights": weights,
                   "avg_bits": 8 * qbytes / max(weights, 1), "modules": len(modules), "skipped": len(skipped)},
        "modules": modules,
        "skipped": skipped,
        "timings": timings,
        "files": {p.relative_to(tmp).as_posix(): sha256(p) for p in staged_files(tmp)},
    }
    (tmp / "quantc.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(tmp / "resume", ignore_errors=True)
    shutil.rmtree(tmp / "offload", ignore_errors=True)
    finalize_output(tmp, out)
    return manifest
