"""Benchmark: how much can the measurement's held-out slice say? (issue 11: "keep the predictor honest:
predicted/measured within 0.8–1.25 on the benchmark plans").

    python -m benchmarks.bench_heldout [--model qwen] [--windows 32] [--fresh]

The fisher predictor's scale, and the exact predictor's every ΔKL, are measured on a held-out slice
of the calibration: its last `plan.alpha_samples` sequences, truncated to `plan.alpha_seq_len` tokens
(the defaults: 4 × 256). The benchmark plans are then checked against KL(fp32 ‖ checkpoint) on fresh
text. How much of the gap can the slice's size explain? For one checkpoint (the uniform 4-bit g128
compile with quantc's default QEP α, bench_ablation's qep job on the selected model), this measures the
KL per sequence on
- the measurement's held-out slice itself (those calibration rows, those tokens),
- `--windows` fresh C4 sequences of the same length (the first tokens of the protocol's windows of
  the documents after the calibration's 128), and
- the first `--windows` calibration rows, the same way. The checkpoint was calibrated on all 128 rows,
  the held-out slice's included (sweep 1 was not: its Hessians come from the first measure_samples
  rows), so these say how much lower a checkpoint's KL is on its own calibration text, which the
  held-out slice's figure then includes.
and, by resampling the fresh sequences (20,000 draws without replacement, Random(0)), the range that
the mean of a slice of 4 or 16 sequences falls in, relative to the mean of all of them. Each model
runs in its own process; the section is per model.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

from benchmarks.bench_gptq import cached, prepare, run_uniform, subprocess_job, write_section
from benchmarks.models import bench_model, mark, title

QEP = 0.5          # the uniform checkpoint's QEP α: quantc's default (bench_ablation's qep-0.5 row)
SLICES = (4, 16)   # slice sizes whose spread is reported: the default alpha_samples, and 4× that
DRAWS = 20_000


def job_kl(folder: str, windows: int) -> dict:
    """Per-sequence KL(fp32 ‖ checkpoint) on the held-out slice and on `windows` fresh sequences."""
    import time

    import torch

    import quantc
    from quantc.config import PlanSettings
    from quantc.evaluate import evaluate
    from quantc.model import load_model, load_tokenizer

    from benchmarks.common import calibration
    p = PlanSettings()
    tok = load_tokenizer(str(bench_model()))
    t = time.perf_counter()
    ref, model = load_model(str(bench_model())), quantc.load(folder, dtype=torch.float32)
    rows = calibration(tok, 128 + windows, 512, 0)
    texts = {"held_out": rows[128 - p.alpha_samples:128, :p.alpha_seq_len], "fresh": rows[128:, :p.alpha_seq_len],
             "calibrated": rows[:windows, :p.alpha_seq_len]}
    out = {name: [evaluate(model, w[None], reference=ref, progress=False)["kl"] for w in seqs]
           for name, seqs in texts.items()}
    return {**out, "alpha_samples": p.alpha_samples, "alpha_seq_len": p.alpha_seq_len,
            "seconds": time.perf_counter() - t}


def spread(kls: list[float], k: int) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles of the mean of k sequences drawn without replacement, over
    the mean of all of them."""
    import random
    rng, mean = random.Random(0), statistics.mean(kls)
    means = sorted(statistics.mean(rng.sample(kls, k)) / mean for _ in range(DRAWS))
    return means[int(0.025 * DRAWS)], means[int(0.975 * DRAWS) - 1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", nargs=argparse.REMAINDER)
    ap.add_argument("--model", help="smollm2 (default), qwen or a model folder")
    ap.add_argument("--windows", type=int, default=32, help="fresh sequences (at least 16)")
    ap.add_argument("--fresh", action="store_true", help="forget this benchmark's cached results")
    args = ap.parse_args()
    if args.job:
        print("RESULT " + json.dumps(job_kl(args.job[1], int(args.job[2]))), flush=True)   # ["kl", folder, windows]
        return
    if args.windows < max(SLICES):
        ap.error(f"--windows: {args.windows} is fewer than {max(SLICES)}, the largest slice whose spread is reported")
    prepare(args.model, "heldout-*" if args.fresh else None)
    _, _, folder = run_uniform("4b", QEP)
    r = cached(f"heldout-kl-{args.windows}", lambda: subprocess_job(["kl", str(folder), str(args.windows)],
                                                                   "benchmarks.bench_heldout"))
    write(r, "python -m benchmarks.bench_heldout " + " ".join(sys.argv[1:]))


def write(r: dict, cmd: str) -> None:
    held, fresh, own = r["held_out"], r["fresh"], r["calibrated"]
    m = statistics.mean(fresh)
    lines = [f"## How much the measurement's held-out slice can say ({title()})", "",
             f"Command: `{cmd}`. One checkpoint: uniform 4-bit g128 with QEP α {QEP:g} (bench_ablation's qep job). "
             f"KL(fp32 ‖ checkpoint) per token, per sequence of {r['alpha_seq_len']} tokens, on the measurement's "
             f"held-out slice (the last {r['alpha_samples']} of the 128 calibration rows, as `plan.alpha_samples` and "
             f"`plan.alpha_seq_len` default; the checkpoint was calibrated on them) and on {len(fresh)} fresh C4 "
             f"sequences (the documents after the calibration's), and on the first {len(own)} calibration rows (in the checkpoint's calibration, as the slice is). The spread of a k-sequence slice: the 2.5th and "
             f"97.5th percentiles of the mean of k fresh sequences drawn without replacement ({DRAWS:,} draws), over "
             f"the mean of all {len(fresh)}. {r['seconds']:.0f} s.", "",
             "| fresh mean KL | sd per sequence | sd / mean | calibration rows / fresh | held-out slice mean KL | "
             "slice / fresh | "
             + " | ".join(f"{k}-sequence slice / fresh, 95% range" for k in SLICES) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(SLICES),
             f"| {m:.4f} | {statistics.stdev(fresh):.4f} | {statistics.stdev(fresh) / m:.2f} | "
             f"{statistics.mean(own) / m:.2f} | "
             f"{statistics.mean(held):.4f} | {statistics.mean(held) / m:.2f} | "
             + " | ".join("{:.2f} – {:.2f}".format(*spread(fresh, k)) for k in SLICES) + " |", "",
             f"Held-out slice, per sequence: {', '.join(f'{v:.4f}' for v in held)}. A predictor scaled on a slice "
             "whose KL is x× the fresh mean predicts about x× the fresh KL, so measured/predicted comes out near 1/x "
             "before any error of the predictor's own: with a slice's 95% range as wide as the goal's 0.8–1.25, "
             "the slice's size alone can put a plan's ratio outside it."]
    write_section(mark("bench_heldout"), lines)


if __name__ == "__main__":
    main()
