"""Benchmark: peak RSS of a budgeted compile at Llama-3-8B's width, against the number of layers.

    python -m benchmarks.bench_memory_8b [--layers 2,6] [--fresh]

Synthetic Llama-architecture models with random weights at Llama-3-8B's width (hidden 4096,
intermediate 14336, 32/8 heads, head_dim 128; SmolLM2's 49,152-token vocabulary, untied head),
written as safetensors in benchmarks/work/ (no download). Each compile runs alone in its own process
(peak RSS = its ru_maxrss): calibration 16×512 C4 tokens, a budget between 4 and 8 bits, so that
sweep 1 (the measurement) and sweep 2 both run. Reduced settings, for time on 2 cores: candidates
4-bit and 8-bit g128 only; measurement on 4 sequences, 1×128 held-out tokens, 1 probe; GPTQ without
act-order and without the clipped-grid search (neither changes what is held in memory).

The bound it is compared with: one decoder layer in fp32, plus the embeddings and the head, plus the
activations, the Hessians and the runtime floor (a process with the libraries imported and the
model's skeleton on the meta device), each from the model's shapes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.bench_gptq import WORK, peak_rss_mb, subprocess_job, write_calibration_file, write_section

MARK = "<!-- bench_memory_8b -->"
WIDTH = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
         "head_dim": 128}
SAMPLES, SEQ = 16, 512


def folder_for(layers: int) -> Path:
    return WORK / f"w8b-L{layers}"


def job_build(layers: str) -> dict:
    """Written one tensor at a time from a meta skeleton, so building needs no more than one layer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from benchmarks.common import prepared_model
    folder = folder_for(int(layers))
    tok = AutoTokenizer.from_pretrained(prepared_model())
    cfg = LlamaConfig(vocab_size=len(tok), num_hidden_layers=int(layers), max_position_embeddings=4096,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      **WIDTH)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(int(layers))
    shards, index = [], {}
    groups: dict[str, dict] = {}
    for name, p in skeleton.state_dict().items():
        part = name.split(".")[2] if name.startswith("model.layers.") else "outside"
        t = (torch.randn(p.shape, generator=g) * 0.02) if p.dim() == 2 else torch.ones(p.shape)
        groups.setdefault(part, {})[name] = t
        if part != "outside" and len(groups[part]) == sum(1 for n in skeleton.state_dict() if n.startswith(f"model.layers.{part}.")):
            fname = f"model-layer-{part}.safetensors"
            save_file(groups.pop(part), str(folder / fname), metadata={"format": "pt"})
            shards.append(fname)
            index.update({n: fname for n in skeleton.state_dict() if n.startswith(f"model.layers.{part}.")})
    save_file(groups.pop("outside"), str(folder / "model-outside.safetensors"), metadata={"format": "pt"})
    index.update({n: "model-outside.safetensors" for n in skeleton.state_dict() if not n.startswith("model.layers.")})
    total = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                       "weight_map": index}))
    cfg.save_pretrained(folder)
    tok.save_pretrained(folder)
    return {"bytes": total}


def raw(layers: int) -> dict:
    return {"model": str(folder_for(layers)),
            "quant": {"group_size": 128, "act_order": False, "mse": False, "qep_alpha": 0.0},
            "candidates": [{"bits": 4}, {"bits": 8}],
            "budget": {"avg_bits": 5.0},
            "plan": {"measure_samples": 4, "alpha_samples": 1, "alpha_seq_len": 128, "probes": 1},
            "calibration": {"source": str(WORK / "c4-calib.jsonl"), "samples": SAMPLES, "seq_len": SEQ, "seed": 0}}


def job_compile(layers: str) -> dict:
    import os
    from quantc.config import parse_config
    from quantc.memory import memory_estimate
    from quantc.pipeline import compile_model
    os.environ["QUANTC_CACHE"] = str(WORK / f"w8b-cache-{layers}")
    import shutil
    shutil.rmtree(os.environ["QUANTC_CACHE"], ignore_errors=True)
    cfg = parse_config(raw(int(layers)), "bench")
    t = time.perf_counter()
    m = compile_model(cfg, WORK / f"w8b-L{layers}-out", force=True, progress=False)
    return {"seconds": time.perf_counter() - t, "timings": m["timings"], "estimate": memory_estimate(cfg),
            "avg_bits": m["totals"]["avg_bits"], "peak_rss_mb": peak_rss_mb()}


def estimate(layers: int) -> dict:
    from quantc.config import parse_config
    from quantc.memory import memory_estimate
    return memory_estimate(parse_config(raw(layers), "bench"))


def job_floor(layers: str) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    import quantc.pipeline  # noqa: F401
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder_for(int(layers))))
    return {"peak_rss_mb": peak_rss_mb()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", nargs=2)
    ap.add_argument("--layers", default="2,6")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--note", help="a line on the run's conditions (e.g. another job shared the cores), kept "
                                   "with the results")
    args = ap.parse_args()
    if args.job:
        kind, layers = args.job
        fn = {"build": job_build, "compile": job_compile, "floor": job_floor}[kind]
        print("RESULT " + json.dumps(fn(layers)), flush=True)
        return
    WORK.mkdir(parents=True, exist_ok=True)
    write_calibration_file()
    res_path = WORK / "memory-8b.json"
    res = {} if args.fresh or not res_path.is_file() else json.loads(res_path.read_text())
    depths = [int(x) for x in args.layers.split(",")]
    if args.note:
        res["note"] = args.note
        res_path.write_text(json.dumps(res, indent=2))
    job = lambda *a: subprocess_job(list(a), "benchmarks.bench_memory_8b")   # noqa: E731
    for n in depths:
        if not (folder_for(n) / "config.json").is_file():
            print(f"[bench] building {n} layers ...", flush=True)
            job("build", str(n))
        for kind in ("floor", "compile"):
            key = f"{n}-{kind}"
            if key not in res:
                print(f"[bench] {key} ...", flush=True)
                res[key] = job(kind, str(n))
                print(f"[bench] {key}: {res[key]}", flush=True)
                res_path.write_text(json.dumps(res, indent=2))
    write(res, depths, "python -m benchmarks.bench_memory_8b " + " ".join(sys.argv[1:]))


def bound_mib(floor_mb: float) -> dict:
    """One layer in fp32 + embeddings and head + activations + Hessians + the floor, from the shapes."""
    h, i, kv, vocab = 4096, 14336, 8 * 128, 49152
    layer = 4 * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h)
    outside = 4 * (2 * vocab * h + h)
    acts = 4 * SAMPLES * SEQ * h * 4                 # x̂ in/out and the cached attention/MLP inputs
    hess = 8 * (3 * h * h + i * i) + 4 * i * i       # sweep 1: every group's float64 sums, then float32 H
    parts = {"layer": layer, "embeddings + head": outside, "activations": acts, "Hessians": hess}
    return {k: v / 2**20 for k, v in parts.items()} | {"floor": floor_mb,
                                                      "total": sum(parts.values()) / 2**20 + floor_mb}


def write(res: dict, depths: list[int], cmd: str) -> None:
    lines = ["## Peak memory at Llama-3-8B's width (synthetic, CPU)", "",
             f"Command: `{cmd}`. Random-weight Llama models at Llama-3-8B's width (hidden 4096, intermediate "
             "14336, 32/8 heads; SmolLM2's 49,152-token vocabulary, untied head). A budgeted compile (avg_bits 5.0: "
             "measure, plan, quantize, export) with calibration 16×512 C4 tokens; reduced settings for time (QEP off): "
             "candidates 4/8-bit g128, measurement on 4 sequences with 1×128 held-out tokens and 1 probe, GPTQ "
             "without act-order or the clipped grid. Each run alone in its own process; peak RSS = ru_maxrss.", "",
             "| layers | fp32 weights on disk GiB | peak RSS GiB | printed estimate GiB | bound GiB (see below) | floor GiB | compile s |",
             "|---|---|---|---|---|---|---|"]
    peaks = {}
    before = WORK / "memory-8b-before.json"      # the same benchmark with older code, kept for comparison
    old = json.loads(before.read_text()) if before.is_file() else {}
    for label, r in (("this code", res), (f"older code: {old.get('code', '?')}", old)):
        for n in depths:
            if f"{n}-compile" not in r:
                continue
            c, f = r[f"{n}-compile"], r[f"{n}-floor"]
            disk = sum(p.stat().st_size for p in folder_for(n).glob("*.safetensors")) / 2**30
            b = bound_mib(f["peak_rss_mb"])
            est = c["estimate"]["total"]
            if r is res:
                peaks[n] = c["peak_rss_mb"]
                est = estimate(n)["total"]           # this code's estimate (a function of the shapes)
            lines.append(f"| {n} ({label}) | {disk:.2f} | {c['peak_rss_mb'] / 1024:.2f} | "
                         f"{est / 2**30:.2f} | {b['total'] / 1024:.2f} | "
                         f"{f['peak_rss_mb'] / 1024:.2f} | {c['seconds']:.0f} |")
    b = bound_mib(res[f"{depths[0]}-floor"]["peak_rss_mb"])
    lo, hi = min(depths), max(depths)
    lines += ["", f"Peak at {hi} layers / peak at {lo} layers: **{peaks[hi] / peaks[lo]:.3f}** (goal: within 10%). "
              "Bound = " + " + ".join(f"{k} {v / 1024:.2f}" for k, v in b.items() if k != "total")
              + f" = {b['total'] / 1024:.2f} GiB."]
    if res.get("note"):
        lines += ["", f"Conditions of this run: {res['note']}"]
    lines += per_layer_estimate(res, lo, hi)
    write_section(MARK, lines)


def layer_work(h: int, i: int, heads: int, kv: int, hd: int = 128) -> tuple[float, float]:
    """(GPTQ column work Σ rows·cols², forward work Σ rows·cols) of one Llama decoder layer: what the
    solves and the layer forwards/Hessians of a compile grow with."""
    shapes = [(heads * hd, h), (kv * hd, h), (kv * hd, h), (h, heads * hd), (i, h), (i, h), (h, i)]   # (out, in)
    return sum(o * k * k for o, k in shapes), sum(o * k for o, k in shapes)


def per_layer_estimate(res: dict, lo: int, hi: int) -> list[str]:
    """Seconds per decoder layer from the two depths ((t_hi − t_lo) / (hi − lo): the fixed costs
    cancel), and a paper estimate for whole models on this CPU at these reduced settings."""
    per = {k: (res[f"{hi}-compile"]["timings"].get(k, 0) - res[f"{lo}-compile"]["timings"].get(k, 0)) / (hi - lo)
           for k in ("plan_s", "quantize_s")}
    g8, f8 = layer_work(4096, 14336, 32, 8)
    g70, f70 = layer_work(8192, 28672, 64, 8)
    total = per["plan_s"] + per["quantize_s"]
    rows = [("Llama-3-8B (32 layers)", 32, 1.0, 1.0), ("Llama-3-70B (80 layers)", 80, g70 / g8, f70 / f8)]
    out = ["", f"Per decoder layer at this width, from the two depths: measurement (sweep 1) {per['plan_s']:.0f} s, "
           f"quantize (sweep 2) {per['quantize_s']:.0f} s. Paper estimate on this 2-core CPU at these reduced "
           "settings (not measured; a 70B layer costs between its forward-work ratio and its GPTQ-work ratio "
           "to an 8B layer):", "",
           "| model | layers | work per layer vs 8B (forward … GPTQ) | estimated compile hours |", "|---|---|---|---|"]
    for name, n, g, f in rows:
        lo_h, hi_h = n * total * min(f, g) / 3600, n * total * max(f, g) / 3600
        out.append(f"| {name} | {n} | {f:.1f}× … {g:.1f}× | {lo_h:.1f}" + ("" if g == f else f" … {hi_h:.1f}") + " |")
    return out


if __name__ == "__main__":
    main()
