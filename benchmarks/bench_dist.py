"""Benchmark: one process against torchrun with 2 gloo processes, on SmolLM2-135M (bench_mixed's protocol).

    python -m benchmarks.bench_dist [--procs 2] [--budget 4b] [--fresh]

A budgeted compile (measure → plan → quantize, the default fisher predictor, bench_mixed's candidates
and quantizer settings, calibration 128×512 C4) run twice in one session: `python -m quantc compile`
in one process with the machine's threads, and `torchrun --nproc-per-node N -m quantc compile` (torchrun
gives each rank one thread). Reports the wall time of each sweep (from the manifests), the bytes rank
0 sent and received in collectives per decoder layer, whether the two artifacts are byte-identical, and
the WikiText-2 perplexity of the artifact (bench_gptq's evaluation).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks.bench_gptq import WORK, subprocess_job, write_calibration_file, write_section
from benchmarks.bench_mixed import raw_config, uniform_bytes

MARK = "<!-- bench_dist -->"
FILES = ("model.safetensors", "plan.yaml", "config.json", "quantize_config.json")


def digest(folder: Path) -> dict:
    return {f: hashlib.sha256((folder / f).read_bytes()).hexdigest()[:16] for f in FILES}


def compile_run(y: Path, out: Path, procs: int, threads: int | None = None) -> dict:
    """One compile; `threads` sets OMP_NUM_THREADS (torchrun sets 1 per rank by itself)."""
    cache = WORK / f"dist-cache-{out.name}"
    import shutil
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "QUANTC_CACHE": str(cache), "PYTHONWARNINGS": "ignore"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    head = ([sys.executable, "-m", "quantc"] if procs == 1 else
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "-m", "quantc"])
    t = time.perf_counter()
    p = subprocess.run([*head, "-q", "compile", str(y), "-o", str(out)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"{procs} process(es) failed:\n{p.stderr[-3000:]}")
    m = json.loads((out / "quantc.json").read_text())
    return {"wall_s": wall, "timings": m["timings"], "distributed": m.get("distributed"), "digest": digest(out),
            "threads": str(threads or os.cpu_count()) if procs == 1 else "1 per rank"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--budget", default="4b", help="3b or 4b: the byte size of uniform 3/4-bit g128")
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    write_calibration_file()
    res_path = WORK / "dist.json"
    res = {} if args.fresh or not res_path.is_file() else json.loads(res_path.read_text())
    budget = uniform_bytes(int(args.budget.rstrip("b")))
    y = WORK / "dist-budget.yaml"
    y.write_text(yaml.safe_dump(raw_config(budget, 0.0, check=False)))   # the default measurement, no check
    runs = {"procs-1": (1, None), "procs-1-thread-1": (1, 1), f"procs-{args.procs}": (args.procs, None)}
    for key, (procs, threads) in runs.items():
        if key not in res:
            print(f"[bench] {key} ...", flush=True)
            res[key] = compile_run(y, WORK / f"dist-out-{key}", procs, threads)
            print(f"[bench] {key}: {res[key]}", flush=True)
            res_path.write_text(json.dumps(res, indent=2))
    if "eval" not in res:
        res["eval"] = subprocess_job(["eval", str(WORK / f"dist-out-procs-{args.procs}")])
        res_path.write_text(json.dumps(res, indent=2))
    write(res, args, budget, "python -m benchmarks.bench_dist " + " ".join(sys.argv[1:]))


def write(res: dict, args, budget: int, cmd: str) -> None:
    one, one1, many = res["procs-1"], res["procs-1-thread-1"], res[f"procs-{args.procs}"]
    layers = 30
    lines = ["## One process against torchrun with 2 gloo processes (SmolLM2-135M)", "",
             f"Command: `{cmd}`. A budgeted compile at the byte size of uniform {args.budget[:-1]}-bit g128 "
             f"({budget / 1e6:.1f} MB of quantized linears), default fisher predictor, bench_mixed's candidates "
             "and quantizer settings, calibration 128×512 C4; the three runs in this session, one after the "
             "other, each alone on the machine's 2 cores. torchrun gives each rank one thread.", "",
             "| run | threads per process | measure + plan s | quantize s | wall s (whole command) | rank 0 bytes/layer, sweep 1 | rank 0 bytes/layer, sweep 2 | artifact = 1 process, 1 thread? |",
             "|---|---|---|---|---|---|---|---|"]
    split = (many.get("distributed") or {}).get("held_out_streams_per_rank")
    streams = " / ".join(map(str, split)) if split else "not recorded (an older run)"
    for name, r in (("1 process", one), ("1 process", one1), (f"torchrun, {args.procs} gloo processes", many)):
        t = r["timings"]
        d = (r.get("distributed") or {}).get("rank0_bytes", {})
        mb = lambda k: f"{d[k] / layers / 2**20:.1f} MiB" if k in d else "—"   # noqa: E731
        same = "yes" if r["digest"] == one1["digest"] else "no"
        lines.append(f"| {name} | {r['threads']} | {t.get('plan_s', 0):.0f} | {t['quantize_s']:.0f} | "
                     f"{r['wall_s']:.0f} | {mb('plan')} | {mb('quantize')} | {same} |")
    lines += ["", "*artifact = …*: model.safetensors, plan.yaml, config.json and quantize_config.json byte-identical "
              "to the one-process, one-thread run's. Bit-identity holds at equal threads per process: with 2 "
              "threads, torch's CPU matmuls may round differently, and so may a plan built on them.",
              f"WikiText-2 perplexity of the {args.procs}-process artifact: {res['eval']['ppl']:.2f}.",
              "Sweep 2's bytes are dominated by gathering every rank's activations to rank 0 for the resume "
              "point after each layer; sweep 1's by broadcasting each unit's codes (one byte per weight, with "
              "their scales and zeros) at every solved option and its error terms, and by gathering every "
              "rank's held-out streams to rank 0 for the resume point. The measurement's held-out streams are "
              "split over the ranks (each carried and compared at the head by one rank), and so are the fisher "
              f"probes' backward passes: held-out streams per rank {streams}."]
    write_section(MARK, lines)


if __name__ == "__main__":
    main()
