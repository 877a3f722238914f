"""Benchmark: mixed-precision allocation on SmolLM2-135M (the protocol of bench_gptq).

    python -m benchmarks.bench_mixed [--qep 0.5] [--budgets 3b,3.5b,4b] [--qep-budgets 3b] [--fresh]

Measures once (sweep 1, cached), re-plans from the cache for each budget, compiles each plan with
and without QEP, and evaluates every checkpoint through `quantc.load` in float32 on WikiText-2.
Budgets equal the exact byte size of uniform 3-bit g128 and 4-bit g128 (as bench_gptq's quantc
rows) and the midpoint (~3.5 bits/weight). Uniform rows are read from bench_gptq's cached results.
Predicted ΔKL (Σ α·err) is compared with the measured Δloss = ln(ppl) − ln(ppl_fp32).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

from benchmarks.bench_gptq import (QUANTC_GPTQ, RESULTS, WORK, cached, linear_bytes, peak_rss_mb,
                                   subprocess_job, write_calibration_file)
from benchmarks.common import ROOT, prepared_model

MARK = "<!-- bench_mixed -->"
CANDIDATES = [{"bits": 2, "sym": False}, {"bits": 3}, {"bits": 4}, {"bits": 8}]


def raw_config(budget_bytes: int | None, qep: float) -> dict:
    return {"model": str(prepared_model()),
            "budget": {"memory": budget_bytes} if budget_bytes else {},
            "quant": {"group_size": 128, "qep_alpha": qep, **QUANTC_GPTQ},
            "candidates": CANDIDATES,
            "calibration": {"source": str(WORK / "c4-calib.jsonl"), "samples": 128, "seq_len": 512, "seed": 0}}


def uniform_bytes(bits: int) -> int:
    from quantc.model import load_model
    from quantc.options import Option
    from quantc.pipeline import linear_names
    model = load_model(str(prepared_model()))
    mods = dict(model.named_modules())
    return sum(Option(bits, 128).bytes_for(mods[n].in_features, mods[n].out_features) for n in linear_names(model))


def job_plan(budgets: dict[str, int]) -> dict:
    """Measure (timed), then re-plan from the cache for every budget (timed)."""
    from quantc.calibration import calibration_tokens
    from quantc.config import parse_config
    from quantc.model import load_model, load_tokenizer
    from quantc.options import Option
    from quantc.passes.measure import option_key, unit_dkl
    from quantc.planning import get_measurements, solve
    cfg = parse_config(raw_config(None, 0.0), "bench")
    model = load_model(cfg.model)
    tok = load_tokenizer(cfg.model)
    tokens = calibration_tokens(cfg.calibration, tok)
    t = time.perf_counter()
    ms, was_cached = get_measurements(cfg, model, tokens, progress=False)
    measure_s = time.perf_counter() - t
    out = {"measure_s": ms.meta["seconds"], "measure_cached": was_cached, "measure_call_s": measure_s,
           "plans": {}}
    from quantc.report import write_report
    for name, b in budgets.items():
        t = time.perf_counter()
        ms2, hit = get_measurements(cfg, model, tokens, progress=False)
        plan = solve(ms2, cfg, b)
        replan_s = time.perf_counter() - t
        write_report(ROOT / "benchmarks" / "plots" / f"plan-{name}", plan, ms2, cfg)
        out["plans"][name] = {**plan.predicted, "replan_s": replan_s, "cache_hit": hit,
                              "bits": {str(o): sum(1 for c in plan.choices.values() if c.bits == o) for o in (2, 3, 4, 8)}}
    for bits, sym in ((3, True), (4, True)):       # predictions for the uniform references
        k = option_key(next(o for o in cfg.candidates if o.bits == bits))
        out[f"uniform{bits}_pred"] = sum(unit_dkl(u, k) for u in ms.units.values())
        out[f"uniform{bits}_pred_linear"] = sum(u["alpha"] * u["options"][k]["err"] for u in ms.units.values())
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def job_compile(budget: int, qep: float, folder: str) -> dict:
    from quantc.config import parse_config
    from quantc.pipeline import compile_model
    t = time.perf_counter()
    m = compile_model(parse_config(raw_config(budget, qep), "bench"), folder, force=True, progress=False)
    return {"quantize_s": m["timings"]["quantize_s"], "plan_s": m["timings"].get("plan_s", 0),
            "total_s": time.perf_counter() - t, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", nargs=argparse.REMAINDER)
    ap.add_argument("--budgets", default="3b,3.5b,4b")
    ap.add_argument("--qep", type=float, default=0.5)
    ap.add_argument("--qep-budgets", default="3b")
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    if args.job:
        kind = args.job[0]
        res = job_plan(json.loads(args.job[1])) if kind == "plan" else \
            job_compile(int(args.job[1]), float(args.job[2]), args.job[3])
        print("RESULT " + json.dumps(res), flush=True)
        return
    WORK.mkdir(parents=True, exist_ok=True)
    if args.fresh:
        for p in WORK.glob("mixed-*.json"):
            p.unlink()
    write_calibration_file()
    sizes = cached("mixed-sizes", lambda: {"3b": uniform_bytes(3), "4b": uniform_bytes(4)})
    sizes["3.5b"] = (sizes["3b"] + sizes["4b"]) // 2
    budgets = {b: sizes[b] for b in args.budgets.split(",")}
    plan = cached("mixed-plan", lambda: subprocess_job_m(["plan", json.dumps(budgets)]))
    fp = cached("eval-fp32", lambda: subprocess_job(["eval", "-"]))
    for c in ("3b", "4b"):      # the uniform references: bench_gptq's quantc rows (same cache keys)
        folder = WORK / f"quantc-gptq-{c}"
        cached(f"quant-quantc-gptq-{c}", lambda: subprocess_job(["quantc", "gptq", c, str(folder)]))
        cached(f"eval-quantc-gptq-{c}", lambda: subprocess_job(["eval", str(folder)]))
    rows = []
    qep_budgets = args.qep_budgets.split(",") if args.qep > 0 else []
    runs = [(b, 0.0) for b in budgets] + [(b, args.qep) for b in budgets if b in qep_budgets]
    cmd = "python -m benchmarks.bench_mixed " + " ".join(sys.argv[1:])
    for b, qep in runs:
        key = f"mixed-{b}-qep{qep:g}"
        folder = WORK / key
        q = cached(f"{key}-compile", lambda: subprocess_job_m(["compile", str(budgets[b]), str(qep), str(folder)]))
        e = cached(f"{key}-eval", lambda: subprocess_job(["eval", str(folder)]))
        rows.append({"budget": b, "qep": qep, "compile": q, "eval": e, "bytes": linear_bytes(folder),
                     "pred": plan["plans"][b]["delta_kl"], "plan": plan["plans"][b]})
        write(rows, plan, fp, sizes, cmd, args.qep)
    write(rows, plan, fp, sizes, cmd, args.qep)


def subprocess_job_m(args):
    return subprocess_job(args, "benchmarks.bench_mixed")


def _uniform(bits: int) -> dict | None:
    key = {3: "3b", 4: "4b"}[bits]
    p = WORK / f"eval-quantc-gptq-{key}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def write(rows, plan, fp, sizes, cmd, qep) -> None:
    u3, u4 = _uniform(3), _uniform(4)
    lines = [MARK, "## Mixed precision: allocation under a memory budget (SmolLM2-135M)", "",
             f"Command: `{cmd}` (after `python -m benchmarks.bench_gptq`, whose quantc rows are the uniform "
             "references). Candidates per unit (q/k/v, o, gate/up, down): 2-bit asym, 3-, 4-, 8-bit sym, "
             f"all g128 with {QUANTC_GPTQ}. Same calibration and evaluation protocol as above.", "",
             f"Measurement pass (sweep 1, 32×512 calibration tokens for the Hessians, α from 4×256 held-out "
             f"tokens): {plan['measure_s']:.0f} s; a re-plan from the cache: "
             + ", ".join(f"{p['replan_s']:.2f} s" for p in plan["plans"].values()) + ".", "",
             "| budget | QEP α | quantized-linear bytes | bits/weight | units at 2/3/4/8 bits | compile s | ppl | uniform ppl at that size | gap closed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, ppl = r["budget"], r["eval"]["ppl"]
        ref = {"3b": u3, "4b": u4}.get(b)
        gap = ""
        if u3 and u4:
            gap = f"{100 * (u3['ppl'] - ppl) / (u3['ppl'] - u4['ppl']):.0f}%"
        mix = "/".join(str(r["plan"]["bits"][k]) for k in ("2", "3", "4", "8"))
        ref_ppl = f"{ref['ppl']:.2f}" if ref else "—"
        lines.append(f"| {b} ({sizes[b] / 1e6:.1f} MB) | {r['qep']:g} | {r['bytes'] / 1e6:.2f} MB | "
                     f"{r['plan']['avg_bits']:.3f} | {mix} | {r['compile']['total_s']:.0f} | {ppl:.2f} | "
                     f"{ref_ppl} | {gap} |")
    lines += ["", "Gap closed: (ppl of uniform 3-bit − ppl) / (ppl of uniform 3-bit − ppl of uniform 4-bit).", "",
              "Predicted ΔKL (Σ α·err from the measurement) against measured Δloss on WikiText-2 "
              "(ln ppl − ln ppl_fp32):", "",
              "| plan | predicted ΔKL | measured Δloss | ratio |", "|---|---|---|---|"]
    pts = [(f"uniform 3-bit", plan["uniform3_pred"], u3), (f"uniform 4-bit", plan["uniform4_pred"], u4)]
    pts += [(f"{r['budget']} QEP {r['qep']:g}", r["pred"], r["eval"]) for r in rows]
    for name, pred, ev in pts:
        if ev:
            d = math.log(ev["ppl"]) - math.log(fp["ppl"])
            lines.append(f"| {name} | {pred:.4f} | {d:.4f} | {d / pred:.2f} |")
    lines += [MARK, ""]
    text = RESULTS.read_text() if RESULTS.is_file() else "# Benchmark results\n"
    if MARK in text:
        pre, _, rest = text.partition(MARK)
        _, _, post = rest.partition(MARK)
        text = pre + "\n".join(lines) + post.lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(lines)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
