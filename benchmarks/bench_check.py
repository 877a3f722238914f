"""Benchmark: the compile's held-out check (quantc.json's `check`, measured inside the quantize sweep)
against the same KL computed afterwards from the saved checkpoint, and against the KL check of the
other benchmarks (16 fresh C4 windows, 16 WikiText-2 windows), on SmolLM2-135M (or `--model qwen`).

    python -m benchmarks.bench_check [--model qwen] [--configs 4b] [--qep 0,0.5]

The checkpoints are the uniform GPTQ references of bench_gptq (QEP off) and bench_ablation (QEP α),
shared through their caches. *Same windows*: the calibration.check_samples sequences the compile held
out (the C4 documents after the calibration's 128: the first of the 16 fresh windows), the original
model and the checkpoint loaded through `quantc.load` in float32, KL at every second position as the
check compares. The two differ by the checkpoint's float16 scales and the sweep's float32 weights.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from benchmarks.bench_gptq import (KL_WINDOWS, WORK, cached, peak_rss_mb, prepare, run_kl, run_uniform, subprocess_job,
                                   uniform_job, write_section)
from benchmarks.common import machine
from benchmarks.models import bench_model, keyed, mark, title


def job_same(folder: str) -> dict:
    """KL(original ‖ checkpoint) per token on the compile's held-out sequences, from the saved files."""
    import torch
    import quantc
    from quantc.calibration.data import check_tokens
    from quantc.config import Calibration
    from quantc.model import load_model, load_tokenizer
    m = json.loads((Path(folder) / "quantc.json").read_text())
    tok = load_tokenizer(str(bench_model()))
    tokens = check_tokens(Calibration(**m["config"]["calibration"]), tok)
    t = time.perf_counter()
    ref = load_model(str(bench_model()))
    model = quantc.load(folder, dtype=torch.float32)
    kl, n = 0.0, 0
    with torch.no_grad():
        for row in tokens:                          # one sequence's logits at a time
            ids = row.unsqueeze(0)
            p = ref(input_ids=ids).logits[:, :-1:2].double().log_softmax(-1)
            q = model(input_ids=ids).logits[:, :-1:2].double().log_softmax(-1)
            kl += float((p.exp() * (p - q)).sum())
            n += p.shape[1]
    return {"kl": kl / n, "positions": n, "sequences": int(tokens.shape[0]), "same_s": time.perf_counter() - t}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", nargs=argparse.REMAINDER)
    ap.add_argument("--model", help="smollm2 (default), qwen or a model folder")
    ap.add_argument("--configs", default="4b", help="uniform configs (bench_gptq's names)")
    ap.add_argument("--qep", default="0,0.5", help="QEP α of each compile (0: bench_gptq's row; else bench_ablation's)")
    ap.add_argument("--off", default="4b", help="configs also compiled with the check off (QEP off), for the "
                                                "quantize seconds side by side ('' = none)")
    args = ap.parse_args()
    if args.job:
        res = job_same(args.job[1])
        res["peak_rss_mb"] = peak_rss_mb()
        print("RESULT " + json.dumps(res), flush=True)
        return
    prepare(args.model, None)
    cmd = " ".join(["python -m benchmarks.bench_check", shlex.join(sys.argv[1:])]).strip()
    rows = []
    for c in args.configs.split(","):
        for qep in (float(q) for q in args.qep.split(",")):
            j = uniform_job(c, qep)
            q, e, folder = run_uniform(c, qep)
            k = run_kl(j["kl"], folder)
            m = json.loads((folder / "quantc.json").read_text())
            own = m.get("check")
            if own is None:
                raise SystemExit(f"{folder}: its compile ran without the held-out check (an older cache entry): "
                                 f"delete {keyed(j['compile'])}.json in benchmarks/work and run again")
            same = cached(f"{j['compile']}-same", lambda: subprocess_job(["same", str(folder)], "benchmarks.bench_check"))
            rows.append({"config": c, "qep": qep, "quantize_s": m["timings"]["quantize_s"],
                         "check_s": m["timings"]["check_s"], "forward_s": m["timings"].get("check_forward_s"),
                         "own": own, "same": same, "kl": k, "ppl": e["ppl"]})
    off = {}
    for c in filter(None, args.off.split(",")):     # the same compile as bench_gptq's row, without the check
        folder = WORK / keyed(f"quantc-gptq-{c}-nocheck")
        off[c] = cached(f"quant-quantc-gptq-{c}-nocheck",
                        lambda: subprocess_job(["quantc", "gptq", c, str(folder), "0"]))
    lines = [f"## The compile's held-out check against the KL measured afterwards ({title()})", "",
             f"Command: `{cmd}`  \nMachine: {machine()}. Uniform GPTQ checkpoints of the protocol (128×512 C4 "
             "calibration, bench_gptq's quantc settings; QEP α 0 is bench_gptq's row, the others bench_ablation's "
             "qep rows, the same jobs and caches). *Compile's check*: quantc.json's `check`, KL(original ‖ "
             "checkpoint) per token on the calibration.check_samples documents after the calibration's, measured "
             "inside the quantize sweep. *Same windows, saved checkpoint*: the same KL from the written files, "
             "loaded through `quantc.load` in float32. *Fresh C4* / *WikiText-2*: bench_gptq's KL check over "
             f"{KL_WINDOWS} windows each (fresh C4: the documents after the calibration's, whose first ones the "
             "check holds out). Check s: the check's two forwards per layer (inside quantize s; — where the "
             "compile predates their timing) + its head comparison at the end.", "",
             "| config | QEP α | quantize s | check s (forwards + head) | compile's check KL | same windows, saved "
             "checkpoint | relative difference | KL fresh C4 | KL WikiText-2 | ppl WikiText-2 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o, s = r["own"], r["same"]
        fwd = f"{r['forward_s']:.1f}" if r["forward_s"] is not None else "—"
        lines.append(f"| {r['config']} | {r['qep']:g} | {r['quantize_s']:.0f} | {fwd} + {r['check_s']:.2f} | "
                     f"{o['kl']:.5f} ({o['sequences']}×, {o['positions']} positions) | {s['kl']:.5f} | "
                     f"{(o['kl'] - s['kl']) / s['kl']:+.2%} | {r['kl']['c4']['kl']:.4f} | "
                     f"{r['kl']['wikitext']['kl']:.4f} | {r['ppl']:.2f} |")
    if off:
        lines += ["", "The same compile (QEP off) with `calibration.check_samples: 0`, run by this benchmark on the same "
                  "machine as the row above, one job at a time (seconds vary by a few % between runs):", "",
                  "| config | quantize s, check off | quantize s, check on (above) |", "|---|---|---|"]
        for c, q in off.items():
            on = next((r["quantize_s"] for r in rows if r["config"] == c and r["qep"] == 0), None)
            lines.append(f"| {c} | {q['quantize_s']:.0f} | {f'{on:.0f}' if on is not None else '—'} |")
    write_section(mark("bench_check"), lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
