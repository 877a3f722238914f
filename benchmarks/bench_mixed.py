"""Benchmark: mixed-precision allocation on SmolLM2-135M (or `--model qwen`, or a model folder; the
protocol of bench_gptq).

    python -m benchmarks.bench_mixed [--model qwen] [--predictors fisher,exact,fisher-qd1] [--qep 0.5]
                                     [--qep-predictors fisher,fisher-qd1]
                                     [--budgets 3b,3.5b,4b] [--qep-budgets 3b,wide:4b] [--qep-variants bits,wide-rot]
                                     [--plain-variants bits]
                                     [--variants bits,wide,wide-rot,vllm] [--references 3b,4b]
                                     [--qep-references 4b] [--section NAME] [--fresh]

For each candidate variant (`bits`: today's 2-asym/3/4/8 at g128; `wide`: `candidates: wide`;
`wide-rot`: the wide set with `quant.rotate: hadamard`; `vllm`: `serve: [vllm]`, what vLLM's GPTQ-Marlin
runs, at the 4-bit size only) and each predictor (plan.predictor; `fisher-qdR` = fisher with
`plan.qep_discount: R`, measured for the QEP α of --qep; `fisher-hN` = fisher with a held-out slice of
N sequences, `plan.alpha_samples: N`): measures
once (sweep 1, cached), re-plans from the cache for each budget, compiles each plan (QEP rows: the
first predictor, or --qep-predictors, for --qep-variants, by default the first variant), and evaluates every checkpoint through `quantc.load` in float32 on
WikiText-2.
`--qep-references` compiles the uniform references with QEP too (else their QEP rows appear where
bench_ablation's qep job has run); `--section NAME` writes a section of its own (its own plots), for a
narrower run beside the model's main one.
Budgets equal the exact byte size of uniform 3-bit g128 and 4-bit g128 (as bench_gptq's quantc
rows) and the midpoint (~3.5 bits/weight). Uniform rows are read from bench_gptq's cached results.
Predicted ΔKL (Σ α·err) is compared with the measured Δloss = ln(ppl) − ln(ppl_fp32), and (the KL
check, `--no-kl` skips it) with the measured KL(fp32 ‖ checkpoint) per token on fresh C4 windows (the
predictor's own distribution) and on WikiText-2 windows (bench_gptq.job_kl).
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time

from benchmarks.bench_gptq import (KL_WINDOWS, write_section, QUANTC_GPTQ, RESULTS, WORK, cached, linear_bytes,
                                   peak_rss_mb, prepare, run_kl, run_uniform, subprocess_job, uniform_job)
from benchmarks.common import ROOT, save_plot
from benchmarks.models import bench_model, keyed, mark, title
from quantc.config import PREDICTORS, PlanSettings

CANDIDATES = [{"bits": 2, "sym": False}, {"bits": 3}, {"bits": 4}, {"bits": 8}]
VARIANTS = {   # name: (candidates, extra quant settings, what the table says)
    "bits": (CANDIDATES, {"group_size": 128}, "2-asym/3/4/8, g128"),
    "wide": ("wide", {}, "wide (18: 2-asym, 3/4 sym+asym, 8; g32/64/128)"),
    "wide-rot": ("wide", {"rotate": "hadamard"}, "wide + Hadamard rotation"),
    # wide without its 3/4-bit asymmetric grids (re-planned from wide's measurement, no new one)
    "wide-sym": ([{"bits": 2, "group_size": g, "sym": False} for g in (32, 64, 128)]
                 + [{"bits": b, "group_size": g} for b in (3, 4) for g in (32, 64, 128)]
                 + [{"bits": 8, "group_size": g} for g in (32, 64, 128)], {},
                 "wide without 3/4-bit asym (12: 2-asym, 3/4 sym, 8; g32/64/128)"),
    # what vLLM's GPTQ-Marlin runs (serve: [vllm]): symmetric 4/8-bit, q/k/v and gate/up sharing one option;
    # per-channel 4-bit is the only option below 4-bit g128, so it is what buys finer groups elsewhere
    "vllm": ([{"bits": 4, "group_size": -1}, {"bits": 4, "group_size": 128}, {"bits": 4, "group_size": 64},
              {"bits": 4, "group_size": 32}, {"bits": 8, "group_size": 128}], {},
             "serve: [vllm] (4-bit sym per-channel/g128/g64/g32, 8-bit sym g128)"),
}
SERVE = {"vllm": ["vllm"]}                 # variant -> serve targets of its YAML
# budgets a variant can reach (none of vLLM's options is as small as 3-bit g128)
REACHABLE = {"vllm": ("4b",)}


def plan_settings(predictor: str, check: bool = True) -> dict:
    """A predictor label's `plan:` settings: `fisher-qdR` is fisher with plan.qep_discount R,
    `fisher-hN` fisher with N held-out sequences (plan.alpha_samples); both may be given, as
    `fisher-h16-qd0.4`. With `check`, fisher runs carry the uniform plans too (plan.check_uniform),
    for the table of the predictor's scale."""
    name, *mods = predictor.split("-")
    s = {"predictor": name}
    for m in mods:
        if m.startswith("qd"):
            s["qep_discount"] = float(m[2:])
        elif m.startswith("h"):
            s["alpha_samples"] = int(m[1:])
        else:
            raise ValueError(f"{m!r} in {predictor!r}")
    return {**s, **({"check_uniform": True} if check and name == "fisher" else {})}


def job_label(predictor: str) -> str:
    """The cache-key form of a predictor label: only the settings that differ from quantc's defaults,
    so jobs are keyed by what they measure. Two labels of one measurement (fisher-h16 and fisher, with
    16 held-out sequences the default) share their jobs, and a default changed later moves the bare
    label to new jobs: the earlier ones keep their explicit form (fisher-h4 since 16 became the default)."""
    s, d = plan_settings(predictor, check=False), PlanSettings()
    mods = [f"h{s['alpha_samples']}"] if s.get("alpha_samples", d.alpha_samples) != d.alpha_samples else []
    mods += [f"qd{s['qep_discount']:g}"] if s.get("qep_discount", d.qep_discount) != d.qep_discount else []
    return "-".join([s["predictor"], *mods])


def _plan_settings_or_none(predictor: str) -> dict | None:
    """plan_settings, or None for a label that names no predictor (or no number after -qd or -h)."""
    try:
        s = plan_settings(predictor)
    except ValueError:
        return None
    return s if s["predictor"] in PREDICTORS else None


def plan_qep(predictor: str, qep: float) -> float:
    """The QEP α a predictor's measurement is made for: only a QEP discount reads it (the others'
    measurements, and their cached jobs, are those of α = 0)."""
    return qep if "qep_discount" in plan_settings(predictor) else 0.0


def raw_config(budget_bytes: int | None, qep: float, predictor: str = "fisher", variant: str = "bits",
               check: bool = True) -> dict:
    """bench_mixed's budget YAML; `check`: with the predictor's uniform-plan check (plan_settings)."""
    candidates, quant, _ = VARIANTS[variant]
    return {"model": str(bench_model()),
            **({"serve": SERVE[variant]} if variant in SERVE else {}),
            "budget": {"memory": budget_bytes} if budget_bytes else {},
            "quant": {"qep_alpha": qep, **QUANTC_GPTQ, **quant},
            "candidates": candidates,
            "plan": plan_settings(predictor, check),
            "calibration": {"source": str(WORK / "c4-calib.jsonl"), "samples": 128, "seq_len": 512, "seed": 0}}


def prefix(variant: str) -> str:
    """Cache-key prefix of a variant: none for today's candidates (the keys of earlier runs)."""
    return "" if variant == "bits" else f"{variant}-"


def uniform_bytes(bits: int) -> int:
    from quantc.model import load_model
    from quantc.options import Option
    from quantc.pipeline import linear_names
    model = load_model(str(bench_model()))
    mods = dict(model.named_modules())
    return sum(Option(bits, 128).bytes_for(mods[n].in_features, mods[n].out_features) for n in linear_names(model))


def job_plan(budgets: dict[str, int], predictor: str, variant: str = "bits", qep: float = 0.0) -> dict:
    """Measure (timed), then re-plan from the cache for every budget (timed). Budgets that no plan fits
    (the compile's preflight would refuse them) are recorded as such; with none left, nothing is measured."""
    from quantc.calibration import calibration_tokens
    from quantc.config import parse_config
    from quantc.errors import ConfigError
    from quantc.passes.measure import option_key, unit_dkl
    from quantc.pipeline import load_source
    from quantc.planning import check_budget, get_measurements, shape_units, solve
    from quantc.rotate import untied_head_bytes
    cfg = parse_config(raw_config(None, qep, predictor, variant), "bench")
    model, tok = load_source(cfg)        # as the compile loads it (lazily; rotated when the variant says so)
    head = untied_head_bytes(model, cfg)         # a rotated tied model pays for its untied lm_head
    infeasible, shapes = {}, shape_units(model, cfg)
    for name, b in budgets.items():
        try:
            check_budget(shapes, cfg, b, warn=False, head=head)
        except ConfigError as e:                 # e.g. the untied head alone is larger than the budget
            infeasible[name] = {"infeasible": str(e).split(": ", 1)[-1], "untied_head_bytes": head}
    if len(infeasible) == len(budgets):
        return {"measure_s": None, "plans": infeasible, "peak_rss_mb": peak_rss_mb()}
    tokens = calibration_tokens(cfg.calibration, tok)
    t = time.perf_counter()
    ms, was_cached = get_measurements(cfg, model, tokens, progress=False)
    measure_s = time.perf_counter() - t
    out = {"measure_s": ms.meta["seconds"], "measure_cached": was_cached, "measure_call_s": measure_s,
           "subset_of": ms.meta.get("subset_of"),       # re-planned from a wider cached measurement
           "plans": {}}
    from quantc.report import write_report
    for name, b in budgets.items():
        if name in infeasible:
            out["plans"][name] = infeasible[name]
            continue
        t = time.perf_counter()
        ms2, hit = get_measurements(cfg, model, tokens, progress=False)
        plan = solve(ms2, cfg, b, head=head)
        replan_s = time.perf_counter() - t
        write_report(ROOT / "benchmarks" / "plots" / keyed(f"plan-{prefix(variant)}{predictor}-{name}"), plan, ms2, cfg)
        out["plans"][name] = {**plan.predicted, "replan_s": replan_s, "cache_hit": hit,
                              "bits": {str(o): sum(1 for c in plan.choices.values() if c.bits == o) for o in (2, 3, 4, 8)}}
    for bits, sym in ((3, True), (4, True)):       # predictions for the uniform references (g128 sym)
        o = next((o for o in cfg.candidates if (o.bits, o.group_size, o.sym) == (bits, 128, sym)), None)
        if o is not None:
            out[f"uniform{bits}_pred"] = sum(unit_dkl(u, option_key(o)) for u in ms.units.values())
    out["calibration"] = ms.meta.get("calibration")
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def job_compile(budget: int, qep: float, folder: str, predictor: str, variant: str = "bits") -> dict:
    from quantc.config import parse_config
    from quantc.pipeline import compile_model
    t = time.perf_counter()
    m = compile_model(parse_config(raw_config(budget, qep, predictor, variant), "bench"), folder, force=True,
                      progress=False)
    return {"quantize_s": m["timings"]["quantize_s"], "plan_s": m["timings"].get("plan_s", 0),
            "total_s": time.perf_counter() - t, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", nargs=argparse.REMAINDER)
    ap.add_argument("--model", help="smollm2 (default), qwen (Qwen2.5-Coder-0.5B-Instruct, fetched once) or a "
                                    "model folder")
    ap.add_argument("--budgets", default="3b,3.5b,4b")
    ap.add_argument("--predictors", default="fisher,exact")
    ap.add_argument("--qep", type=float, default=0.5)
    ap.add_argument("--qep-budgets", default="3b",
                    help="budgets compiled with QEP: BUDGET for every QEP variant, or VARIANT:BUDGET for one")
    ap.add_argument("--qep-variants", help="variants compiled with QEP too (default: the first of --variants)")
    ap.add_argument("--qep-predictors", help="predictors whose plans are compiled with QEP (default: the first of "
                                             "--predictors)")
    ap.add_argument("--variants", default="bits", help=f"candidate variants: {', '.join(VARIANTS)}")
    ap.add_argument("--plain-variants", help="variants compiled without QEP (default: every one of --variants)")
    ap.add_argument("--references", default="3b,4b",
                    help="uniform GPTQ references to compile (bench_gptq's quantc rows; '' = none; a larger model "
                         "may skip the ones its budgets do not need)")
    ap.add_argument("--qep-references", default="",
                    help="uniform references compiled with QEP α too (bench_ablation's qep job; '' = none: those "
                         "rows appear where that job has run)")
    ap.add_argument("--section", help="write the rows to a section of their own, titled with this name, leaving "
                                      "the model's main section (and its plots) as they are")
    ap.add_argument("--no-kl", action="store_true", help="skip the KL check of every checkpoint")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--cached-only", action="store_true",
                    help="write the section from the finished jobs only (an interrupted run's rows), run nothing")
    args = ap.parse_args()
    if args.job:
        kind = args.job[0]
        res = job_plan(json.loads(args.job[1]), args.job[2], args.job[3], float(args.job[4])) if kind == "plan" else \
            job_compile(int(args.job[1]), float(args.job[2]), args.job[3], args.job[4], args.job[5])
        print("RESULT " + json.dumps(res), flush=True)
        return
    predictors = args.predictors.split(",")
    for p in predictors:                 # before any work: a label the plan jobs could not read
        if _plan_settings_or_none(p) is None:
            ap.error(f"--predictors: {p!r} is not one of {', '.join(PREDICTORS)}, or fisher-qdR with R a number "
                     "(plan.qep_discount), or fisher-hN with N an integer (plan.alpha_samples)")
    prepare(args.model, "mixed-*" if args.fresh else None)
    sizes = budget_sizes()
    budgets = {b: sizes[b] for b in args.budgets.split(",")}
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"--variants: {v!r} is not one of {', '.join(VARIANTS)}")
    qep_budgets = args.qep_budgets.split(",") if args.qep > 0 else []
    qep_variants = args.qep_variants.split(",") if args.qep_variants else variants[:1]
    plain_variants = args.plain_variants.split(",") if args.plain_variants is not None else variants
    qep_predictors = args.qep_predictors.split(",") if args.qep_predictors else predictors[:1]
    for p in qep_predictors:
        if p not in predictors:
            ap.error(f"--qep-predictors: {p!r} is not one of --predictors ({args.predictors})")
    for flag, vs in (("--qep-variants", qep_variants), ("--plain-variants", plain_variants)):
        for v in filter(None, vs):
            if v not in variants:
                ap.error(f"{flag}: {v!r} is not one of --variants ({args.variants})")
    for entry in qep_budgets:
        v, _, b = entry.rpartition(":")
        if b not in budgets or (v and v not in qep_variants):
            ap.error(f"--qep-budgets: {entry!r} is not one of --budgets ({args.budgets}), or VARIANT:BUDGET "
                     f"with VARIANT one of --qep-variants")
    for c in filter(None, args.qep_references.split(",")):
        if c not in ("3b", "4b") or args.qep <= 0:
            ap.error(f"--qep-references: {c!r} is not 3b or 4b, or --qep is 0")
    global SECTION
    SECTION = args.section

    def reach(v: str) -> dict:
        return {b: n for b, n in budgets.items() if b in REACHABLE.get(v, budgets)}

    plans = {(v, p): run_plan(v, p, reach(v), plan_qep(p, args.qep)) for v in variants for p in predictors}
    fp = cached("eval-fp32", lambda: subprocess_job(["eval", "-"]))
    for c in filter(None, args.qep_references.split(",")):   # compiled before the plans' checkpoints
        if not args.cached_only:
            run_uniform(c, args.qep)
    for c in filter(None, args.references.split(",")):   # the uniform references: bench_gptq's quantc rows
        if c not in ("3b", "4b"):
            ap.error(f"--references: {c!r} is not 3b or 4b")
        run_uniform(c)
        for q in (0.0, args.qep):       # the QEP reference too, where bench_ablation's qep job has run
            j = uniform_job(c, q)
            if not args.no_kl and not args.cached_only and (q == 0 or (WORK / f"{keyed(j['eval'])}.json").is_file()):
                run_kl(j["kl"], j["folder"])
    rows = []
    def qep_budget(v: str, b: str) -> bool:      # "4b" for every QEP variant, "wide:4b" for one
        return b in qep_budgets or f"{v}:{b}" in qep_budgets
    def feasible(v: str, p: str) -> list[str]:
        return [b for b in reach(v) if "infeasible" not in plans[(v, p)]["plans"][b]]

    runs = [(v, p, b, 0.0) for v in variants if v in plain_variants for p in predictors for b in feasible(v, p)] + \
           [(v, p, b, args.qep) for v in qep_variants for p in qep_predictors for b in feasible(v, p) if qep_budget(v, b)]
    # the run's command: --cached-only rewrites the section of a run from its jobs, with that run's command
    cmd = "python -m benchmarks.bench_mixed " + shlex.join(a for a in sys.argv[1:] if a != "--cached-only")
    kl_file = lambda key: WORK / f"{keyed(f'{key}-kl')}.json"     # noqa: E731
    for v, p, b, qep in runs:
        key, folder = checkpoint_name(v, p, b, qep)
        if args.cached_only and not all((WORK / f"{keyed(f'{key}-{j}')}.json").is_file() for j in ("compile", "eval")):
            continue
        q = run_compile(v, p, b, qep, budgets[b])
        e = cached(f"{key}-eval", lambda: subprocess_job(["eval", str(folder)]))
        k = None if args.no_kl or (args.cached_only and not kl_file(key).is_file()) else run_kl(f"{key}-kl", folder)
        plan = plans[(v, p)]["plans"][b]
        rows.append({"key": key, "budget": b, "qep": qep, "compile": q, "eval": e, "bytes": linear_bytes(folder),
                     "file_bytes": file_bytes(folder),
                     "pred": plan["delta_kl"], "plan": plan, "predictor": p, "variant": v, "kl": k})
        write(rows, plans, fp, sizes, cmd)
    write(rows, plans, fp, sizes, cmd)


def budget_sizes() -> dict[str, int]:
    """The budgets' exact bytes: uniform 3-bit and 4-bit g128, and their midpoint (≈3.5 bits/weight)."""
    sizes = cached("mixed-sizes", lambda: {"3b": uniform_bytes(3), "4b": uniform_bytes(4)})
    return {**sizes, "3.5b": (sizes["3b"] + sizes["4b"]) // 2}


def checkpoint_name(v: str, p: str, b: str, qep: float):
    """The one home of a plan checkpoint's cache key and folder (bench_onnx reads them too)."""
    key = f"mixed-{prefix(v)}{job_label(p)}-{b}-qep{qep:g}"
    return key, WORK / keyed(key)


def run_plan(v: str, p: str, budgets: dict[str, int], qep: float = 0.0) -> dict:
    """Variant v's measurement and its plans for `budgets` (job_plan), from the cache or run now. A cached
    job that did not plan every budget asked for (a narrower run's) is run again for all of them, its
    own included; its measurement comes from quantc's cache where that still holds it."""
    name = f"mixed-{prefix(v)}{job_label(p)}-plan"
    path = WORK / f"{keyed(name)}.json"
    job = lambda b: subprocess_job_m(["plan", json.dumps(b), p, v, str(qep)])     # noqa: E731
    if path.is_file():
        done = json.loads(path.read_text())["plans"]
        if not set(budgets) <= set(done):      # the cached job stays until the new one has finished
            sizes = budget_sizes()
            print(f"[bench] {name}: planning {', '.join(budgets)} beside {', '.join(done)} ...", flush=True)
            res = job({**{b: sizes[b] for b in done if b in sizes}, **budgets})
            path.write_text(json.dumps(res, indent=2))
            return res
    return cached(name, lambda: job(budgets))


def run_compile(v: str, p: str, b: str, qep: float, budget: int) -> dict:
    """Compile variant v's plan at budget b (job_compile), from the cache or run now."""
    key, folder = checkpoint_name(v, p, b, qep)
    return cached(f"{key}-compile", lambda: subprocess_job_m(["compile", str(budget), str(qep), str(folder), p, v]))


def file_bytes(folder) -> int:
    """Every tensor the checkpoint holds (its safetensors files): the quantized linears plus the
    embeddings, norms and lm_head, which a rotation of a tied model unties (a second 16-bit matrix)."""
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def subprocess_job_m(args):
    return subprocess_job(args, "benchmarks.bench_mixed")


def _when(rows, plans) -> str:
    """When the jobs behind the section finished (their cached results' file times): rows are cached
    jobs, so a section rewritten later may hold rows of several runs, and says so."""
    import datetime
    names = [f"mixed-{prefix(v)}{job_label(p)}-plan" for v, p in plans] + \
        [f"{r['key']}-{j}" for r in rows for j in ("compile", "eval", "kl")]
    names += [uniform_job(b, q)[j] for b in ("3b", "4b") for q in {0.0} | {r["qep"] for r in rows}
              for j in ("compile", "eval", "kl")]
    times = sorted((WORK / f"{keyed(n)}.json").stat().st_mtime for n in names if (WORK / f"{keyed(n)}.json").is_file())
    if not times:
        return ""
    day = lambda t: datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")   # noqa: E731
    return f"Its jobs (measurements, compiles, evaluations; cached in benchmarks/work/) finished between {day(times[0])} and {day(times[-1])} UTC."


SECTION: str | None = None     # --section: the name of a section of its own


def _slug(sep: str = " ") -> str:
    """The section's name in its marker and plot file names ('' for the model's main section)."""
    return sep + "".join(c if c.isalnum() else "-" for c in SECTION) if SECTION else ""


def _uniform(bits: int, qep: float = 0.0, job: str = "eval") -> dict | None:
    """A uniform GPTQ reference's evaluation (or its KL check, job="kl"): bench_gptq's quantc row (QEP
    off), or with QEP 0.5 its QEP row (bench_ablation's qep-0.5 job), when that job has run."""
    p = WORK / f"{keyed(uniform_job(f'{bits}b', qep)[job])}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def _check(folder) -> dict | None:
    """The compile's own held-out check (quantc.json's `check`), where the checkpoint has one."""
    p = folder / "quantc.json"
    return json.loads(p.read_text()).get("check") if p.is_file() else None


def write(rows, plans, fp, sizes, cmd) -> None:
    u3, u4 = _uniform(3), _uniform(4)
    lines = [f"## Mixed precision: allocation under a memory budget ({title()}){', ' + SECTION if SECTION else ''}", "",
             f"Command: `{cmd}` (it also runs the uniform GPTQ references with bench_gptq's settings). "
             "Candidates per unit (q/k/v, o, gate/up, down), by variant: "
             + "; ".join(f"*{v}* = {VARIANTS[v][2]}" for v in dict.fromkeys(v for v, _ in plans))
             + f"; all with {QUANTC_GPTQ}. Same calibration (128×512 C4) and evaluation (WikiText-2, 80×512, "
             "float32 through `quantc.load`) as above. " + _when(rows, plans), "",
             "Predictors (`plan.predictor`): *fisher* (the default) = sweep 1 streams forward once (Hessians, every "
             "unit's GPTQ at one option per bit width — `plan.solve: anchors`, the default; each other option's "
             "error is its RTN error × the anchor's GPTQ/RTN ratio per row, and the 8 sample units solve every "
             "option — held-out streams for the sample units and the uniform plans at the anchors) and backward "
             "once (8 sampled-label "
             "probes), ΔKL ≈ Σ_c b_c·(ΔW H ΔWᵀ)_cc / 4T scaled per option by 8 units measured exactly; "
             "*exact* = every unit's ΔKL measured with its own quantized weights at each ≤4-bit option (+ α·err "
             "for 8-bit), all perturbed streams carried forward together (O(layers²) compute)."
             + ("".join(f" *{p}* = fisher with `plan.qep_discount: {plan_settings(p)['qep_discount']:g}`: the backward "
                        "sweep scales the gradient into every linear's input by 1 − α·ρ (α the QEP of its rows), so an "
                        "error is weighted by what error propagation leaves of it."
                        for p in dict.fromkeys(p for _, p in plans) if "qep_discount" in plan_settings(p)))
             + ("".join(f" *{p}* = fisher with a held-out slice of {plan_settings(p)['alpha_samples']} sequences "
                        f"(`plan.alpha_samples`; the default is {PlanSettings().alpha_samples}): the slice on which the sample units' ΔKL, the "
                        "probes and the head are measured, the last rows of the calibration draw, which sweep 1 "
                        "does not calibrate on."
                        for p in dict.fromkeys(p for _, p in plans) if "alpha_samples" in plan_settings(p))), "",
             "| candidates | predictor | measurement (sweep 1) | × bits' | re-plan from the cache | peak RSS |",
             "|---|---|---|---|---|---|"]
    for (v, p), plan in plans.items():
        if plan["measure_s"] is None:
            lines.append(f"| {v} | {p} | not measured: no budget fits | — | — | {plan['peak_rss_mb']:.0f} MB |")
            continue
        if plan.get("subset_of"):      # no measurement of its own: the wider set's, cut down
            wider = next((w for (w, q), x in plans.items() if q == p and w != v and x.get("measure_s") == plan["measure_s"]),
                         "a wider set")
            lines.append(f"| {v} | {p} | none: {wider}'s measurement, re-planned | — | "
                         + ", ".join(f"{x['replan_s']:.2f} s" for x in plan["plans"].values() if "replan_s" in x)
                         + f" | {plan['peak_rss_mb']:.0f} MB |")
            continue
        base = plans.get(("bits", p))
        rel = f"{plan['measure_s'] / base['measure_s']:.2f}×" if base and base["measure_s"] else "—"
        lines.append(f"| {v} | {p} | {plan['measure_s']:.0f} s | {rel} | "
                     + ", ".join(f"{x['replan_s']:.2f} s" for x in plan["plans"].values() if "replan_s" in x)
                     + f" | {plan['peak_rss_mb']:.0f} MB |")
    lines += ["", "| budget | candidates | predictor | QEP α | quantized-linear bytes | checkpoint bytes | bits/weight | units at 2/3/4/8 bits | compile s | ppl | uniform ppl at that size | gap closed |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    p0 = next(p for plan in plans.values() for p in plan["plans"].values() if "infeasible" not in p)
    weights = 8 * p0["allocated_bytes"] / p0["avg_bits"]        # quantized weights (from any plan)
    qeps = sorted({r["qep"] for r in rows} - {0})
    for bits in (3, 4):
        for qep in [0.0, *qeps]:
            u = _uniform(bits, qep)
            job = uniform_job(f"{bits}b", qep)
            q = WORK / f"{keyed(job['compile'])}.json"
            if not (u and q.is_file()):
                continue
            n = sum(p0["bits"].values())          # units of the model (every plan places all of them)
            mix = f"0/{n}/0/0" if bits == 3 else f"0/0/{n}/0"
            lines.append(f"| uniform {bits}-bit{'' if qep == 0 else '*'} | {bits}-bit g128 | — | {qep:g} | "
                         f"{sizes[f'{bits}b'] / 1e6:.2f} MB | {file_bytes(job['folder']) / 1e6:.2f} MB | "
                         f"{8 * sizes[f'{bits}b'] / weights:.3f} | {mix} | "
                         f"{json.loads(q.read_text())['total_s']:.0f} | {u['ppl']:.2f} | — | — |")
    for r in rows:
        b, ppl = r["budget"], r["eval"]["ppl"]
        # the uniform reference at the same QEP α where it has run (else QEP off)
        ref = {"3b": _uniform(3, r["qep"]) or u3, "4b": _uniform(4, r["qep"]) or u4}.get(b)
        gap = ""
        if u3 and u4:
            gap = f"{100 * (u3['ppl'] - ppl) / (u3['ppl'] - u4['ppl']):.0f}%"
        mix = "/".join(str(r["plan"]["bits"][k]) for k in ("2", "3", "4", "8"))
        ref_ppl = f"{ref['ppl']:.2f}" if ref else "—"
        lines.append(f"| {b} ({sizes[b] / 1e6:.1f} MB) | {r['variant']} | {r['predictor']} | {r['qep']:g} | "
                     f"{r['bytes'] / 1e6:.2f} MB | {r['file_bytes'] / 1e6:.2f} MB | "
                     f"{r['plan']['avg_bits']:.3f} | {mix} | {r['compile']['total_s']:.0f} | {ppl:.2f} | "
                     f"{ref_ppl} | {gap} |")
    for (v, p), plan in plans.items():
        for b, x in plan["plans"].items():
            if "infeasible" in x:
                why = (f": the untied lm_head takes {x['untied_head_bytes'] / 1e6:.2f} MB of the budget"
                       if x.get("untied_head_bytes") else "")
                lines.append(f"| {b} ({sizes[b] / 1e6:.1f} MB) | {v} | {p} | — | infeasible{why} | | | | | | | |")
    lines += ["", "Budgets count the quantized linears (quantized-linear bytes) and, for a rotated tied model "
              "(SmolLM2), the lm_head the rotation unties (vocab × hidden × 2 bytes, beside the embeddings); "
              "checkpoint bytes are every tensor of the safetensors files. A uniform row marked * is "
              "bench_gptq's QEP row (bench_ablation's qep-0.5 job, from its own run): it is the reference at "
              "that size for the plans compiled with the same QEP α; the others use the QEP-off references. "
              "Gap closed uses the QEP-off references.", "",
              "Gap closed: (ppl of uniform 3-bit − ppl) / (ppl of uniform 3-bit − ppl of uniform 4-bit). "
              "Bits/weight counts qweight, qzeros, scales and g_idx per quantized weight. The compile s of a mixed "
              "row includes its plan step (a cache read after the first).", "",
              "Predicted ΔKL (sum over units) against what was measured: Δloss on WikiText-2 (ln ppl − ln ppl_fp32, "
              f"the protocol's 80 windows), and the KL check: KL(fp32 ‖ checkpoint) per token on {KL_WINDOWS} fresh "
              "C4 windows (documents after the calibration's, never calibrated on: the distribution the "
              f"predictor measures on) and on the first {KL_WINDOWS} WikiText-2 windows; and the compile's own "
              "held-out check (quantc.json's `check`: KL(original ‖ checkpoint) on the calibration.check_samples "
              "documents after the calibration's, the first of the fresh C4 windows, every second position, "
              "measured inside the quantize sweep). Each ratio is measured / predicted.", "",
              "| plan | candidates | predictor | predicted ΔKL | Δloss WikiText-2 | ratio | KL fresh C4 | ratio | "
              "KL WikiText-2 | ratio | compile's check | ratio |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    pts = []
    for (v, p), plan in plans.items():
        if VARIANTS[v][1].get("rotate"):     # the uniform references are compiles of the unrotated model
            continue
        pts += [(f"uniform {b}-bit", v, p, plan[f"uniform{b}_pred"], u, _uniform(b, job="kl"),
                 _check(uniform_job(f"{b}b")["folder"])) for b, u in ((3, u3), (4, u4)) if f"uniform{b}_pred" in plan]
        pts += [(f"uniform {b}-bit QEP {q:g}", v, p, plan[f"uniform{b}_pred"], _uniform(b, q), _uniform(b, q, "kl"),
                 _check(uniform_job(f"{b}b", q)["folder"]))
                for q in sorted({r["qep"] for r in rows} - {0}) for b in (3, 4)
                if f"uniform{b}_pred" in plan and _uniform(b, q)]
    pts += [(f"{r['budget']} QEP {r['qep']:g}", r["variant"], r["predictor"], r["pred"], r["eval"], r["kl"],
             _check(checkpoint_name(r["variant"], r["predictor"], r["budget"], r["qep"])[1])) for r in rows]
    for name, v, pred_kind, pred, ev, kl, own in pts:
        if ev:
            d = math.log(ev["ppl"]) - math.log(fp["ppl"])
            checks = " | ".join(f"{kl[t]['kl']:.4f} | {kl[t]['kl'] / pred:.2f}" if kl else "— | —"
                                for t in ("c4", "wikitext"))
            checks += f" | {own['kl']:.4f} | {own['kl'] / pred:.2f}" if own else " | — | —"
            lines.append(f"| {name} | {v} | {pred_kind} | {pred:.4f} | {d:.4f} | {d / pred:.2f} | {checks} |")
    cal = plans.get((next(iter(plans))[0], "fisher"), {}).get("calibration")
    if cal:
        lines += ["", f"The fisher predictor's per-option scale (candidates: {next(iter(plans))[0]}): Σ measured ΔKL / Σ Fisher form over its calibration "
                  "sample (8 units measured alone at every anchor option); options whose sample ΔKL is float noise "
                  "take the nearest calibrated factor; a predicted option takes its anchor's factor × Σ solved / Σ "
                  "predicted Fisher form over the sample (the sample units solve every option). Last columns: the uniform plan at that option, predicted (scaled) and "
                  "measured ΔKL on the held-out slice:", "",
                  "| option | sample measured | sample Fisher | factor | uniform predicted | uniform measured |",
                  "|---|---|---|---|---|---|"]
        for k, c in cal.items():
            f = lambda v: f"{v:.4g}" if v is not None else "—"   # noqa: E731
            lines.append(f"| {k} | {f(c.get('sample_measured'))} | {f(c.get('sample_fisher'))} | {c['factor']:.3f}"
                         + (f" (from {c['from']})" if c.get("from") else "")
                         + (f" ({c['anchor']}'s × {c['sample_fisher_solved'] / c['sample_fisher']:.3f})"
                            if c.get("anchor") and c["sample_fisher"] else "")
                         + f" | {f(c.get('uniform_predicted'))} | {f(c.get('uniform_measured'))} |")
    png = _plot(rows, u3, u4, sizes, fp)
    if png:
        lines += ["", f"![perplexity against size]({png.relative_to(RESULTS.parent).as_posix()})  ",
                  f"Plans: `benchmarks/plots/{keyed('plan-PREDICTOR-BUDGET')}/` (bits per layer, importance and "
                  "sensitivity per layer, predicted quality against size, report.md)."]
    png = _plot_predictor(rows, fp)
    if png:
        lines += ["", f"![predicted against measured]({png.relative_to(RESULTS.parent).as_posix()})"]
    write_section(mark("bench_mixed" + _slug()), lines)


def _plot_predictor(rows, fp):
    """Every plan's predicted ΔKL against what was measured: KL on fresh C4 (filled) and Δloss on
    WikiText-2 (hollow), with the y = x line and the 0.8–1.25 band."""
    pts = [r for r in rows if r["kl"]]
    if not pts:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out = RESULTS.parent / "plots" / f"{keyed('mixed_predicted_vs_measured' + _slug('-'))}.png"
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    lo = min(min(r["pred"], r["kl"]["c4"]["kl"]) for r in pts) / 1.5
    hi = max(max(r["pred"], math.log(r["eval"]["ppl"] / fp["ppl"])) for r in pts) * 1.5
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, label="measured = predicted")
    ax.fill_between([lo, hi], [0.8 * lo, 0.8 * hi], [1.25 * lo, 1.25 * hi], color="grey", alpha=0.15,
                    label="0.8–1.25")
    groups = sorted({(r["variant"], r["qep"]) for r in rows if r["kl"]})
    for (v, q), color in zip(groups, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        g = [r for r in pts if (r["variant"], r["qep"]) == (v, q)]
        ax.plot([r["pred"] for r in g], [r["kl"]["c4"]["kl"] for r in g], "o", color=color,
                label=f"{v}, QEP {q:g}: KL fresh C4")
        ax.plot([r["pred"] for r in g], [math.log(r["eval"]["ppl"] / fp["ppl"]) for r in g], "o", color=color,
                mfc="none", label=f"{v}, QEP {q:g}: Δloss WikiText-2")
    ax.set_xscale("log")
    return save_plot(fig, ax, out, "predicted ΔKL (nats/token)", "measured (nats/token)")


def _plot(rows, u3, u4, sizes, fp):
    """Measured perplexity against quantized-linear size: uniform GPTQ and the mixed plans."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out = RESULTS.parent / "plots" / f"{keyed('mixed_ppl_vs_size' + _slug('-'))}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    uni = [(sizes[k] / 1e6, u["ppl"]) for k, u in (("3b", u3), ("4b", u4)) if u]
    if uni:
        ax.plot(*zip(*uni), "o-", color="k", label="uniform GPTQ (3, 4 bit)")
    for qep in sorted({r["qep"] for r in rows} - {0}):
        uq = [(sizes[k] / 1e6, u["ppl"]) for k, u in (("3b", _uniform(3, qep)), ("4b", _uniform(4, qep))) if u]
        if uq:
            ax.plot(*zip(*uq), "o:", color="k", mfc="none", label=f"uniform GPTQ + QEP {qep:g}")
    lines = sorted({(r["variant"], r["predictor"], r["qep"]) for r in rows})
    for (v, pred, q), marker in zip(lines, "s^Dv<>ph"):
        pts = sorted((r["bytes"] / 1e6, r["eval"]["ppl"]) for r in rows
                     if (r["variant"], r["predictor"], r["qep"]) == (v, pred, q))
        ax.plot(*zip(*pts), marker + "--", label=f"mixed, {v}, {pred}, QEP {q:g}")
    ax.axhline(fp["ppl"], color="grey", lw=0.8, ls=":", label="fp32")
    return save_plot(fig, ax, out, "quantized-linear bytes (MB)", "WikiText-2 perplexity")


if __name__ == "__main__":
    main()
