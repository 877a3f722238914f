"""Benchmark: is a mixed plan better than the uniform compile of the same size, beyond what the
calibration's draw moves? (issue 13: "no plan may be worse than uniform at equal size").

    python -m benchmarks.bench_seeds [--model qwen] [--budget 4b] [--variant wide] [--qep 0.5]
                                     [--seeds 0,1] [--fresh]

One plan is solved from the measurement on calibration seed 0 (bench_mixed's configuration and cached
measurement) and saved as a plan file. For each calibration seed s, two compiles at the same bytes:
- uniform: bench_gptq's config at that size (4-bit g128 or 3-bit g128) with QEP α, calibration seed s
  (bench_ablation's row `qep-α`, or `defaults` for α = 0); seed 0 is that row's own job and cache entry
  (for α = 0, bench_gptq's quantc row);
- mixed: the plan file, with QEP α, calibration seed s.
The seed draws each calibration document's 512-token window (the protocol's rule: the first 128 C4
documents of ≥ 512 tokens, one random window each), so both compiles of a seed see the same tokens.
The plan is held fixed, so the spread is the compile's, not the measurement's. Every checkpoint is
evaluated on the protocol (WikiText-2, 80×512, float32 through `quantc.load`). Jobs run one at a time,
each in its own process, cached in benchmarks/work/ (an interrupted run resumes); the section of
RESULTS.md is rewritten after every job.
"""
from __future__ import annotations

import argparse
import json
import statistics
import shlex
import sys
from pathlib import Path

from benchmarks.bench_gptq import (CONFIGS, WORK, cached, linear_bytes, peak_rss_mb, prepare, subprocess_job,
                                   uniform_job, write_section)
from benchmarks.bench_mixed import VARIANTS, budget_sizes, raw_config
from benchmarks.common import ROOT, save_plot
from benchmarks.models import keyed, mark, title


def job_plan(variant: str, budget: int, qep: float, path: str) -> dict:
    """Solve the plan of `variant` at `budget` bytes from seed 0's measurement (cached by bench_mixed
    where it has run) and save it as a plan file."""
    from quantc.calibration import calibration_tokens
    from quantc.config import parse_config
    from quantc.pipeline import load_source
    from quantc.planning import get_measurements, solve
    from quantc.rotate import untied_head_bytes
    cfg = parse_config(raw_config(None, qep, "fisher", variant), "bench")
    model, tok = load_source(cfg)
    ms, was_cached = get_measurements(cfg, model, calibration_tokens(cfg.calibration, tok), progress=False)
    plan = solve(ms, cfg, budget, head=untied_head_bytes(model, cfg))
    plan.save(Path(path))
    return {**plan.predicted, "measure_cached": was_cached, "measure_s": ms.meta.get("seconds"),
            "bits": {str(b): sum(1 for c in plan.choices.values() if c.bits == b) for b in (2, 3, 4, 8)}}


def job_mixed(variant: str, qep: float, seed: int, plan: str, out: str) -> dict:
    import time
    from quantc.config import parse_config
    from quantc.pipeline import compile_model
    raw = raw_config(None, qep, "fisher", variant)
    raw["calibration"]["seed"] = seed
    t = time.perf_counter()
    m = compile_model(parse_config(raw, "bench"), out, force=True, plan_file=plan, progress=False)
    return {"quantize_s": m["timings"]["quantize_s"], "total_s": time.perf_counter() - t, "peak_rss_mb": peak_rss_mb()}


def names(kind: str, budget: str, variant: str, qep: float, seed: int) -> dict:
    """Cache names and folder of one compile; seed 0's uniform compile is bench_ablation's qep job."""
    if kind == "uniform" and seed == 0:
        return uniform_job(budget, qep)
    key = f"seeds-{kind if kind == 'uniform' else variant}-{budget}-qep{qep:g}-s{seed}"
    return {"compile": f"{key}-compile", "eval": f"{key}-eval", "folder": WORK / keyed(key)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", nargs=argparse.REMAINDER)
    ap.add_argument("--model", help="smollm2 (default), qwen or a model folder")
    ap.add_argument("--budget", default="4b", help="the uniform size the two compiles share: 3b or 4b")
    ap.add_argument("--variant", default="wide", help=f"bench_mixed's candidate variant: {', '.join(VARIANTS)}")
    ap.add_argument("--qep", type=float, default=0.5)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    if args.job:
        kind, rest = args.job[0], args.job[1:]
        res = job_plan(rest[0], int(rest[1]), float(rest[2]), rest[3]) if kind == "plan" else \
            job_mixed(rest[0], float(rest[1]), int(rest[2]), rest[3], rest[4])
        print("RESULT " + json.dumps(res), flush=True)
        return
    if args.budget not in ("3b", "4b"):
        ap.error(f"--budget: {args.budget!r} is not 3b or 4b (a size a uniform compile has)")
    if not 0 <= args.qep <= 1:
        ap.error(f"--qep: {args.qep:g} is not in [0, 1] (0: QEP off)")
    if args.variant not in VARIANTS:
        ap.error(f"--variant: {args.variant!r} is not one of {', '.join(VARIANTS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        ap.error(f"--seeds: {args.seeds!r} is not a comma-separated list of integers, e.g. 0,1,2")
    prepare(args.model, "seeds-*" if args.fresh else None)
    budget = budget_sizes()[args.budget]
    cmd = "python -m benchmarks.bench_seeds " + shlex.join(sys.argv[1:])
    plan_file = WORK / keyed(f"seeds-{args.variant}-{args.budget}-plan.yaml")
    plan = cached(f"seeds-{args.variant}-{args.budget}-plan", lambda: subprocess_job(
        ["plan", args.variant, str(budget), str(args.qep), str(plan_file)], "benchmarks.bench_seeds"))
    fp = cached("eval-fp32", lambda: subprocess_job(["eval", "-"]))
    rows: dict[tuple[str, int], dict] = {}
    for s in seeds:
        for kind in ("uniform", "mixed"):
            n = names(kind, args.budget, args.variant, args.qep, s)
            folder = n["folder"]
            if kind == "uniform":
                job = (n["args"] + [str(folder)], n["module"]) if s == 0 else \
                    ([args.budget, f"qep-{args.qep:g}" if args.qep else "defaults", str(folder), str(s)],
                     "benchmarks.bench_ablation")
            else:
                job = (["mixed", args.variant, str(args.qep), str(s), str(plan_file), str(folder)], "benchmarks.bench_seeds")
            q = cached(n["compile"], lambda: subprocess_job(*job))
            e = cached(n["eval"], lambda: subprocess_job(["eval", str(folder)]))
            rows[(kind, s)] = {"compile": q, "eval": e, "bytes": linear_bytes(Path(folder))}
            write(rows, seeds, plan, fp, args, cmd)


def write(rows: dict, seeds: list[int], plan: dict, fp: dict, args, cmd: str) -> None:
    bits, gs, _ = CONFIGS[args.budget]
    mix = "/".join(str(plan["bits"][k]) for k in ("2", "3", "4", "8"))
    lines = [f"## Uniform against mixed at the same size, across calibration seeds ({title()})", "",
             f"Command: `{cmd}`. At the uniform {bits}-bit g128 size, two compiles per calibration seed, both with "
             f"QEP α = {args.qep:g}: *uniform* ({bits}-bit g128 sym, bench_gptq's settings; seed 0 is "
             f"{'bench_ablation' + chr(39) + 's qep job' if args.qep else 'bench_gptq' + chr(39) + 's quantc row'}) and *mixed* (one plan of the *{args.variant}* candidates, {VARIANTS[args.variant][2]}, solved once "
             f"from the measurement on seed 0: units at 2/3/4/8 bits {mix}, predicted ΔKL {plan['delta_kl']:.4f}). "
             "The seed draws each calibration document's 512-token window, the same for both compiles of a seed; "
             "the plan is held fixed, so the spread is the compile's. Evaluation: WikiText-2, 80×512, float32 through "
             f"`quantc.load` (fp32 model {fp['ppl']:.2f}). Jobs are cached in benchmarks/work/, so a row may come from an "
             "earlier run (seed 0's uniform compile is bench_ablation's job, from its own run); the session notes say "
             "where jobs shared the cores, which makes their seconds no timings.", "",
             "| seed | uniform bytes | uniform compile s | uniform ppl | mixed bytes | mixed compile s | mixed ppl | "
             "mixed − uniform |", "|---|---|---|---|---|---|---|---|"]
    diffs, pts = [], {"uniform": [], "mixed": []}
    for s in seeds:
        u, m = rows.get(("uniform", s)), rows.get(("mixed", s))
        cell = lambda r: (f"{r['bytes'] / 1e6:.2f} MB | {r['compile']['total_s']:.0f} | {r['eval']['ppl']:.2f}"  # noqa: E731
                          if r else "— | — | pending")
        d = f"{m['eval']['ppl'] - u['eval']['ppl']:+.2f}" if u and m else "—"
        if u and m:
            diffs.append(m["eval"]["ppl"] - u["eval"]["ppl"])
        for kind, r in (("uniform", u), ("mixed", m)):
            if r:
                pts[kind].append((s, r["eval"]["ppl"]))
        lines.append(f"| {s} | {cell(u)} | {cell(m)} | {d} |")
    if all(len(v) > 1 for v in pts.values()):
        stat = lambda v: f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}"   # noqa: E731
        lines.append(f"| mean ± sd | | | {stat([p for _, p in pts['uniform']])} | | | "
                     f"{stat([p for _, p in pts['mixed']])} | "
                     + (f"{statistics.mean(diffs):+.2f} ± {statistics.stdev(diffs):.2f}" if len(diffs) > 1 else "—") + " |")
    lines += ["", "mixed − uniform < 0: the plan beats the uniform compile on that seed's calibration. sd is the "
              "sample standard deviation over the seeds."]
    if any(pts.values()):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for kind, marker in (("uniform", "o"), ("mixed", "s")):
            if pts[kind]:
                ax.plot(*zip(*pts[kind]), marker, label=f"{kind} ({bits}-bit size)")
        ax.axhline(fp["ppl"], color="gray", linestyle="--", label="fp32")
        ax.set_xticks(seeds)
        out = save_plot(fig, ax, ROOT / "benchmarks" / "plots" / f"{keyed('seeds')}_{args.variant}_{args.budget}.png",
                        "calibration seed", "WikiText-2 perplexity")
        lines += ["", f"![perplexity per seed](plots/{out.name})"]
    write_section(mark("bench_seeds"), lines)


if __name__ == "__main__":
    main()
