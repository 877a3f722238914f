"""Benchmark: the foundation protocol on SmolLM2-135M (or `--model qwen`: Qwen2.5-Coder-0.5B-Instruct,
or a model folder), quantc against GPTQModel 7.6.0.

    python -m benchmarks.bench_gptq [--model qwen] [--only quantc-gptq-4b,...] [--gptqmodel 4b,3b,2b] [--fresh]

Calibration: 128 sequences × 512 tokens of the C4 file in ../shared (docs with ≥ 512 tokens in file
order, one random window each, random.Random(0)). Evaluation: WikiText-2 test joined with "\\n\\n",
first 80 windows of 512 tokens, float32, every checkpoint (quantc's and GPTQModel's) through the same
path (`quantc.load`). Every job runs in its own process (its peak RSS is its own) and is cached in
benchmarks/work/ so an interrupted run resumes; RESULTS.md is rewritten after every job.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import ROOT, WORK, calibration, machine, wikitext
from benchmarks.models import bench_model, decoder_linears, keyed, mark, own_results, select, title

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
CONFIGS = {  # name: (bits, group size, sym)
    "4b": (4, 128, True),
    "3b": (3, 128, True),
    "2b": (2, 128, False),
}
# quantc's GPTQ settings for these rows (its own choices, same bits/group/sym as GPTQModel):
# act-order with static groups (g_idx stays i // 128, so no reordering for kernels) and the clipped grid.
QUANTC_GPTQ = {"act_order": True, "static_groups": True, "mse": True}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def linear_bytes(folder: Path) -> int:
    from safetensors import safe_open
    total = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                if k.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "g_idx"):
                    t = sf.get_slice(k)
                    n = 1
                    for d in t.get_shape():
                        n *= d
                    total += n * {"I32": 4, "F16": 2, "BF16": 2, "F32": 4}[t.get_dtype()]
    return total


# ----------------------------------------------------------------------------- jobs (subprocess)

def job_quantc(method: str, cfg: str, out: Path, check_samples: int | None = None) -> dict:
    """One quantc compile of the protocol (`check_samples`: the held-out check's size, else quantc's default)."""
    from quantc.config import parse_config
    from quantc.pipeline import compile_model
    bits, gs, sym = CONFIGS[cfg]
    model = bench_model()
    data = WORK / "c4-calib.jsonl"
    quant = {"bits": bits, "group_size": gs, "sym": sym, "method": method}
    if method == "gptq":
        # error propagation off: this row is GPTQ itself, as GPTQModel runs it (the QEP row is quantc's default)
        quant.update(QUANTC_GPTQ, qep_alpha=0.0)
    raw = {"model": str(model), "quant": quant,
           "calibration": {"source": str(data), "samples": 128, "seq_len": 512, "seed": 0,
                           **({"check_samples": check_samples} if check_samples is not None else {})}}
    t = time.perf_counter()
    m = compile_model(parse_config(raw, "bench"), out, force=True, progress=False)
    return {"quantize_s": m["timings"]["quantize_s"], "total_s": time.perf_counter() - t,
            "settings": quant}


def job_gptqmodel(cfg: str, out: Path) -> dict:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import AutoTokenizer
    bits, gs, sym = CONFIGS[cfg]
    model = bench_model()
    tok = AutoTokenizer.from_pretrained(model)
    cal = calibration(tok, 128, 512, 0)
    data = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in cal]
    qcfg = QuantizeConfig(bits=bits, group_size=gs, sym=sym, desc_act=False)
    t = time.perf_counter()
    m = GPTQModel.load(str(model), qcfg, dtype=torch.float16)
    m.quantize(data, batch_size=1)
    quant_s = time.perf_counter() - t
    m.save(str(out))
    return {"quantize_s": quant_s, "total_s": time.perf_counter() - t,
            "settings": {"bits": bits, "group_size": gs, "sym": sym, "desc_act": False}}


def job_eval(folder: str | None) -> dict:
    import torch
    import quantc
    from quantc.evaluate import evaluate
    from quantc.model import load_model, load_tokenizer
    model_dir = bench_model()
    tok = load_tokenizer(str(model_dir))
    tokens = wikitext(tok, 512, 80)
    t = time.perf_counter()
    model = load_model(str(model_dir)) if folder is None else quantc.load(folder, dtype=torch.float32)
    res = evaluate(model, tokens, progress=False)
    res["eval_s"] = time.perf_counter() - t
    return res


KL_WINDOWS = 16   # windows of 512 tokens per text for the KL check: 8,176 positions each


def kl_tokens(tok) -> dict:
    """The KL check's texts: fresh C4 (the documents after the calibration's 128, same rule: the
    predictor's own distribution, never calibrated on) and the first windows of the WikiText protocol."""
    return {"c4": calibration(tok, 128 + KL_WINDOWS, 512, 0)[128:], "wikitext": wikitext(tok, 512, 80)[:KL_WINDOWS]}


def job_kl(folder: str) -> dict:
    """KL(fp32 model ‖ quantized checkpoint) per token on kl_tokens, the quantity the plan's predicted
    ΔKL estimates, and each model's next-token loss on the same windows (so Δloss = nll − ref_nll)."""
    import torch
    import quantc
    from quantc.evaluate import evaluate
    from quantc.model import load_model, load_tokenizer
    tok = load_tokenizer(str(bench_model()))
    t = time.perf_counter()
    ref = load_model(str(bench_model()))
    model = quantc.load(folder, dtype=torch.float32)
    out = {}
    for name, tokens in kl_tokens(tok).items():
        r = evaluate(model, tokens, reference=ref, progress=False)
        out[name] = {k: r[k] for k in ("kl", "nll", "ref_nll", "tokens")}
    out["kl_s"] = time.perf_counter() - t
    return out


def run_job(argv: list[str]) -> None:
    kind = argv[0]
    if kind == "quantc":
        res = job_quantc(argv[1], argv[2], Path(argv[3]), int(argv[4]) if len(argv) > 4 else None)
    elif kind == "gptqmodel":
        res = job_gptqmodel(argv[1], Path(argv[2]))
    elif kind == "kl":
        res = job_kl(argv[1])
    else:
        res = job_eval(None if argv[1] == "-" else argv[1])
    res["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(res), flush=True)


# ----------------------------------------------------------------------------- driver

def subprocess_job(args: list[str], module: str = "benchmarks.bench_gptq") -> dict:
    """Run one job in its own process (its peak RSS is its own) and return its RESULT line."""
    p = subprocess.run([sys.executable, "-m", module, "--job", *args], cwd=ROOT,
                       capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"job {args} failed:\n{p.stderr[-3000:]}")


def cached(name: str, fn) -> dict:
    path = WORK / f"{keyed(name)}.json"          # each model its own results (the default's names unchanged)
    if path.is_file():
        return json.loads(path.read_text())
    print(f"[bench] {name} ...", flush=True)
    res = fn()
    path.write_text(json.dumps(res, indent=2))
    print(f"[bench] {name}: {res}", flush=True)
    return res


def uniform_job(cfg: str, qep: float = 0.0) -> dict:
    """The one home of the uniform quantc GPTQ references' jobs (bench_gptq, bench_ablation and
    bench_mixed read them): QEP off is bench_gptq's quantc row, QEP α is bench_ablation's qep row.
    Their compile and eval cache names, folder, and the job (module, arguments) that makes them."""
    if qep == 0:
        return {"compile": f"quant-quantc-gptq-{cfg}", "eval": f"eval-quantc-gptq-{cfg}", "kl": f"kl-quantc-gptq-{cfg}",
                "folder": WORK / keyed(f"quantc-gptq-{cfg}"), "module": "benchmarks.bench_gptq",
                "args": ["quantc", "gptq", cfg]}
    key = f"ablation-{cfg}-qep-{qep:g}"
    return {"compile": f"{key}-compile", "eval": f"{key}-eval", "kl": f"{key}-kl", "folder": WORK / keyed(key),
            "module": "benchmarks.bench_ablation", "args": [cfg, f"qep-{qep:g}"]}


def run_uniform(cfg: str, qep: float = 0.0) -> tuple[dict, dict, Path]:
    """(compile result, eval result, folder) of a uniform reference, from the cache or run now."""
    j = uniform_job(cfg, qep)
    q = cached(j["compile"], lambda: subprocess_job([*j["args"], str(j["folder"])], j["module"]))
    e = cached(j["eval"], lambda: subprocess_job(["eval", str(j["folder"])]))
    return q, e, j["folder"]


def run_kl(name: str, folder: Path) -> dict:
    """The KL check (job_kl) of a finished checkpoint, cached under `name`."""
    return cached(name, lambda: subprocess_job(["kl", str(folder)]))


def prepare(model: str | None, fresh: str | None) -> None:
    """The start of a benchmark run: the work folder, `model` (its --model) selected, the selected
    model's cached results matching `fresh` forgotten (its --fresh; None keeps them), and the
    calibration file."""
    WORK.mkdir(parents=True, exist_ok=True)
    select(model)
    if fresh:
        for p in own_results(fresh):
            p.unlink()
    write_calibration_file()


def write_calibration_file() -> None:
    """The protocol's calibration windows as text-free token lists quantc can read (.jsonl of text
    would be re-tokenized; we store the decoded windows and check they re-tokenize identically)."""
    path = WORK / "c4-calib.jsonl"
    if path.is_file():
        return
    from quantc.model import load_tokenizer
    from benchmarks.common import c4_docs
    tok = load_tokenizer(str(bench_model()))
    # quantc's own jsonl reader applies the same rule (docs ≥ 512 tokens, one window each, Random(0)),
    # so the benchmark hands it the C4 documents themselves.
    with path.open("w") as f:
        for text in c4_docs():
            f.write(json.dumps({"text": text}) + "\n")
    from quantc.calibration.data import windows_from_docs
    a = windows_from_docs((json.loads(l)["text"] for l in path.open()), tok, 128, 512, 0, "x")
    b = calibration(tok, 128, 512, 0)
    assert (a == b).all(), "calibration windows differ between quantc's reader and the protocol"


def write_section(mark: str, lines: list[str]) -> None:
    """Replace the section between two `mark` lines of RESULTS.md (append it when absent)."""
    body = "\n".join([mark, *lines, mark, ""])
    text = RESULTS.read_text() if RESULTS.is_file() else "# Benchmark results\n"
    if mark in text:
        pre, _, rest = text.partition(mark)
        _, _, post = rest.partition(mark)
        text = pre + body + post.lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + body
    RESULTS.write_text(text)


def table(rows: list[dict]) -> str:
    head = "| config | tool | quantize s | peak RSS MB (quantize) | quantized-linear bytes | ppl |\n|---|---|---|---|---|---|\n"
    body = ""
    for r in rows:
        q = r.get("quant", {})
        e = r.get("eval", {})
        qs = f"{q['quantize_s']:.0f}" if "quantize_s" in q else "—"
        rss = f"{q['peak_rss_mb']:.0f}" if "peak_rss_mb" in q else "—"
        size = f"{r['bytes'] / 1e6:.1f} MB" if r.get("bytes") else "—"
        ppl = f"{e['ppl']:.2f}" if "ppl" in e else "pending"
        body += f"| {r['config']} | {r['tool']} | {qs} | {rss} | {size} | {ppl} |\n"
    return head + body


def write_results(rows: list[dict], cmd: str) -> None:
    write_section(mark("bench_gptq"), [
        f"## Foundation protocol: quantc vs GPTQModel 7.6.0 on {title()}", "",
        f"Command: `{cmd}`  \nMachine: {machine()}. "
        "Calibration 128×512 C4 tokens (Random(0)); WikiText-2 test, first 80×512 tokens, "
        "every checkpoint evaluated in float32 through `quantc.load`. quantc GPTQ rows use "
        f"{QUANTC_GPTQ} (same bits/group/sym as GPTQModel, which runs `desc_act=False`), with error "
        "propagation off, and with quantc's default QEP α = 0.5 in the QEP row. "
        f"Bytes: qweight+qzeros+scales+g_idx of the {decoder_linears()} decoder linears.", "", table(rows)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", nargs=argparse.REMAINDER)
    ap.add_argument("--model", help="smollm2 (default), qwen (Qwen2.5-Coder-0.5B-Instruct, fetched once) or a "
                                    "model folder")
    ap.add_argument("--configs", default="4b,3b,2b")
    ap.add_argument("--gptqmodel", default="4b,3b,2b", help="configs to run through GPTQModel ('' = none)")
    ap.add_argument("--rtn", default="4b,3b,2b", help="configs to run with quantc RTN ('' = none)")
    ap.add_argument("--qep", default="4b", help="configs to run with quantc's default error propagation, QEP "
                                                "α = 0.5 (bench_ablation's qep-0.5 job and cache; '' = none)")
    ap.add_argument("--fresh", action="store_true", help="forget cached job results")
    args = ap.parse_args()
    if args.job:
        run_job(args.job)
        return
    prepare(args.model, "*" if args.fresh else None)
    cmd = "python -m benchmarks.bench_gptq " + shlex.join(sys.argv[1:])      # as a shell reads it back
    rows = [{"config": "fp32", "tool": "—", "bytes": None}]
    plan = []
    for c in args.configs.split(","):
        plan += [("quantc", "gptq", c)] + ([("quantc", "gptq-qep", c)] if c in args.qep.split(",") else []) + \
            ([("quantc", "rtn", c)] if c in args.rtn.split(",") else [])
    plan += [("gptqmodel", "gptq", c) for c in args.gptqmodel.split(",") if c]   # slowest last
    names = {("quantc", "gptq"): "quantc GPTQ (QEP off)", ("quantc", "gptq-qep"): "quantc GPTQ + QEP 0.5 (default)",
             ("quantc", "rtn"): "quantc RTN", ("gptqmodel", "gptq"): "GPTQModel 7.6.0"}
    for tool, method, c in plan:
        bits, gs, sym = CONFIGS[c]
        rows.append({"config": f"{bits}-bit g{gs} {'sym' if sym else 'asym'}", "tool": names[tool, method],
                     "key": f"{tool}-{method}-{c}"})
    rows[0]["eval"] = cached("eval-fp32", lambda: subprocess_job(["eval", "-"]))
    write_results(rows, cmd)
    for r, (tool, method, c) in zip(rows[1:], plan):
        if (tool, method) in (("quantc", "gptq"), ("quantc", "gptq-qep")):   # shared with the other benchmarks
            r["quant"], r["eval"], out = run_uniform(c, 0.5 if method == "gptq-qep" else 0.0)
        else:
            out = WORK / keyed(r["key"])
            args_q = ["quantc", method, c, str(out)] if tool == "quantc" else ["gptqmodel", c, str(out)]
            r["quant"] = cached(f"quant-{r['key']}", lambda: subprocess_job(args_q))
            r["eval"] = cached(f"eval-{r['key']}", lambda: subprocess_job(["eval", str(out)]))
        r["bytes"] = linear_bytes(out)
        write_results(rows, cmd)
    print(table(rows))


if __name__ == "__main__":
    main()
