"""The compile, top to bottom: load → calibrate → (measure → allocate) → quantize → export.

The passes know nothing of files, YAML or the CLI; this module wires them: the stage sequence, the
placement, timing and the manifest. Output staging lives in staging.py, resume state in resume.py,
the memory estimate in memory.py, the checks before heavy work in preflight.py.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import shutil
import time
from pathlib import Path

import torch

from . import __version__
from . import distributed
from .config import Config
from .errors import QuantcError
from .family import family_of
from .model import (TORCH_DTYPES, Activations, Placement, capture_layer0_inputs, decoder_layers, fetch_model,
                    keep_in_fp16, linear_names, resolve_device, source_identity)  # noqa: F401 (linear_names: re-exported)
from .memory import activation_bytes, check_memory, memory_estimate  # noqa: F401  (memory_estimate: re-exported)
from .options import Option
from .preflight import preflight
from . import rotate
from .resume import fault_point
from .staging import cleans_up_output, finalize_output, prepare_output, staged_files

log = logging.getLogger("quantc")


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




def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def module_table(model, options: dict[str, Option]) -> dict[str, dict]:
    mods, fam = dict(model.named_modules()), family_of(model)
    return {n: {**o.to_dict(), "in": mods[n].in_features, "out": mods[n].out_features,
                "bytes": o.bytes_for(mods[n].in_features, mods[n].out_features, fam.parts(n))}
            for n, o in options.items()}


def placement(cfg: Config, model) -> Placement:
    """Where the compile computes (`resources.device`, `resources.compute_dtype`; under torchrun, the
    rank's own GPU and its place in the process group), and whether the calibration activations fit on
    that device (else they stay in host memory, moved batch by batch)."""
    device = resolve_device(cfg.device)
    world = distributed.join(device)
    if world.active and device.type == "cuda" and device.index not in (None, world.local_rank):
        log.warning("resources.device %s: under torchrun each rank uses its LOCAL_RANK GPU; rank %d uses "
                    "cuda:%d", device, world.rank, world.local_rank)
    device = compute_device(cfg, world)
    dtype = TORCH_DTYPES[cfg.compute_dtype]
    on_device = True
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # every stream each sweep holds (QEP's reference inputs and the cached group inputs included),
        # for this rank's share of the batches; on the device nothing is offloaded to files
        need = max(activation_bytes(cfg, model.config.to_dict(), world.size, offload=False).values())
        on_device = need < 0.5 * free         # leave room for the layer, Hessians and the working set
        if world.active:                      # one decision for all ranks: their collectives (cpu:gloo for
            full = torch.tensor([0 if on_device else 1])   # host tensors, nccl for CUDA ones) must meet
            on_device = int(world.all_reduce(full)) == 0
        log.info("compute on %s in %s; calibration activations %.2f GiB %s", device, cfg.compute_dtype,
                 need / 2**30, "on the device" if on_device else "in host memory (moved batch by batch)")
    return Placement(device, dtype, on_device, world)


def load_source(cfg: Config):
    """The model (lazily, one decoder layer at a time, where it can) and its tokenizer."""
    from .model import load_model, load_tokenizer
    model = load_model(cfg.model, cfg.gguf_file, cfg.trust_remote_code, cfg.revision, lazy=cfg.lazy_load,
                       allow_pickle=cfg.allow_pickle)
    tokenizer = load_tokenizer(cfg.model, cfg.gguf_file, cfg.trust_remote_code)
    rotate.apply(model, cfg)            # quant.rotate: folded into the weights before any calibration
    return model, tokenizer


def fetched(cfg: Config) -> Config:
    """The configuration with its model as a local folder (model.fetch_model): a hub id's files are
    downloaded into the Hugging Face cache once, and `hub` keeps the name the YAML gave. A hub model's
    memory check runs here, once its files are there to estimate from (a local one's ran before)."""
    folder = fetch_model(cfg.model, cfg.revision, cfg.trust_remote_code, cfg.allow_pickle)
    if folder == cfg.model:
        return cfg
    cfg = dataclasses.replace(cfg, model=folder, hub=cfg.model)
    check_memory(cfg)
    return cfg


def compute_device(cfg: Config, world) -> torch.device:
    """This process's compute device: `resources.device`, and under torchrun on GPUs the rank's own
    (LOCAL_RANK)."""
    device = resolve_device(cfg.device)
    return torch.device("cuda", world.local_rank) if world.active and device.type == "cuda" else device


def calibrate(cfg: Config, tokenizer, model, world) -> torch.Tensor:
    """The calibration tokens. Sampled from the model (`calibration.source: self`, which needs the whole
    model in memory), rank 0 alone samples and sends them: the other ranks of a torchrun run keep one
    decoder layer at a time (memory.memory_estimate counts the whole model for rank 0 only)."""
    from .calibration import calibration_tokens
    from .calibration.data import self_tokens
    from .planning import cache_dir
    if cfg.calibration.source != "self":
        return calibration_tokens(cfg.calibration, tokenizer, model)

    def sample():         # once per model and settings: kept beside the measurement cache
        return self_tokens(cfg.calibration, tokenizer, model, compute_device(cfg, world),
                           source_identity(cfg.model, cfg.gguf_file, cfg.revision, model),
                           cache_dir().parent / "calibration")
    return world.broadcast(sample() if world.main else None, 0, patient=True) if world.active else sample()


def held_out(cfg: Config, tokenizer, model, place: Placement, offload: Path | None):
    """The compile's check (passes/quantize.py HeldOut): `calibration.check_samples` sequences that no
    pass calibrates on, as the first decoder layer's inputs (taken before release_outside sends the
    embeddings back to disk), or None when the source has no text left after the calibration's.
    Sampled from the model (`self`), they are kept beside the calibration's sample like it."""
    from .calibration.data import check_tokens, self_check, self_tokens
    from .passes.quantize import HeldOut
    from .planning import cache_dir
    cal = cfg.calibration
    if cal.source == "self":
        toks = self_tokens(self_check(cal), tokenizer, model, place.device,
                           source_identity(cfg.model, cfg.gguf_file, cfg.revision, model),
                           cache_dir().parent / "calibration")
    else:
        toks = check_tokens(cal, tokenizer, model)
    if toks.shape[0] == 0:
        room = " (a .txt source: no window's room between the calibration's)" if cal.source.lower().endswith(".txt") else ""
        log.warning("%s: calibration.source has no document left after the calibration's %d%s; the compile has "
                    "no held-out check (add text, or lower calibration.samples)", cfg.source_file or "config",
                    cal.samples, room)
        return None
    hidden, kwargs = capture_layer0_inputs(model, toks, cfg.calibration.batch_size)
    acts = Activations(hidden, kwargs, cfg.calibration.batch_size, offload, place)
    return HeldOut(toks, acts, acts.like(acts.hidden))



def plan_only(cfg: Config, progress: bool = True, offload: Path | None = None, budget_key: str | None = None):
    """`quantc plan`: check → preflight → fetch → load → calibrate → measure (or read the cache) → allocate.
    `offload`: where the measurement's hidden states go with `resources.offload_activations`;
    `budget_key`: the command-line option that set the budget, for messages.
    Returns (plan, measurements, cached, solve seconds)."""
    from .planning import budget_bytes, get_measurements, solve
    from .serve import check_modules, targets_for
    check_memory(cfg)                        # the compile's estimate: the plan is made for that compile
    preflight(cfg, budget_key=budget_key, calibrate=True)     # a hub id: its config and tokenizer alone
    cfg = fetched(cfg)
    torch.manual_seed(cfg.calibration.seed)
    model, tokenizer = load_source(cfg)
    check_modules(*resolve_options(model, cfg), targets_for(cfg), cfg.source_file)   # overrides, keep_fp16
    tokens = calibrate(cfg, tokenizer, model, distributed.join(resolve_device(cfg.device)))
    place = placement(cfg, model)
    ms, cached = get_measurements(cfg, model, tokens, progress and place.world.main, place,
                                  offload if cfg.offload_activations else None)
    t = time.perf_counter()
    plan = solve(ms, cfg, budget_bytes(cfg, ms), cfg.budget.max_delta_loss, rotate.untied_head_bytes(model, cfg))
    return plan, ms, cached, time.perf_counter() - t


@cleans_up_output
def compile_model(cfg: Config, out: str | Path, *, force: bool = False, plan_file: str | None = None,
                  progress: bool = True) -> dict | None:
    """Run the whole compile; return the manifest written to out/quantc.json (None on the ranks other
    than 0 of a distributed run: rank 0 alone writes)."""
    from .export.gptq import layer_tensors, write_gptq
    from .resume import Checkpoint
    from .passes.quantize import quantize_gptq, quantize_rtn
    from .serve import check_modules, targets_for

    out = Path(out)
    if plan_file is not None:              # the plan's options against the targets, before any work
        from .planning import read_plan_options
        read_plan_options(plan_file, cfg)
    check_memory(cfg)
    world = distributed.join(resolve_device(cfg.device))
    tmp = None
    if world.main:                          # rank 0 alone stages, checks the output and writes
        tmp = prepare_output(out, force)
        preflight(cfg, out, plan_file)      # seconds: patterns, budget from shapes, weights, calibration
    cfg = fetched(cfg)                      # a hub id: downloaded once the checks that need only its config passed
    progress = progress and world.main
    timings, traffic = {}, {}             # traffic: bytes rank 0 sent/received in collectives, per sweep
    distributed.SOLVES.count.clear()      # this compile's solves, per sweep (the manifest's split per rank)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.calibration.seed)
    model, tokenizer = load_source(cfg)
    timings["load_s"] = time.perf_counter() - t0
    from .lazy import is_lazy, release_outside, trim_heap
    if is_lazy(model):
        log.info("lazy loading: decoder layers are read from %s one at a time", cfg.model)
    place = placement(cfg, model)
    check_modules(*resolve_options(model, cfg), targets_for(cfg), cfg.source_file)   # overrides, keep_fp16

    offload = None                 # both sweeps' hidden states in files: every rank its own rows, rank 0
    if cfg.offload_activations:    # in its staging folder, the others beside -o
        offload = tmp / "offload" if world.main else out.resolve().parent / f".{out.name}.offload-rank{world.rank}"
    plan = None
    chosen = None
    tokens = None
    check = None                   # the held-out check's streams (rank 0, GPTQ compiles)
    if plan_file is not None or not cfg.uniform:
        from .planning import make_plan, read_plan
        if plan_file is not None:
            plan = read_plan(plan_file, model, cfg)
        else:
            t = time.perf_counter()
            tokens = calibrate(cfg, tokenizer, model, world)
            plan = make_plan(cfg, model, tokens, progress=progress, place=place, offload=offload)
            timings["plan_s"] = time.perf_counter() - t
            traffic["plan"] = distributed.TRAFFIC.total()
        chosen = plan.module_options()
    options, skipped = resolve_options(model, cfg, chosen)
    if not options:
        raise QuantcError(f"{cfg.source_file}: no linear layer is left to quantize (keep_fp16/overrides skip all)")
    check_modules(options, skipped, targets_for(cfg), cfg.source_file)

    t = time.perf_counter()
    dtype = getattr(torch, cfg.export_dtype)
    same = {k: v for k, v in cfg.to_dict().items() if k != "resources"}   # memory settings: same bytes ...
    same["compute"] = [place.device.type, str(place.dtype)]                # ... devices and dtypes: not
    if tokens is None and cfg.method != "rtn":
        tokens = calibrate(cfg, tokenizer, model, world)
    key = hashlib.sha256(json.dumps([same, {n: o.to_dict() for n, o in options.items()}], sort_keys=True,
                                    default=str).encode() + (tokens.numpy().tobytes() if tokens is not None else b"")
                         + source_identity(cfg.model, cfg.gguf_file, cfg.revision, model).encode())   # the weights
    ckpt = Checkpoint(tmp, key.hexdigest()[:24]) if world.main else None

    def layer_done(i, results, x_hat=None, x_ref=None, check=None):   # the layer's shard, then the resume point
        hat = world.gather_rows(x_hat.hidden) if x_hat is not None else None   # every rank's rows, on rank 0
        ref = world.gather_rows(x_ref.hidden) if x_ref is not None else None
        if world.main:
            ckpt.save_layer(i, layer_tensors(model, i, results, options, dtype))
            if hat is not None:
                ckpt.save_state(i, hat, ref, (check.ref.hidden, check.hat.hidden) if check is not None else None)
        fault_point(i, world.rank)

    if cfg.method == "rtn":
        if world.main:
            ckpt.discard()               # RTN keeps no resume point: a GPTQ one here must not outlive its shards
        quantize_rtn(model, options, layer_done, progress=progress, place=place)
    else:
        bs = cfg.calibration.batch_size
        hidden, kwargs = capture_layer0_inputs(model, world.local_rows(tokens, bs), bs)   # this rank's batches
        if world.main and cfg.calibration.check_samples:
            check = held_out(cfg, tokenizer, model, place, offload)
        release_outside(model)
        start, ref = 0, None
        resumed = ckpt.load() if world.main else None
        if world.broadcast(resumed is not None, 0):           # rank 0's resume point, each rank its rows
            start = world.broadcast(resumed[0] if resumed else None, 0)
            hidden = world.scatter_rows(resumed[1] if resumed else None, bs)
            ref_hidden = world.scatter_rows(resumed[2] if resumed else None, bs)
            ref = Activations(ref_hidden, kwargs, bs, offload, place) if ref_hidden is not None else None
            del ref_hidden
            if check is not None and resumed[3] is not None:     # the held-out streams where they were
                check.ref, check.hat = (check.ref.like(t) for t in resumed[3])
        del resumed
        acts = Activations(hidden, kwargs, bs, offload, place)
        # handed over: no name here keeps the first layer's inputs (nor, offloaded, their RAM copy)
        # alive through the sweep, and quantize_gptq releases them once that layer is done
        del hidden
        quantize_gptq(model, acts, options, damp=cfg.damp,
                      qep_alpha=cfg.qep_alpha, true_sequential=cfg.true_sequential,
                      block_size=cfg.block_size, start_layer=start, ref_acts=ref,
                      on_layer=layer_done, progress=progress, place=place, release_inputs=True, check=check)
    timings["quantize_s"] = time.perf_counter() - t
    checked = None
    if check is not None:               # the checkpoint against the original model, on text no pass saw
        from .lazy import head_loaded
        from .passes.measure import divergence
        t = time.perf_counter()
        with head_loaded(model):
            checked = divergence(model, check.tokens, check.ref, check.hat, place)
        if plan is not None:
            checked["predicted_delta_kl"] = plan.predicted.get("delta_kl")
        timings["check_forward_s"] = check.seconds     # inside quantize_s (a resumed run: its own layers')
        timings["check_s"] = time.perf_counter() - t
        check = None
    traffic["quantize"] = distributed.TRAFFIC.total() - traffic.get("plan", 0)
    solves = streams = None
    if world.active:             # every rank: a collective. None: the sweep did not run here (a cached
        solves = {k: v if sum(v) else None          # measurement, --plan, every layer resumed)
                  for k, v in distributed.SOLVES.per_rank(world, ("measure", "quantize", "streams")).items()}
        streams = solves.pop("streams")
    if not world.main:
        if offload is not None:       # its files were unlinked at creation: only the folder is left
            shutil.rmtree(offload, ignore_errors=True)
        return None

    t = time.perf_counter()
    trim_heap()
    shards = [ckpt.shard(i) for i in range(len(decoder_layers(model)))]
    qc = write_gptq(tmp, model, shards, options, skipped, tokenizer=tokenizer, damp=cfg.damp,
                    true_sequential=cfg.true_sequential, dtype=dtype)
    if plan is not None:
        plan.save(tmp / "plan.yaml")
    timings["export_s"] = time.perf_counter() - t
    if "onnx" in cfg.export_targets:        # built from the GPTQ files just written: the same integers
        from .export.onnx import export_onnx
        t = time.perf_counter()
        export_onnx(tmp, tmp / "onnx")
        timings["export_onnx_s"] = time.perf_counter() - t
    if "gguf" in cfg.export_targets:        # llama.cpp's Q4_0/Q4_1/Q8_0 from the same integers
        from .export.gguf import export_gguf
        t = time.perf_counter()
        source = str(Path(cfg.model) / cfg.gguf_file) if cfg.gguf_file else None
        export_gguf(tmp, tmp / "gguf", source_gguf=source, heads=cfg.gguf_heads, pre=cfg.gguf_pre)
        timings["export_gguf_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    modules = module_table(model, options)
    qbytes = sum(m["bytes"] for m in modules.values())
    weights = sum(m["in"] * m["out"] for m in modules.values())
    manifest = {
        "quantc": __version__,
        "source": {"model": cfg.model, "gguf_file": cfg.gguf_file,
                   **({"hub": cfg.hub, "revision": cfg.revision, "commit": Path(cfg.model).name} if cfg.hub else {})},
        "config": cfg.to_dict(),
        "quantization_config": qc,
        "totals": {"quantized_linear_bytes": qbytes, "quantized_weights": weights,
                   "avg_bits": 8 * qbytes / max(weights, 1), "modules": len(modules), "skipped": len(skipped)},
        "modules": modules,
        "skipped": skipped,
        "rotation": rotate.rotation_record(model, dtype),
        "check": checked,
        "timings": timings,
        "distributed": {"processes": world.size, "rank0_bytes": traffic, "solves_per_rank": solves,
                        "held_out_streams_per_rank": streams}
        if world.active else None,
        "files": {p.relative_to(tmp).as_posix(): sha256(p) for p in staged_files(tmp)},
    }
    (tmp / "quantc.json").write_text(json.dumps(manifest, indent=2))
    finalize_output(tmp, out)
    # the resume point goes only once the artifact is in place: an interrupt before the rename then
    # keeps it (a partial folder without one is deleted), one after leaves the finished artifact
    shutil.rmtree(out / "resume", ignore_errors=True)
    shutil.rmtree(out / "offload", ignore_errors=True)
    return manifest
