"""Benchmark: CPU speed on a wide MLP, quantc against GPTQModel 7.6.0, side by side in one run.

    python -m benchmarks.bench_wide [--layers 4] [--samples 128] [--fresh]

A synthetic Llama-architecture model with random weights at the width of a 0.5B model (hidden 896,
intermediate 4864, 14/2 heads, head_dim 64, SmolLM2's tokenizer), written as safetensors in
benchmarks/work/ (no download). Both tools quantize it to 4-bit g128 sym from the same calibration
(the protocol's C4 windows, samples×512), each at its default options (quantc: act-order with static
groups, clipped-grid search, true-sequential, error propagation QEP α = 0.5; GPTQModel: desc_act=False),
each alone in its own process; quantc also with `qep_alpha: 0` (plain GPTQ, the like-for-like race). Reports seconds per decoder layer and where quantc's time goes: quantc's functions are
wrapped with timers in its process (Hessian accumulation, Cholesky, the column loop, the clipped-grid
search, the layer forwards and replays).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.bench_gptq import WORK, subprocess_job, write_calibration_file, write_section

MARK = "<!-- bench_wide -->"
KINDS = {"quantc": "quantc, defaults (act-order + static groups, clipped grid, true-sequential, QEP 0.5)",
         "quantc-plain": "quantc, qep_alpha: 0 (plain GPTQ)",
         "gptqmodel": "GPTQModel 7.6.0 (desc_act=False, fp16 load)"}
WIDTH = {"hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14, "num_key_value_heads": 2,
         "head_dim": 64}


def build(layers: int) -> Path:
    folder = WORK / f"wide-L{layers}"
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from benchmarks.common import prepared_model
    tok = AutoTokenizer.from_pretrained(prepared_model())
    cfg = LlamaConfig(vocab_size=len(tok), num_hidden_layers=layers, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      **WIDTH)
    torch.manual_seed(layers)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


class Timers:
    """Cumulative seconds of wrapped functions. A call nested in another of the same label (run_layer
    inside run_until) is not counted again; a call nested in another label's (Cholesky inside the GPTQ
    solve) is, and the column loop is what _gptq_stacked spends outside Cholesky and the grid search."""

    def __init__(self):
        self.s: dict[str, float] = {}
        self.depth: dict[str, int] = {}

    def wrap(self, owner, name: str, label: str):
        fn = getattr(owner, name)

        def timed(*a, **k):
            self.depth[label] = self.depth.get(label, 0) + 1
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.depth[label] -= 1
                if self.depth[label] == 0:
                    self.s[label] = self.s.get(label, 0.0) + time.perf_counter() - t
        setattr(owner, name, timed)


def job_quantc(folder: str, samples: int, qep: float | None = None) -> dict:
    import quantc.gptq as g
    import quantc.passes.quantize as q
    from quantc.calibration.hessian import Hessian
    from quantc.config import parse_config
    from quantc.pipeline import compile_model
    timers = Timers()
    timers.wrap(Hessian, "add", "hessians")
    timers.wrap(g, "cholesky_inverse_upper", "cholesky")
    timers.wrap(g, "find_params", "grid search")
    timers.wrap(g, "_gptq_stacked", "gptq")
    timers.wrap(q, "run_until", "forwards")
    timers.wrap(q, "run_layer", "forwards")
    timers.wrap(q, "reference_inputs", "forwards")
    timers.wrap(q, "qep_target", "qep target")
    quant = {"bits": 4, "group_size": 128, "sym": True, **({} if qep is None else {"qep_alpha": qep})}
    raw = {"model": folder, "quant": quant,
           "calibration": {"source": str(WORK / "c4-calib.jsonl"), "samples": samples, "seq_len": 512, "seed": 0}}
    t = time.perf_counter()
    m = compile_model(parse_config(raw, "bench"), Path(folder + "-quantc"), force=True, progress=False)
    s = timers.s
    parts = {"hessians": s.get("hessians", 0), "cholesky": s.get("cholesky", 0),
             "clipped-grid search": s.get("grid search", 0),
             "column loop": s.get("gptq", 0) - s.get("cholesky", 0) - s.get("grid search", 0),
             "forwards and replays": s.get("forwards", 0), "QEP targets": s.get("qep target", 0)}
    parts["other"] = m["timings"]["quantize_s"] - sum(parts.values())
    return {"quantize_s": m["timings"]["quantize_s"], "load_s": m["timings"]["load_s"],
            "total_s": time.perf_counter() - t, "parts": parts}


def job_gptqmodel(folder: str, samples: int) -> dict:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import AutoTokenizer
    from benchmarks.common import calibration
    tok = AutoTokenizer.from_pretrained(folder)
    cal = calibration(tok, samples, 512, 0)
    data = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in cal]
    t = time.perf_counter()
    m = GPTQModel.load(folder, QuantizeConfig(bits=4, group_size=128, sym=True, desc_act=False), dtype=torch.float16)
    load_s = time.perf_counter() - t
    m.quantize(data, batch_size=1)
    quant_s = time.perf_counter() - t - load_s
    m.save(folder + "-gptqmodel")
    return {"quantize_s": quant_s, "load_s": load_s, "total_s": time.perf_counter() - t}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", nargs=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    if args.job:
        kind, folder, samples = args.job
        res = job_gptqmodel(folder, int(samples)) if kind == "gptqmodel" else \
            job_quantc(folder, int(samples), 0.0 if kind == "quantc-plain" else None)
        print("RESULT " + json.dumps(res), flush=True)
        return
    WORK.mkdir(parents=True, exist_ok=True)
    write_calibration_file()
    folder = build(args.layers)
    res_path = WORK / f"wide-L{args.layers}-{args.samples}.json"
    res = {} if args.fresh or not res_path.is_file() else json.loads(res_path.read_text())
    for kind in KINDS:
        if kind not in res:
            print(f"[bench] {kind} ...", flush=True)
            res[kind] = subprocess_job([kind, str(folder), str(args.samples)], module="benchmarks.bench_wide")
            res[kind]["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            print(f"[bench] {kind}: {res[kind]}", flush=True)
            res_path.write_text(json.dumps(res, indent=2))
    write(res, args, "python -m benchmarks.bench_wide " + " ".join(sys.argv[1:]))


def write(res: dict, args, cmd: str) -> None:
    n = args.layers
    gm = res["gptqmodel"]
    lines = ["## CPU speed on a wide MLP: quantc against GPTQModel 7.6.0 (synthetic, 0.5B width)", "",
             f"Command: `{cmd}`. Random-weight Llama model, hidden 896, intermediate 4864, 14/2 heads, {n} layers; "
             f"4-bit g128 sym from the same {args.samples}×512 C4 calibration windows; each tool at its default "
             "options, and quantc also without error propagation; each alone in its own process (*finished*: when "
             "its job ended; jobs are cached in benchmarks/work/, `--fresh` runs all in one run). "
             "*quantize s* excludes loading the model.", "",
             "| tool | quantize s | s per layer | vs GPTQModel | finished |", "|---|---|---|---|---|"]
    for kind in KINDS:
        r = res[kind]
        lines.append(f"| {KINDS[kind]} | {r['quantize_s']:.0f} | {r['quantize_s'] / n:.1f} | "
                     f"{r['quantize_s'] / gm['quantize_s']:.2f}× | {r.get('finished', 'an earlier session')} |")
    lines += ["", "Where quantc's time goes (seconds over the whole sweep, from timers wrapped around its functions):",
              "", "| part | " + " | ".join(f"{KINDS[k].split(' (')[0]} s | share" for k in KINDS if k != "gptqmodel")
              + " |", "|---|" + "---|---|" * (len(KINDS) - 1)]
    quantcs = [res[k] for k in KINDS if k != "gptqmodel"]
    for part in quantcs[0]["parts"]:
        lines.append(f"| {part} | " + " | ".join(f"{r['parts'].get(part, 0):.1f} | "
                                                 f"{100 * r['parts'].get(part, 0) / r['quantize_s']:.0f}%"
                                                 for r in quantcs) + " |")
    write_section(MARK, lines)


if __name__ == "__main__":
    main()
