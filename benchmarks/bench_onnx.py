"""Benchmark: quantc's ONNX export in ONNX Runtime (CPU) on SmolLM2-135M.

    python -m benchmarks.bench_onnx [--prepare] [--fresh]

Needs quantc[ort] and `onnx-ir` (ONNX Runtime's MatMulNBitsQuantizer imports it; onnxruntime does not
declare it).

Run after `python -m benchmarks.bench_mixed` and `bench_ablation` (the uniform 4-bit GPTQ checkpoints,
with QEP off and at quantc's defaults, and bench_mixed's wide + QEP plans are exported here; missing ones
are skipped, or with `--prepare` compiled first by those benchmarks' own jobs, under their own cache names,
so they reuse them). In the same run, on the same graph builder and machine:
- fp32: the original model exported with plain MatMul;
- ORT RTN: that fp32 graph quantized by ONNX Runtime's own `MatMulNBitsQuantizer` (4-bit, block 128,
  symmetric and asymmetric);
- quantc: the GPTQ checkpoints exported with `quantc export onnx` (MatMulNBits, checkpoint integers);
- logit parity against quantc's torch runtime for a uniform and a mixed 2/4/8-bit checkpoint.
Latency: batch 1, ONNX Runtime CPU with 2 intra-op threads; prefill of 512 tokens (median of 5 after a
warm-up); decode = 64 greedy steps after a 128-token prompt (median of 3), in tokens/s. Perplexity:
WikiText-2, first 80 windows of 512 tokens (the protocol of bench_gptq), evaluated by ONNX Runtime.
"""
from __future__ import annotations

import argparse
import json
import statistics
import shlex
import sys
import time
from pathlib import Path

from benchmarks.bench_gptq import WORK, cached, run_uniform, subprocess_job, uniform_job, write_section
from benchmarks.bench_mixed import checkpoint_name
from benchmarks.common import prepared_model, wikitext

MARK = "<!-- bench_onnx -->"
THREADS = 2
# bench_gptq's and bench_ablation's uniform checkpoints and bench_mixed's wide + QEP plans (their folders
# in benchmarks/work/, named by those benchmarks' own helpers), with each row's label
PLAN = ("wide", "fisher", 0.5)                      # bench_mixed's variant, predictor and QEP α
PLAN_BUDGETS = {"4b": "budget = uniform 4-bit size", "3.5b": "budget ≈3.5 bits/weight", "3b": "budget = uniform 3-bit size"}


def _plan_name(b: str) -> str:
    v, p, qep = PLAN
    return checkpoint_name(v, p, b, qep)[1].name


CHECKPOINTS = ((uniform_job("4b")["folder"].name, "quantc GPTQ 4-bit g128 sym, QEP off"),
               (uniform_job("4b", 0.5)["folder"].name, "quantc GPTQ 4-bit g128 sym, QEP 0.5 (quantc's defaults)"),
               *((_plan_name(b), f"quantc mixed, wide candidates + QEP 0.5 ({what})") for b, what in PLAN_BUDGETS.items()))
WIDENED = (_plan_name("3b"),)                       # its 2-bit units also in the 4-bit container
PARITY_PLAN = _plan_name("3.5b")
UNIFORM = CHECKPOINTS[0][0]                         # QEP off: the int8-activation and parity rows


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx")) / 1e6


def job_export(kind: str, src: str, out: str) -> dict:
    """kind: fp32 | quantc (export_onnx of a folder) | ort-rtn-sym / ort-rtn-asym (MatMulNBitsQuantizer
    on the fp32 graph at `src`)."""
    import shutil
    t = time.perf_counter()
    acc = 4 if kind.endswith("-acc4") else 0        # accuracy_level 4: int8 activations in MatMulNBits
    widen = kind.endswith("-w2")                     # 2-bit layers in the 4-bit container
    kind = kind.removesuffix("-acc4").removesuffix("-w2")
    if kind in ("fp32", "quantc"):
        from quantc.export.onnx import export_onnx
        export_onnx(src, out, force=True, accuracy_level=acc, widen_2bit=widen)
    else:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
        model = onnx.load(str(Path(src) / "model.onnx"))
        q = MatMulNBitsQuantizer(model, bits=4, block_size=128, is_symmetric=kind.endswith("-sym"),
                                 accuracy_level=acc or None)
        q.process()
        o = Path(out)
        shutil.rmtree(o, ignore_errors=True)
        o.mkdir(parents=True)
        q.model.save_model_to_file(str(o / "model.onnx"), use_external_data_format=True)
        for f in Path(src).iterdir():
            if not f.name.startswith("model.onnx"):
                shutil.copy(f, o / f.name)
        data = [p for p in o.iterdir() if p.name.startswith("model.onnx") and p.name != "model.onnx"]
        assert data, "external data file not written"
    return {"export_s": time.perf_counter() - t, "mb": folder_mb(Path(out))}


def job_measure(folder: str) -> dict:
    """Perplexity (80×512 WikiText-2), prefill latency (512 tokens) and decode tokens/s, batch 1."""
    import numpy as np
    from quantc.model import load_tokenizer
    from quantc.ort import OrtModel, evaluate_onnx
    om = OrtModel(folder, providers=["CPUExecutionProvider"], threads=THREADS)
    tok = load_tokenizer(str(prepared_model()))
    tokens = wikitext(tok, 512, 80).numpy()
    res = evaluate_onnx(om, tokens, progress=False)
    x = tokens[1:2]
    om.forward(x)
    pre = []
    for _ in range(5):
        t = time.perf_counter()
        om.forward(x)
        pre.append(time.perf_counter() - t)
    dec = []
    prompt = tokens[2:3, :128]
    for _ in range(3):
        logits, past = om.forward(prompt)
        tok_id, n = int(logits[0, -1].argmax()), 128
        t = time.perf_counter()
        for _ in range(64):
            logits, past = om.forward(np.array([[tok_id]]), past, n)
            tok_id, n = int(logits[0, -1].argmax()), n + 1
        dec.append(64 / (time.perf_counter() - t))
    res.update({"prefill_ms": 1000 * statistics.median(pre), "decode_tok_s": statistics.median(dec)})
    return res


def job_parity(artifact: str, onnx_dir: str) -> dict:
    """ONNX Runtime against quantc.load on the same artifact: logits on 4 windows of 512 tokens, and
    32 greedy tokens from a prompt."""
    import numpy as np
    import torch
    import quantc
    from quantc.model import load_tokenizer
    from quantc.ort import OrtModel, generate_torch
    om = OrtModel(onnx_dir, providers=["CPUExecutionProvider"], threads=THREADS)
    q = quantc.load(artifact)
    tok = load_tokenizer(str(prepared_model()))
    tokens = wikitext(tok, 512, 4).numpy()
    max_rel, norm_rel = 0.0, 0.0
    for row in tokens:
        lo, _ = om.forward(row[None])
        with torch.no_grad():
            lt = q(input_ids=torch.tensor(row[None])).logits.numpy()
        max_rel = max(max_rel, float(np.abs(lo - lt).max() / np.abs(lt).max()))
        norm_rel = max(norm_rel, float(np.linalg.norm(lo - lt) / np.linalg.norm(lt)))
    prompt = tok("The history of the city begins", add_special_tokens=False)["input_ids"]
    a, b = om.generate(prompt, 32), generate_torch(q, prompt, 32)
    bits = sorted({m["bits"] for m in json.loads((Path(onnx_dir) / "onnx_export.json").read_text())["matmulnbits"].values()})
    return {"max_abs_rel": max_rel, "norm_rel": norm_rel, "same_tokens": a == b, "n_tokens": len(a),
            "text": tok.decode(a), "container_bits": bits}


def mixed_248(out: Path) -> dict:
    """A mixed 2/4/8-bit checkpoint for the parity check (RTN: seconds; parity does not need GPTQ)."""
    from quantc.config import parse_config
    from quantc.pipeline import compile_model
    raw = {"model": str(prepared_model()), "quant": {"bits": 4, "group_size": 128, "method": "rtn"},
           "overrides": [{"match": r"layers\.([0-9]|1[0-4])\.self_attn\.(q|k|v)_proj", "bits": 2, "sym": False},
                         {"match": r"mlp\.down_proj", "bits": 8}]}
    compile_model(parse_config(raw, "bench"), out, force=True, progress=False)
    return {"ok": True}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", nargs=argparse.REMAINDER)
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--prepare", action="store_true", help="compile the missing checkpoints first")
    args = ap.parse_args()
    if args.job:
        kind, rest = args.job[0], args.job[1:]
        res = {"export": lambda: job_export(*rest), "measure": lambda: job_measure(*rest),
               "parity": lambda: job_parity(*rest), "mixed248": lambda: mixed_248(Path(rest[0]))}[kind]()
        print("RESULT " + json.dumps(res), flush=True)
        return
    WORK.mkdir(parents=True, exist_ok=True)
    if args.fresh:
        for p in WORK.glob("onnx-*.json"):
            p.unlink()
    if args.prepare:
        prepare()
    job = lambda *a: subprocess_job(list(a), "benchmarks.bench_onnx")   # noqa: E731
    od = WORK / "onnx"
    fp = od / "fp32"
    rows = [("fp32 (MatMul)", "fp32", "fp32", str(prepared_model()), fp),
            ("ORT MatMulNBitsQuantizer RTN 4-bit block 128 sym", "ort-rtn-sym", "ort-rtn-sym", str(fp), od / "ort-rtn-sym"),
            ("ORT MatMulNBitsQuantizer RTN 4-bit block 128 asym", "ort-rtn-asym", "ort-rtn-asym", str(fp), od / "ort-rtn-asym")]
    for name, label in CHECKPOINTS:
        if (WORK / name / "config.json").is_file():
            rows.append((label, name, "quantc", str(WORK / name), od / name))
    for name in WIDENED:                    # ONNX Runtime's 2-bit CPU path is slow: widened
        if (WORK / name / "config.json").is_file():
            rows.append((f"{dict(CHECKPOINTS)[name]}, 2-bit in 4-bit container",
                         f"{name}-w2", "quantc-w2", str(WORK / name), od / f"{name}-w2"))
    if (WORK / UNIFORM / "config.json").is_file():      # int8-activation compute, both 4-bit models
        rows += [("ORT MatMulNBitsQuantizer RTN 4-bit block 128 sym, accuracy_level 4", "ort-rtn-sym-acc4",
                  "ort-rtn-sym-acc4", str(fp), od / "ort-rtn-sym-acc4"),
                 ("quantc GPTQ 4-bit g128 sym, accuracy_level 4", f"{UNIFORM}-acc4", "quantc-acc4",
                  str(WORK / UNIFORM), od / f"{UNIFORM}-acc4")]
    cmd = "python -m benchmarks.bench_onnx " + shlex.join(sys.argv[1:])
    results = []
    for label, key, kind, src, out in rows:
        e = cached(f"onnx-{key}-export", lambda: job("export", kind, src, str(out)))
        m = cached(f"onnx-{key}-measure", lambda: job("measure", str(out)))
        results.append((label, e, m))
    parity = []
    m248 = WORK / "rtn-mixed-248"
    cached("onnx-mixed248-compile", lambda: job("mixed248", str(m248)))
    cached("onnx-mixed248-export", lambda: job("export", "quantc", str(m248), str(od / "rtn-mixed-248")))
    for name, label in ((UNIFORM, "uniform 4-bit GPTQ"), ("rtn-mixed-248", "mixed 2/4/8-bit RTN"),
                        (PARITY_PLAN, "mixed GPTQ plan, wide + QEP (≈3.5 bits)")):
        if (od / name / "model.onnx").is_file():
            parity.append((label, cached(f"onnx-parity-{name}", lambda: job("parity", str(WORK / name), str(od / name)))))
    write(results, parity, cmd)


def prepare() -> None:
    """Compile the missing CHECKPOINTS with the jobs of the benchmarks that own them (bench_gptq's and
    bench_ablation's uniform references; bench_mixed's measurement, then its wide + QEP plans)."""
    from benchmarks import bench_mixed as bm
    bm.write_calibration_file()
    run_uniform("4b")
    run_uniform("4b", 0.5)
    v, p, qep = PLAN
    sizes = bm.budget_sizes()
    budgets = {b: sizes[b] for b in ("3b", "3.5b", "4b")}     # bench_mixed's SmolLM2 budgets: the same plan job
    plans = bm.run_plan(v, p, budgets)["plans"]
    for b in PLAN_BUDGETS:
        if "infeasible" not in plans[b]:
            bm.run_compile(v, p, b, qep, budgets[b])


def write(results, parity, cmd) -> None:
    lines = [MARK, "## ONNX Runtime (CPU): quantc export against fp32 and ORT's own RTN quantizer (SmolLM2-135M)", "",
             f"Command: `{cmd}` (after `python -m benchmarks.bench_mixed`). onnxruntime "
             f"{_ort_version()}, CPUExecutionProvider, {THREADS} threads, batch 1, `accuracy_level` 0 (float "
             "compute) unless the row says 4 (int8 activations). Same graph builder for every row (quantc's), so only the linear "
             "weights differ. Perplexity: WikiText-2, first 80×512 tokens, run by ONNX Runtime.", "",
             "| model | model.onnx + data MB | ppl | prefill 512 tok ms | decode tok/s |", "|---|---|---|---|---|"]
    for label, e, m in results:
        lines.append(f"| {label} | {e['mb']:.1f} | {m['ppl']:.2f} | {m['prefill_ms']:.0f} | {m['decode_tok_s']:.1f} |")
    lines += ["", "Logit parity, ONNX Runtime against quantc's torch runtime on the same artifact (4 windows of "
              "512 tokens; 32 greedy tokens):", "",
              "| artifact | MatMulNBits bits | max |Δlogit| / max |logit| | ‖Δ‖/‖logits‖ | 32 greedy tokens identical |",
              "|---|---|---|---|---|"]
    for label, p in parity:
        lines.append(f"| {label} | {'/'.join(map(str, p['container_bits']))} | {p['max_abs_rel']:.2e} | "
                     f"{p['norm_rel']:.2e} | {'yes' if p['same_tokens'] else 'NO'} ({p['n_tokens']}) |")
    write_section(MARK, lines[1:])
    print("\n".join(lines))


def _ort_version() -> str:
    import onnxruntime
    return onnxruntime.__version__


if __name__ == "__main__":
    main()
