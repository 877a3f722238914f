"""Benchmark: which of quantc's uniform GPTQ defaults help (issue: why the uniform lead vanished),
on the protocol of bench_gptq (SmolLM2-135M, or `--model qwen`, or a model folder).

    python -m benchmarks.bench_ablation [--model qwen] [--configs 4b] [--ablations defaults,no-act-order,...]
                                        [--section 'QEP α'] [--fresh]

Each row is the default compile of bench_gptq's quantc row with one setting changed, compiled and
evaluated in its own process (WikiText-2 through `quantc.load`, float32), all in one run. A row named
`A+B` changes A's and B's settings and is compared with the row `A` (e.g. `qep-0.5+no-act-order`:
act-order's worth with error propagation on). A row `qep-α` (any 0 < α ≤ 1) compiles with that QEP
strength: `--ablations defaults,qep-0.25,qep-0.5,qep-1 --section 'QEP α'` is the α sweep, written to
a section of its own. Jobs are cached in benchmarks/work/ (an interrupted run
resumes); the section of RESULTS.md is rewritten after every job.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from quantc.config import DEFAULT_QEP_ALPHA

from benchmarks.bench_gptq import (CONFIGS, KL_WINDOWS, QUANTC_GPTQ, WORK, cached, linear_bytes, peak_rss_mb, run_kl,
                                   run_uniform, subprocess_job, uniform_job, write_calibration_file, write_section)
from benchmarks.models import bench_model, keyed, mark, own_results, select, title

# name: (quant settings changed from bench_gptq's quantc row, what the row says)
ABLATIONS = {
    "defaults": ({}, "GPTQ with quantc's grid defaults: act-order + static groups, clipped grid, true-sequential, "
                     "damp 0.01; QEP off"),
    "no-act-order": ({"act_order": False, "static_groups": False}, "columns in their order (no act-order)"),
    "no-clip-search": ({"mse": False}, "min–max grid (no clipped-grid search)"),
    "no-true-sequential": ({"true_sequential": False}, "every linear of a layer from the layer's inputs at once"),
    "damp-0.1": ({"damp": 0.1}, "damping 0.1 of the mean diagonal instead of 0.01"),
    f"qep-{DEFAULT_QEP_ALPHA:g}": ({"qep_alpha": DEFAULT_QEP_ALPHA},
                                   f"error propagation (QEP) α = {DEFAULT_QEP_ALPHA:g} (quantc's default)"),
    "asym": ({"sym": False}, "asymmetric grid (a zero point per group: the same bytes in the GPTQ format)"),
}


def change(part: str) -> tuple[dict, str] | None:
    """(settings, what the row says) of one named change: an ABLATIONS entry, or `qep-α` for any
    error-propagation strength 0 < α ≤ 1 (the α sweep); None when the name is neither."""
    if part in ABLATIONS:
        return ABLATIONS[part]
    if part.startswith("qep-"):
        try:
            alpha = float(part[4:])
        except ValueError:
            return None
        if 0 < alpha <= 1:
            return {"qep_alpha": alpha}, f"error propagation (QEP) α = {alpha:g}"
    return None


def canonical(name: str) -> str:
    """`qep-0.50` and `qep-.5` are the row `qep-0.5`: one cache entry per α."""
    parts = name.split("+")
    for j, part in enumerate(parts):
        if part not in ABLATIONS and change(part) is not None:
            parts[j] = f"qep-{change(part)[0]['qep_alpha']:g}"
    return "+".join(parts)


def settings(name: str) -> dict:
    """The quant settings a row changes: `A+B` is A's changes, then B's."""
    out = {}
    for part in name.split("+"):
        out.update(change(part)[0])
    return out


def base_of(name: str) -> str:
    """The row a row is compared with: `A+B` with `A`, a single change with the defaults."""
    return name.rsplit("+", 1)[0] if "+" in name else "defaults"


def what(name: str) -> str:
    return "; ".join(change(part)[1] for part in name.split("+"))


def job_compile(cfg: str, name: str, out: str, seed: str = "0") -> dict:
    """Row `name` of config `cfg`, compiled into `out`; `seed` is the calibration's (bench_seeds varies it)."""
    from quantc.config import parse_config
    from quantc.pipeline import compile_model
    bits, gs, sym = CONFIGS[cfg]
    # the base is bench_gptq's quantc row (QEP off), so each row changes exactly one setting of plain GPTQ
    quant = {"bits": bits, "group_size": gs, "sym": sym, **QUANTC_GPTQ, "qep_alpha": 0.0, **settings(name)}
    raw = {"model": str(bench_model()), "quant": quant,
           "calibration": {"source": str(WORK / "c4-calib.jsonl"), "samples": 128, "seq_len": 512, "seed": int(seed)}}
    t = time.perf_counter()
    m = compile_model(parse_config(raw, "bench"), out, force=True, progress=False)
    return {"quantize_s": m["timings"]["quantize_s"], "total_s": time.perf_counter() - t, "settings": quant,
            "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", nargs=argparse.REMAINDER)
    ap.add_argument("--model", help="smollm2 (default), qwen or a model folder")
    ap.add_argument("--configs", default="4b", help=f"bench_gptq's configs: {', '.join(CONFIGS)}")
    ap.add_argument("--ablations", default=",".join(ABLATIONS), help=f"rows: {', '.join(ABLATIONS)}")
    ap.add_argument("--kl", default="", help="rows also given the KL check (bench_gptq.job_kl: KL to the fp32 model "
                                             "on fresh C4 and WikiText-2), e.g. defaults,qep-0.5")
    ap.add_argument("--section", help="write the rows to a section of their own, titled with this name (e.g. "
                                      "'QEP α'), leaving the main ablation section as it is")
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    if args.job:
        print("RESULT " + json.dumps(job_compile(*args.job)), flush=True)
        return
    select(args.model)
    configs, names = args.configs.split(","), [canonical(n) for n in args.ablations.split(",")]
    for c in configs:
        if c not in CONFIGS:
            ap.error(f"--configs: {c!r} is not one of {', '.join(CONFIGS)}")
    for n in names:
        if any(change(part) is None for part in n.split("+")):
            ap.error(f"--ablations: {n!r} is not one of {', '.join(ABLATIONS)} or qep-α (0 < α ≤ 1), or two of "
                     "them joined by '+'")
    kl_rows = [canonical(n) for n in args.kl.split(",") if n]
    for n in kl_rows:
        if n not in names:
            ap.error(f"--kl: {n!r} is not one of --ablations ({args.ablations})")
    WORK.mkdir(parents=True, exist_ok=True)
    if args.fresh:
        for p in own_results("ablation-*"):
            p.unlink()
    write_calibration_file()
    fp = cached("eval-fp32", lambda: subprocess_job(["eval", "-"]))
    cmd = "python -m benchmarks.bench_ablation " + shlex.join(sys.argv[1:])     # as a shell reads it back
    rows = []
    for c in configs:
        for n in names:
            if n == "defaults":
                # the same compile as bench_gptq's quantc row (same settings and calibration): one job,
                # one cache entry, so the defaults are not compiled twice (12 minutes on Qwen2.5-0.5B)
                q, e, folder = run_uniform(c)
                kl_name = uniform_job(c)["kl"]
            else:
                key = f"ablation-{c}-{n}"
                folder = WORK / keyed(key)
                q = cached(f"{key}-compile", lambda: subprocess_job([c, n, str(folder)], "benchmarks.bench_ablation"))
                e = cached(f"{key}-eval", lambda: subprocess_job(["eval", str(folder)]))
                kl_name = f"{key}-kl"
            k = run_kl(kl_name, folder) if n in kl_rows else None
            rows.append({"config": c, "name": n, "compile": q, "eval": e, "bytes": linear_bytes(Path(folder)), "kl": k})
            write(rows, fp, cmd, args.section)


def write(rows: list[dict], fp: dict, cmd: str, section: str | None = None) -> None:
    name = f"Ablation of quantc's uniform GPTQ defaults, {section}" if section else \
        "Ablation of quantc's uniform GPTQ defaults"
    lines = [f"## {name} ({title()})", "",
             f"Command: `{cmd}`. bench_gptq's quantc row ({QUANTC_GPTQ}, true-sequential, damp 0.01) with one "
             "setting changed per row; same calibration (128×512 C4) and evaluation (WikiText-2, 80×512, float32 "
             f"through `quantc.load`; fp32 model {fp['ppl']:.2f}). The defaults row is bench_gptq's quantc row (the "
             "same job and cache entry); each other row is its own compile.", "",
             "| config | row | what changes | quantize s | quantized-linear bytes | ppl | compared with | Δ ppl "
             "| KL fresh C4 | KL WikiText-2 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    ppl_of = {(r["config"], r["name"]): r["eval"]["ppl"] for r in rows}
    for r in rows:
        ppl, base = r["eval"]["ppl"], (r["config"], base_of(r["name"]))
        d = f"{ppl - ppl_of[base]:+.2f}" if base in ppl_of and r["name"] != "defaults" else "—"
        kl = " | ".join(f"{r['kl'][t]['kl']:.4f}" if r.get("kl") else "—" for t in ("c4", "wikitext"))
        lines.append(f"| {r['config']} | {r['name']} | {what(r['name'])} | {r['compile']['quantize_s']:.0f} | "
                     f"{r['bytes'] / 1e6:.2f} MB | {ppl:.2f} | {base[1] if r['name'] != 'defaults' else '—'} | {d} "
                     f"| {kl} |")
    lines += ["", "A positive Δ means the setting of the row it is compared with helps: changing it made perplexity "
              "worse. A row `A+B` is compared with row `A`, so `qep-0.5+no-act-order` gives act-order's worth with "
              "error propagation on. "
              "The QEP row turns error propagation on; it is quantc's default (`quant.qep_alpha: 0.5`), chosen "
              "because it helped on both benchmark models. KL columns (rows named in `--kl`): KL(fp32 ‖ checkpoint) "
              f"per token on {KL_WINDOWS} fresh C4 windows (documents after the calibration's) and the first "
              f"{KL_WINDOWS} WikiText-2 windows, bench_gptq's KL check: how far each checkpoint is from the original "
              "model, which perplexity alone does not say."]
    bench = "bench_ablation" + (" " + "".join(c if c.isalnum() else "-" for c in section) if section else "")
    write_section(mark(bench), lines)


if __name__ == "__main__":
    main()
