"""The memory estimate printed (and enforced) before a compile starts: what the compile will hold at
its peak, from the model's config.json and safetensors headers, without reading a weight."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from .config import Config
from .errors import QuantcError

log = logging.getLogger("quantc")


def _param_count(folder: Path, lazy: bool = False) -> int | None:
    """Parameters of a local safetensors model, from the file headers only (no tensor is read).
    With `lazy`: those held at once when decoder layers are loaded one at a time (everything outside
    the layers plus the largest layer)."""
    from .model import weight_files
    from .tensorfile import read_header
    files = weight_files(folder)
    if not files:
        return None
    from .family import BY_TYPE, FAMILIES
    from .model import read_model_type
    layer_key = re.compile(re.escape((BY_TYPE.get(read_model_type(str(folder))) or FAMILIES[0]).layers) + r"\.(\d+)\.")
    outside, per_layer = 0, {}
    for f in files:
        header, _ = read_header(f)
        for k, v in header.items():
            if k != "__metadata__":
                count = 1
                for d in v["shape"]:
                    count *= d
                m = layer_key.match(k)
                if m:
                    per_layer[m.group(1)] = per_layer.get(m.group(1), 0) + count
                else:
                    outside += count
    if lazy:
        return outside + max(per_layer.values(), default=0)
    return outside + sum(per_layer.values())


def solved_options(cfg) -> int:
    """Options sweep 1 solves for every unit: one per bit width with `plan.solve: anchors` (fisher,
    GPTQ), else every candidate (passes/measure.py)."""
    from .passes.measure import anchors
    if cfg.plan.predictor == "fisher" and cfg.plan.solve == "anchors" and cfg.method == "gptq":
        return len(set(anchors(cfg.candidates)))
    return len(cfg.candidates)


def held_out_streams(cfg, layers: int) -> int:
    """The perturbed held-out streams sweep 1 carries to the head (passes/measure.py; the manifest's
    meta.held_out_streams): fisher, each sample unit at each solved option, and with
    plan.check_uniform a uniform plan per solved option; exact, every unit at each measured option,
    its α probe, and one LieQ stream per layer."""
    per_layer = 7 if cfg.units == "linear" else 4         # units per layer (a Llama-shaped layer)
    if cfg.plan.predictor == "fisher":
        from .passes.measure import CALIBRATION_UNITS
        return solved_options(cfg) * (int(cfg.plan.check_uniform) + min(CALIBRATION_UNITS, per_layer * layers))
    direct = sum(1 for o in cfg.candidates if o.bits <= cfg.plan.direct_bits)
    return layers * (per_layer * (direct + 1) + 1)


def _shapes(mc: dict) -> tuple[int, int, int, int, int]:
    """(hidden, intermediate, layers, vocab, attention width) from config.json's values."""
    hidden, inter = mc.get("hidden_size", 0), mc.get("intermediate_size", 0)
    heads = mc.get("num_attention_heads") or 1
    # attention width (q_proj's outputs, o_proj's inputs): heads · head_dim, not hidden on Qwen3 and Gemma 3
    attn = heads * (mc.get("head_dim") or hidden // heads)
    return hidden, inter, mc.get("num_hidden_layers", 0), mc.get("vocab_size", 0), attn


def _rank_rows(n: int, batch_size: int, ranks: int) -> int:
    """Rows of `n` that the busiest rank holds: whole batches, split as distributed.World.share does
    (rank 0 takes one batch more when uneven)."""
    from .distributed import World
    return min(n, len(World(0, ranks).share(-(-n // batch_size))) * batch_size)


def activation_bytes(cfg: Config, mc: dict, ranks: int = 1, offload: bool | None = None,
                     gathers: bool = False) -> dict:
    """Bytes of the activations each sweep holds where the calibration activations live (host
    memory, or the compute device when they fit there: pipeline.placement asks this), from
    config.json's values. `ranks`: processes that split the calibration batches (each holds its
    share of whole batches; distributed.World.share); `offload`: whether they go to files (default
    `resources.offload_activations`); `gathers`: rank 0 of a distributed run, which gathers every
    rank's rows of the resume points after each layer (in host memory: the parts, then their
    concatenation, of x̂ and with QEP x in sweep 2, of the calibration stream in sweep 1).
    - quantize (sweep 2): x̂ in/out, with QEP x in/out, one layer's cached attention/MLP inputs, rank 0's
      held-out check streams (through the original and the quantized layers, in/out), and
      with QEP the original layer's input of every group (taken in one forward before the layer's
      weights change and held until that group's δ is summed: passes/quantize.py reference_inputs;
      they stay where the activations live, so offloading does not remove them);
    - measure (sweep 1, with a budget): its calibration activations in/out, the held-out streams
      (fisher: every layer's held-out input, each sample unit's stream per solved option and with
      plan.check_uniform the uniform plan's, and the probes' gradients; exact: every perturbed stream
      alive at the last layer; a rank other than 0 holds its share of the streams and probes), and the
      head's logits; offloaded, only the probes' gradients and the logits stay in memory."""
    hidden, inter, layers, vocab, attn = _shapes(mc)
    act_bytes = 2 if cfg.compute_dtype in ("bfloat16", "float16") else 4
    offload = cfg.offload_activations if offload is None else offload
    c = cfg.calibration
    tokens = _rank_rows(c.samples, c.batch_size, ranks) * c.seq_len
    streams = 0 if offload else 2 + (2 if cfg.qep_alpha > 0 else 0)    # x̂ in/out, x in/out (offloaded: in files)
    quantize = tokens * (hidden * streams + attn + hidden) * act_bytes  # + the cached o_proj and MLP inputs
    if cfg.qep_alpha > 0:
        quantize += tokens * (hidden + attn + hidden + inter) * act_bytes   # q/k/v, o, gate/up, down inputs
    if gathers and ranks > 1 and cfg.method != "rtn":
        quantize += 2 * c.samples * c.seq_len * hidden * act_bytes * (2 if cfg.qep_alpha > 0 else 1)
    if (gathers or ranks == 1) and cfg.method != "rtn" and not offload:
        # rank 0's held-out check (passes/quantize.py HeldOut): its two streams, each in and out of a layer
        quantize += 4 * c.check_samples * c.seq_len * hidden * act_bytes
    measure = 0
    if not cfg.uniform:
        p = cfg.plan
        held = p.alpha_samples * p.alpha_seq_len * hidden * act_bytes
        calib = _rank_rows(p.measure_samples, c.batch_size, ranks) * c.seq_len * hidden * act_bytes * 2
        n_streams = held_out_streams(cfg, layers)
        inputs, probes = (layers, p.probes) if p.predictor == "fisher" else (0, 0)
        # the streams and probes are split over the ranks; each rank pickles its share for the resume
        # point's gather after each layer, and rank 0 then holds every rank's streams (gather_object's
        # byte buffer of them all, then the unpickled copies)
        mine = -(-n_streams // ranks)
        sent = mine if ranks > 1 else 0
        kept = 2 * n_streams if gathers and ranks > 1 else 0
        share = mine + sent + kept
        grads = 2 * -(-probes // ranks)                        # a probe's gradient in and out of a layer
        live = held * (inputs + share + grads)                 # + fisher: every layer's held-out input
        if offload:          # every hidden-state stream in files: the probes' gradients stay in memory,
            #                  and rank 0's copies of the other ranks' streams while it saves
            calib, live = 0, held * (grads + sent + kept)
        # vocabulary-sized float32 arrays over the compared positions (every second one), per sequence:
        # the comparisons hold the head's reference z_ref and p for the whole slice beside one batch's
        # logit shift (passes/measure.py Head); the fisher probes then hold one batch's logits and p,
        # or p beside one sequence's float64 copy and CDF (2 each), the reference dropped
        seq = (p.alpha_seq_len // 2) * vocab * 4
        batch = min(c.batch_size, p.alpha_samples) * seq
        logits = 2 * p.alpha_samples * seq + batch
        if p.predictor == "fisher":
            logits = max(logits, 2 * batch, batch + 4 * seq)
        if gathers and ranks > 1:      # rank 0 gathers every rank's calibration rows for the resume point
            calib += 2 * _rank_rows(p.measure_samples, c.batch_size, 1) * c.seq_len * hidden * act_bytes
        measure = calib + live + logits
    return {"quantize": quantize, "measure": measure}


def memory_estimate(cfg: Config, ranks: int = 1, gathers: bool = True) -> dict | None:
    """Expected peak memory of one process of the compile, from config.json and the safetensors
    headers alone. `ranks`: processes of a torchrun run (each holds its share of the calibration
    batches); `gathers`: the process is rank 0, which also gathers the resume point (activation_bytes).

    Weights: one decoder layer in fp32 plus everything outside the layers when layers load lazily
    (both sweeps), else the model. Then the larger of the two sweeps' working sets: each sweep's
    activations (`activation_bytes`), and in sweep 2 one layer's codes (finished layers go to their
    shard at once);
    plus the larger of the capture (the Hessians' sums — sweep 2: one input group's, every group's of a
    layer with true_sequential: false; sweep 1: a layer's — and a batch's forward buffers) and the
    solves (float32 Hessians, the Cholesky, one stack of options, sweep 1's codes of the units solved
    before the current one), and the runtime. After the sweeps, rank 0's held-out check compares one
    sequence's logits at a time (`check`), in place of the sweep's working set when it is larger (a
    large vocabulary beside a small calibration). The export adds no term: it writes one tensor at a
    time (tensorfile.write), the largest of which is one of the weights already counted."""
    folder = Path(cfg.model)
    cfgp = folder / "config.json"
    try:
        # `self`: the sampling process (rank 0, which gathers) holds every layer (pipeline.calibrate)
        lazy = cfg.lazy_load and not cfg.gguf_file and not (cfg.calibration.source == "self" and gathers)
        n = _param_count(folder, lazy) if folder.is_dir() else None
        mc = json.loads(cfgp.read_text()) if cfgp.is_file() else None
    except (OSError, ValueError, KeyError):   # unreadable files: the model loader reports them clearly
        return None
    if n is None or mc is None:
        return None
    hidden, inter, layers, vocab, attn = _shapes(mc)
    if cfg.rotate != "none" and mc.get("tie_word_embeddings"):
        n += vocab * hidden                                   # the lm_head the rotation unties
    act = activation_bytes(cfg, mc, ranks, gathers=gathers)
    layer_weights = hidden * attn * 4 + 3 * hidden * inter    # q/k/v/o (upper bound) + MLP, one layer
    quantize = act["quantize"] + layer_weights                # + one layer's uint8 codes
    measure = act["measure"]
    widths = (hidden, attn, hidden, inter)                    # q/k/v, o, gate/up, down inputs
    acts = max(quantize, measure)
    # Hessians: float64 sums (8 bytes per entry) rounded to a float32 H (4 bytes) when read (with QEP
    # a second, cross sum and δ beside each). Sweep 2 holds one input group's at a time (down_proj's is
    # the largest), except with true_sequential: false, where one forward of the layer sums every
    # group's before the first is read; sweep 1 sums every group of a layer, then keeps their H.
    largest = max(w * w for w in widths)
    every = sum(w * w for w in widths)
    qep = 2 if cfg.qep_alpha > 0 else 1
    sums = 8 * (largest if cfg.true_sequential else every) * qep
    if not cfg.uniform:
        sums = max(sums, 8 * every)
    hess = sums + 4 * largest * qep                           # the largest group's float32 H beside the sums
    batch = cfg.calibration.batch_size * cfg.calibration.seq_len * max(inter, hidden, attn) * 4 * 6
    # A layer's two moments; the larger counts. The capture: the sums, and either a batch's forward
    # buffers (during the forward) or the largest float32 H being rounded beside its sum (after it).
    # The solves: a float32 H and its working set, the Cholesky's two n × n matrices, or its factor
    # beside one stack of options of the largest linear (its W, Q and codes: gptq.STACK_BYTES or one
    # option, with the stack's results). Sweep 2 holds one group's H at a time. Sweep 1 solves the
    # widest input first, beside every group's H and no codes; each later solve runs beside the H not
    # yet released (fisher: the widest's is; exact keeps every H for its noise probes) and the codes
    # of every solved option so far (at most the layer's, one byte a weight; solved_options).
    from .gptq import STACK_BYTES
    linear = max(hidden * inter, hidden * attn)
    k = 1 if cfg.uniform else solved_options(cfg)
    # a stack: options of one group layout (the sample's units solve every candidate)
    stack = max(1, min(1 if cfg.uniform else len(cfg.candidates), STACK_BYTES // max(1, linear * 4)))

    def work(n2: int) -> int:                                 # beside a float32 H of n2 entries
        return max(2 * 4 * n2, 4 * n2 + stack * linear * 4 * 5)
    if cfg.uniform:
        solve = 4 * largest + work(largest)
    else:
        second = sorted(w * w for w in widths)[-2]
        kept = every if cfg.plan.predictor == "exact" else every - largest    # exact keeps every H for its α
        solve = max(4 * every + work(largest), 4 * kept + work(second) + k * layer_weights)
    layer = max(sums + max(batch, 4 * largest * qep), solve)
    runtime = RUNTIME_BYTES                                   # the process itself: torch, transformers, the skeleton
    c = cfg.calibration
    # the held-out check's comparison at the end of a GPTQ compile (rank 0), once the sweep's activations,
    # layer and Hessians are gone: one sequence's vocabulary-sized float32 arrays over its compared
    # positions (passes/measure.py Head: z_ref and p, then a comparison's logit shift)
    check = 3 * (c.seq_len // 2) * vocab * 4 if gathers and cfg.method != "rtn" and c.check_samples > 0 else 0
    return {"weights": n * 4, "activations": acts, "measurement": measure, "quantize": quantize,
            "hessians": hess, "working": batch, "solve": solve, "layer": layer, "runtime": runtime,
            "check": check, "total": n * 4 + max(acts + layer, check) + runtime}


RUNTIME_BYTES = 500 * 2**20     # measured: python + torch + transformers + a meta skeleton ≈ 474 MiB


def available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(cfg: Config) -> None:
    """Refuse a compile that cannot fit in this host's available memory, before any work. Under
    torchrun every process of this host counts (each loads its layer, holds its Hessians and its share
    of the activations; rank 0 also gathers the resume point): they share one MemAvailable."""
    from .distributed import launch_shape
    ranks, local, has_rank0 = launch_shape()
    est = memory_estimate(cfg, ranks)                         # rank 0's (it gathers the resume point)
    if est is None:
        return
    one = memory_estimate(cfg, ranks, gathers=False)["total"] if ranks > 1 else est["total"]   # any other rank
    host = est["total"] + one * (local - 1) if has_rank0 else one * local
    avail = available_memory()
    per = f"; {local} processes on this host: {host / 2**30:.2f} GiB together" if local > 1 else ""
    log.info("expected peak memory %.2f GiB (weights %.2f, activations %.2f, Hessians, solves and buffers %.2f, "
             "runtime %.2f)%s; available %s", est["total"] / 2**30, est["weights"] / 2**30, est["activations"] / 2**30,
             est["layer"] / 2**30, est["runtime"] / 2**30, per,
             f"{avail / 2**30:.2f} GiB" if avail else "unknown")
    if avail is not None and host > avail:
        check = (f"; then, in place of the last two, the held-out check's comparison {est['check'] / 2**30:.2f} GiB"
                 if est["check"] > est["activations"] + est["layer"] else "")
        rank0 = f"rank 0 {est['total'] / 2**30:.2f} GiB, the others " if has_rank0 else ""
        many = (f" ({local} processes on this host: {rank0}"
                f"{one / 2**30:.2f} GiB each; start fewer with torchrun --nproc-per-node, or spread them with "
                "--nnodes)") if local > 1 else ""
        raise QuantcError(f"{cfg.source_file}: the compile needs about {host / 2**30:.2f} GiB{many} but only "
                          f"{avail / 2**30:.2f} GiB is available (weights {est['weights'] / 2**30:.2f} GiB, "
                          f"calibration activations {est['activations'] / 2**30:.2f} GiB, Hessians and solves "
                          f"{est['layer'] / 2**30:.2f} GiB{check}); {_advice(cfg, est)}")


def _advice(cfg: Config, est: dict) -> str:
    """The fix for the largest term of a refused estimate, in the configuration's own keys."""
    if est["weights"] >= max(est["activations"], est["layer"]):
        whole = []           # what holds the whole model (memory_estimate's `lazy`)
        if cfg.calibration.source == "self":
            whole.append("give a calibration file (calibration.source: data.jsonl): self-sampling holds the "
                         "whole model")
        if not cfg.lazy_load:
            whole.append("set resources.lazy_load: true")
        if cfg.gguf_file:
            whole.append("give the model as a safetensors folder (a GGUF file loads whole)")
        if whole:
            return "; ".join(whole) + "; then the decoder layers load one at a time"
        return "free memory, or run on a host with more"
    if est["check"] > est["activations"] + est["layer"]:
        return ("set calibration.check_samples: 0 (the held-out check compares one sequence's logits over the "
                "vocabulary at the end), or lower calibration.seq_len, or free memory")
    if est["activations"] >= est["layer"]:
        off = "" if cfg.offload_activations else "set resources.offload_activations: true, or "
        return f"{off}lower calibration.samples or calibration.seq_len, or free memory"
    return "free memory, or run on a host with more (one layer's Hessians and solves do not shrink)"
