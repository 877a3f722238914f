"""Benchmark: the cost of sweep 1 (the measurement) against the number of decoder layers.

    python -m benchmarks.bench_scale [--layers 4,8,16] [--fresh]

Synthetic Llama models with random weights (hidden 512, intermediate 1536, 8/4 heads, SmolLM2's
tokenizer and vocabulary), written as safetensors in benchmarks/work/ (no download). For each depth:
the measurement of today's code at git revision BASE (run from a worktree of it), the streaming
`fisher` predictor (the default; also with the candidates at quantc's quant defaults, what a budgeted
`quantc compile` measures) and the streaming `exact` predictor, and one uniform 4-bit compile
(quantize sweep) for scale. Candidates 2-bit asym / 3 / 4 / 8 g128; 32×256 C4 calibration tokens
for the Hessians, 4×256 held out. Each job runs alone in its own process. Writes RESULTS.md's section
with the growth exponent of each (slope of log time against log layers) and a PNG.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = "6cc14cd"                      # main before the streaming measurement
MARK = "<!-- bench_scale -->"
CANDIDATES = [{"bits": 2, "sym": False}, {"bits": 3}, {"bits": 4}, {"bits": 8}]


def raw(folder: Path, calib: Path, predictor: str | None) -> dict:
    r = {"model": str(folder), "quant": {"group_size": 128, "act_order": False, "qep_alpha": 0.0}, "candidates": CANDIDATES,
         "budget": {"avg_bits": 3.5},
         "calibration": {"source": str(calib), "samples": 36, "seq_len": 256, "seed": 0},
         "plan": {"measure_samples": 32, "alpha_samples": 4, "alpha_seq_len": 256}}
    if predictor:                     # today's code has no plan.predictor key
        r["plan"]["predictor"] = predictor
    return r


def job(kind: str, folder: str, calib: str, predictor: str) -> dict:
    """Runs with quantc from PYTHONPATH (this checkout, or BASE's worktree)."""
    import resource
    import torch
    from quantc.calibration import calibration_tokens
    from quantc.config import parse_config
    from quantc.model import load_model, load_tokenizer
    torch.manual_seed(0)
    if kind == "compile":
        from quantc.pipeline import compile_model
        r = {**raw(Path(folder), Path(calib), None), "budget": {}, "candidates": [{"bits": 4}]}
        if predictor == "compile-defaults":     # quantc's own quant defaults (act-order, clipped grid, QEP)
            r["quant"] = {"group_size": 128}
        cfg = parse_config(r)
        t = time.perf_counter()
        m = compile_model(cfg, Path(folder).parent / f"{Path(folder).name}-q4", force=True, progress=False)
        return {"seconds": time.perf_counter() - t, "quantize_s": m["timings"]["quantize_s"],
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    from quantc.planning import get_measurements
    r = raw(Path(folder), Path(calib), None if predictor == "today" else predictor.removesuffix("-defaults"))
    if predictor.endswith("-defaults"):         # the candidates at quantc's quant defaults (act-order + static
        r["quant"] = {"group_size": 128}        # groups, clipped grid): the measurement `quantc compile` runs
    cfg = parse_config(r)
    model = load_model(cfg.model)
    tokens = calibration_tokens(cfg.calibration, load_tokenizer(cfg.model))
    t = time.perf_counter()
    ms, cached = get_measurements(cfg, model, tokens, progress=False)
    assert not cached
    return {"seconds": time.perf_counter() - t,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def build(layers: int, work: Path) -> Path:
    folder = work / f"synth-L{layers}"
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from benchmarks.common import prepared_model
    tok = AutoTokenizer.from_pretrained(prepared_model())
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(layers)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def run(kind: str, folder: Path, calib: Path, variant: str, src: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "QUANTC_CACHE": str(folder.parent / f"cache-{variant}")}
    import shutil
    shutil.rmtree(env["QUANTC_CACHE"], ignore_errors=True)
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--job", kind, str(folder), str(calib),
                        variant], cwd=src, env=env, capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{kind} {variant} {folder.name} failed:\n{p.stderr[-3000:]}")


def slope(xs, ys) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", nargs=4)
    ap.add_argument("--layers", default="4,8,16")
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    if args.job:
        print("RESULT " + json.dumps(job(*args.job)), flush=True)
        return
    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_gptq import WORK, write_calibration_file, write_section
    WORK.mkdir(parents=True, exist_ok=True)
    write_calibration_file()
    calib = WORK / "c4-calib.jsonl"
    base = WORK / f"base-{BASE}"
    if not base.is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(base), BASE], cwd=ROOT, check=True)
    res_path = WORK / "scale.json"
    res = {} if args.fresh or not res_path.is_file() else json.loads(res_path.read_text())
    depths = [int(x) for x in args.layers.split(",")]
    for n in depths:
        folder = build(n, WORK)
        for variant, src in (("compile", ROOT), ("compile-defaults", ROOT), ("today", base), ("fisher", ROOT),
                             ("exact", ROOT), ("fisher-defaults", ROOT)):
            key = f"{n}-{variant}"
            if key not in res:
                print(f"[bench] {key} ...", flush=True)
                res[key] = run("compile" if variant.startswith("compile") else "measure", folder, calib, variant, src)
                print(f"[bench] {key}: {res[key]}", flush=True)
                res_path.write_text(json.dumps(res, indent=2))
    write(res, depths, "python -m benchmarks.bench_scale " + " ".join(sys.argv[1:]), write_section)


def write(res, depths, cmd, write_section) -> None:
    names = {"today": f"today's code ({BASE})", "fisher": "fisher (default)", "exact": "exact (streaming)",
             "fisher-defaults": "fisher at defaults"}
    lines = [MARK, "## Measurement cost against depth (synthetic Llama, hidden 512)", "",
             f"Command: `{cmd}`. Random-weight Llama models (hidden 512, intermediate 1536, 8/4 heads, SmolLM2's "
             "49,152-token vocabulary) with 4, 8 and 16 layers; candidates 2-bit asym / 3 / 4 / 8, g128; Hessians "
             "from 32×256 C4 tokens, ΔKL on 4×256 held-out tokens. Every job ran alone in its own process, "
             "in one run. *uniform compile* = one uniform 4-bit g128 compile of the same model (36×256 "
             "calibration) with the measurement's GPTQ settings (no act-order, QEP off); *at "
             "defaults* = the same compile at quantc's quant defaults (act-order + static groups, clipped grid, "
             "QEP α 0.5), what `quantc compile` runs without a budget. The measurements run with the compile's "
             "GPTQ settings (no act-order), except *fisher at defaults*: the same candidates at quantc's quant "
             "defaults (act-order + static groups, clipped grid), the measurement a budgeted `quantc compile` runs "
             "before such a compile. The fisher columns run without the uniform-plan check (`plan.check_uniform`, "
             "off by default).", "",
             "| layers | uniform compile s | at defaults s | " + " | ".join(f"{names[v]} s" for v in names)
             + " | fisher / compile | fisher at defaults / at defaults | today / compile |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n in depths:
        c, d = res[f"{n}-compile"]["seconds"], res[f"{n}-compile-defaults"]["seconds"]
        f, fd = res[f"{n}-fisher"]["seconds"], res[f"{n}-fisher-defaults"]["seconds"]
        lines.append(f"| {n} | {c:.0f} | {d:.0f} | " + " | ".join(f"{res[f'{n}-{v}']['seconds']:.0f}" for v in names)
                     + f" | {f / c:.2f}× | {fd / d:.2f}× | {res[f'{n}-today']['seconds'] / c:.2f}× |")
    labels = {"compile": "uniform compile", "compile-defaults": "at defaults", **names}
    lines += ["", "Growth exponent (slope of log seconds against log layers; 1 = linear, 2 = quadratic): "
              + ", ".join(f"{label} {slope(depths, [res[f'{n}-{v}']['seconds'] for n in depths]):.2f}"
                          for v, label in labels.items()) + "."]
    png = _plot(res, depths, names)
    lines += ["", f"![measurement time against layers]({png})"]
    write_section(MARK, lines[1:])


def _plot(res, depths, names) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from benchmarks.common import save_plot
    out = ROOT / "benchmarks" / "plots" / "measure_vs_layers.png"
    fig, ax = plt.subplots(figsize=(6, 4))
    for v, label in [("compile", "uniform 4-bit compile"), ("compile-defaults", "uniform 4-bit compile, defaults"),
                     *names.items()]:
        ax.plot(depths, [res[f"{n}-{v}"]["seconds"] for n in depths], "o-", label=label)
    ax.set_xscale("log", base=2)
    save_plot(fig, ax, out, "decoder layers", "seconds")
    return "plots/measure_vs_layers.png"


if __name__ == "__main__":
    main()
