"""Benchmark: peak RSS of compiling SmolLM2-135M (GPTQ 4-bit g128), lazy loading against loading the
model whole, and against GPTQModel 7.6.0 on the same calibration.

    python -m benchmarks.bench_memory [--samples 32] [--gptqmodel] [--measure fisher-h4,fisher] [--fresh]

It also measures the held-out check's comparison of one sequence (the compile's last step) against the
estimate's term for it, and with --measure sweep 1 alone (the measurement) against the estimate.

Every compile runs in its own process; its peak RSS is that process's ru_maxrss. The baseline row is a
process that only imports torch, transformers and quantc (the floor any Python compile pays).
Calibration: the protocol's C4 windows (Random(0)), `--samples` × 512 tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.bench_gptq import (QUANTC_GPTQ, WORK, cached, peak_rss_mb, subprocess_job, write_section,
                                   write_calibration_file)
from benchmarks.common import calibration, prepared_model

MARK = "<!-- bench_memory -->"


def job_baseline() -> dict:
    """The floor: libraries imported and the model's skeleton built on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    import quantc.pipeline  # noqa: F401
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(prepared_model()))
    return {"peak_rss_mb": peak_rss_mb()}


# mode: (lazy loading, QEP α); the rows' QEP-off runs are plain GPTQ, "lazy-qep" is quantc's default
MODES = {"lazy": (True, 0.0), "eager": (False, 0.0), "lazy-qep": (True, 0.5)}


def job_quantc(mode: str, samples: str, out: str) -> dict:
    from quantc.config import parse_config
    from quantc.pipeline import compile_model, memory_estimate
    lazy, qep = MODES[mode]
    raw = {"model": str(prepared_model()), "resources": {"lazy_load": lazy},
           "quant": {"bits": 4, "group_size": 128, **QUANTC_GPTQ, "qep_alpha": qep},
           "calibration": {"source": str(WORK / "c4-calib.jsonl"), "samples": int(samples), "seq_len": 512, "seed": 0}}
    cfg = parse_config(raw, "bench")
    t = time.perf_counter()
    compile_model(cfg, out, force=True, progress=False)
    return {"seconds": time.perf_counter() - t, "estimate_mb": memory_estimate(cfg)["total"] / 2**20,
            "peak_rss_mb": peak_rss_mb()}


def job_check_head(seq_len: str) -> dict:
    """The held-out check's comparison at the end of a compile (passes/measure.py divergence), for one
    sequence of `seq_len` tokens, on the whole float32 model: the peak RSS it adds above its start (the
    kernel's high-water mark, reset just before), beside memory.py's `check` term."""
    import re
    import torch
    from quantc.config import parse_config
    from quantc.memory import memory_estimate
    from quantc.model import Activations, load_model
    from quantc.passes.measure import divergence
    n = int(seq_len)
    model = load_model(str(prepared_model()))
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (1, n), generator=g)
    ref = Activations(torch.randn(1, n, hidden, generator=g), [{}], 1)
    hat = Activations(ref.hidden + 0.01 * torch.randn(1, n, hidden, generator=g), [{}], 1)
    divergence(model, tokens, ref, hat)          # once before: the kernels' own first-call allocations

    def status(key: str) -> int:
        return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
    Path("/proc/self/clear_refs").write_text("5")      # reset the high-water mark to the current RSS
    start = status("VmRSS")
    divergence(model, tokens, ref, hat)
    cfg = parse_config({"model": str(prepared_model()), "calibration": {"seq_len": n}}, "bench")
    return {"above_start_mb": (status("VmHWM") - start) / 2**20, "vocab": vocab,
            "estimate_mb": memory_estimate(cfg)["check"] / 2**20}


def job_measure(predictor: str) -> dict:
    """Sweep 1 alone (the measurement of bench_mixed's `wide` rows, predictor label `predictor`:
    fisher, or fisher-hN with N held-out sequences), measured afresh in an empty measurement cache:
    its peak RSS (the section sets the printed estimate beside it), and whether the measurement equals
    the one cached earlier under the same key (made by older code, where the cache holds one)."""
    import shutil
    import tempfile
    from benchmarks.bench_mixed import raw_config
    from quantc.calibration import calibration_tokens
    from quantc.config import parse_config
    from quantc.pipeline import load_source
    from quantc.planning import cache_dir, get_measurements
    earlier = cache_dir()
    fresh = Path(tempfile.mkdtemp(prefix="mem-measure-", dir=WORK))
    os.environ["QUANTC_CACHE"] = str(fresh)
    try:
        cfg = parse_config(raw_config(None, 0.0, predictor, "wide"), "bench")
        model, tok = load_source(cfg)
        tokens = calibration_tokens(cfg.calibration, tok)
        t = time.perf_counter()
        get_measurements(cfg, model, tokens, progress=False)
        seconds = time.perf_counter() - t
        (made,) = (fresh / "measurements").glob("*.json")
        old = earlier / made.name
        same = json.loads(old.read_text())["units"] == json.loads(made.read_text())["units"] if old.is_file() else None
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "alpha_samples": cfg.plan.alpha_samples,
            "same_as_cached": same}


def _measure_estimate_mb(predictor: str) -> float:
    """What `quantc plan` / a budgeted compile prints as its expected peak for that measurement (with a
    budget: the estimate counts sweep 1 only then), computed now with the current estimator."""
    from benchmarks.bench_mixed import budget_sizes, raw_config
    from quantc.config import parse_config
    from quantc.memory import memory_estimate
    cfg = parse_config(raw_config(budget_sizes()["4b"], 0.0, predictor, "wide"), "bench")
    return memory_estimate(cfg)["total"] / 2**20


def job_gptqmodel(samples: str, out: str) -> dict:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import AutoTokenizer
    model = prepared_model()
    tok = AutoTokenizer.from_pretrained(model)
    cal = calibration(tok, int(samples), 512, 0)
    data = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in cal]
    t = time.perf_counter()
    m = GPTQModel.load(str(model), QuantizeConfig(bits=4, group_size=128, sym=True, desc_act=False), dtype=torch.float16)
    m.quantize(data, batch_size=1)
    m.save(out)
    return {"seconds": time.perf_counter() - t, "peak_rss_mb": peak_rss_mb()}


def _estimate_mb(mode: str, samples: int) -> float:
    """What `quantc compile` prints as its expected peak (computed now, with the current estimator)."""
    from quantc.config import parse_config
    from quantc.pipeline import memory_estimate
    lazy, qep = MODES[mode]
    raw = {"model": str(prepared_model()), "resources": {"lazy_load": lazy},
           "quant": {"bits": 4, "group_size": 128, "qep_alpha": qep},
           "calibration": {"source": str(WORK / "c4-calib.jsonl"), "samples": samples, "seq_len": 512}}
    return memory_estimate(parse_config(raw, "bench"))["total"] / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", nargs=argparse.REMAINDER)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--gptqmodel", action="store_true", help="also run GPTQModel 7.6.0 (slow on 2 cores)")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--measure", default="",
                    help="also measure sweep 1 alone for these predictor labels (bench_mixed's, e.g. fisher,fisher-h16)")
    args = ap.parse_args()
    if args.job:
        kind, rest = args.job[0], args.job[1:]
        res = {"baseline": job_baseline, "quantc": job_quantc, "gptqmodel": job_gptqmodel,
               "check-head": job_check_head, "measure": job_measure}[kind](*rest)
        print("RESULT " + json.dumps(res), flush=True)
        return
    WORK.mkdir(parents=True, exist_ok=True)
    if args.fresh:
        for p in WORK.glob("mem-*.json"):
            p.unlink()
    write_calibration_file()
    job = lambda *a: subprocess_job(list(a), "benchmarks.bench_memory")   # noqa: E731
    n = args.samples
    rows = {"baseline": cached("mem-baseline", lambda: job("baseline"))}
    for mode in MODES:
        rows[mode] = cached(f"mem-quantc-{mode}-{n}", lambda: job("quantc", mode, str(n), str(WORK / f"mem-{mode}")))
    check = cached("mem-check-head-512", lambda: job("check-head", "512"))
    if args.gptqmodel:
        rows["gptqmodel"] = cached(f"mem-gptqmodel-{n}", lambda: job("gptqmodel", str(n), str(WORK / "mem-gptqmodel")))
    from benchmarks.bench_mixed import job_label       # keyed by what is measured, as bench_mixed's jobs
    measure = {p: cached(f"mem-measure-{job_label(p)}", lambda: job("measure", p)) for p in args.measure.split(",") if p}
    write(rows, n, "python -m benchmarks.bench_memory " + " ".join(sys.argv[1:]), check, measure)


def write(rows: dict, n: int, cmd: str, check: dict | None = None, measure: dict | None = None) -> None:
    folder = prepared_model()
    fp32_mb = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors")) / 2**20
    acts_mb = n * 512 * 576 * 4 / 2**20          # one stream of hidden states, float32
    goal = fp32_mb / 2 + acts_mb
    lines = [MARK, "## Peak memory of a compile (SmolLM2-135M, GPTQ 4-bit g128)", "",
             f"Command: `{cmd}`. Calibration {n}×512 C4 tokens; peak RSS = ru_maxrss of the compiling process. "
             f"fp32 model {fp32_mb:.0f} MiB; one stream of calibration activations {acts_mb:.0f} MiB; "
             f"the issue's goal, half the fp32 model plus the activations: {goal:.0f} MiB.", "",
             "| run | peak RSS MiB | above the import baseline MiB | quantc's printed estimate MiB | seconds |",
             "|---|---|---|---|---|"]
    base = rows["baseline"]["peak_rss_mb"]
    names = {"baseline": "floor: libraries imported, model skeleton on the meta device (no weights)",
             "lazy": "quantc, lazy loading (default), QEP off", "eager": "quantc, whole model loaded (`resources.lazy_load: false`), QEP off",
             "lazy-qep": "quantc, lazy loading, QEP α 0.5 (the defaults: a second stream and the cross terms)",
             "gptqmodel": "GPTQModel 7.6.0 (fp16 load, `desc_act=False`)"}
    for k, r in rows.items():
        est = f"{_estimate_mb(k, n):.0f}" if k in MODES else "—"
        sec = f"{r['seconds']:.0f}" if "seconds" in r else "—"
        lines.append(f"| {names[k]} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - base:.0f} | {est} | {sec} |")
    if "lazy" in rows and "eager" in rows:
        lines += ["", f"Lazy / whole: {rows['lazy']['peak_rss_mb'] / rows['eager']['peak_rss_mb']:.2f} of the peak "
                  f"({(rows['lazy']['peak_rss_mb'] - base) / (rows['eager']['peak_rss_mb'] - base):.2f} above the "
                  "import baseline)."]
    if check is not None:
        lines += ["", f"The held-out check's comparison at the end of a compile, one sequence of 512 tokens (256 compared "
                  f"positions × {check['vocab']:,} logits), in a process of its own: **{check['above_start_mb']:.1f} MiB** "
                  f"above its start, against the estimate's check term {check['estimate_mb']:.1f} MiB (three "
                  "vocabulary-sized float32 arrays; memory.py counts it where it exceeds the sweep's working set)."]
    if measure:
        lines += ["", "Sweep 1 alone (the measurement of bench_mixed's *wide* rows: 18 candidates, 128×512 C4 calibration, "
                  "32 sequences for the Hessians, fisher predictor with the uniform-plan check), each in a process of its "
                  "own with an empty measurement cache; *same as the cached one*: its per-unit results equal the "
                  "measurement cached earlier under the same key (by older code), bit for bit.", "",
                  "| held-out sequences (`plan.alpha_samples`) | peak RSS MiB | quantc's printed estimate MiB "
                  "(a budgeted compile's, at the uniform-4-bit size) | seconds "
                  "| same as the cached one |", "|---|---|---|---|---|"]
        for p, r in measure.items():
            same = {True: "yes", False: "no", None: "— (none cached)"}[r["same_as_cached"]]
            lines.append(f"| {r['alpha_samples']} | {r['peak_rss_mb']:.0f} | {_measure_estimate_mb(p):.0f} | "
                         f"{r['seconds']:.0f} | {same} |")
    write_section(MARK, lines[1:])
    print("\n".join(lines))


if __name__ == "__main__":
    main()
