"""Benchmark: GGUF files at equal size, three ways, and llama.cpp itself running quantc's files.

    python -m benchmarks.bench_gguf [--model qwen] [--presets Q3_K_M,Q4_K_M] [--fresh]

Needs a llama.cpp build (the tools `llama-quantize`, `llama-imatrix`, its converter and libllama) and
llama-cpp-python over it. Both come from llama-cpp-python's source package, which vendors llama.cpp:

    pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all:   # the sdist, 77 MB
    tar xzf llama_cpp_python-0.3.36.tar.gz && cd llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -B build -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \\
          -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON
    cmake --build build -j --target llama-quantize llama-imatrix llama
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" pip install ../..  diskcache jinja2   # the bindings
    pip install sentencepiece     # llama.cpp's converter imports it for Llama-family vocabularies
    export LLAMA_CPP_DIR=$PWD     # this script reads build/bin, convert_hf_to_gguf.py and gguf-py from it

For each llama.cpp mixture preset (its own per-tensor rules, with an importance matrix), at the byte
size of that preset's quantized linears:
- **quantc**: a budgeted compile at its defaults (GPTQ with error propagation, QEP α = 0.5) on
  llama.cpp's grids (`quant.grid: k`, bits 2–6 and 8: Q2_K…Q6_K and Q8_0, with llama.cpp's fallbacks
  where rows are not whole super-blocks), `serve: [gguf]`, exported to GGUF (embeddings typed as
  llama.cpp's quantizer types them);
- **llama.cpp, same types**: `llama-quantize` given exactly quantc's per-tensor types
  (`--tensor-type-file`, `--token-embedding-type`, `--output-tensor-type`), from an F32 GGUF written by
  llama.cpp's own converter, with the importance matrix and without it;
- **llama.cpp preset**: the preset itself (the mixture nearest in size, by construction the same
  linear bytes as quantc's budget).

The importance matrix: `llama-imatrix` over the protocol's calibration (the 128 × 512 C4 windows,
decoded to text). Perplexity: every file loaded by transformers (`gguf_file=`, dequantized to float32)
on the protocol of RESULTS.md (WikiText-2, 80 × 512). quantc's files are also run by llama.cpp itself
(llama-cpp-python): its perplexity on the same windows from its own logits, and 32 greedy tokens
against transformers' on the same file. Every job runs in its own process and is cached in
benchmarks/work/.
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

from benchmarks.bench_gptq import WORK, peak_rss_mb, subprocess_job, write_calibration_file, write_section
from benchmarks.common import calibration, wikitext
from benchmarks.models import bench_model, keyed, mark, select, title

MARK = "bench_gguf"
LINEAR_PARTS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
PROMPT = "The history of the city begins in"


def llama_cpp_dir() -> Path:
    d = os.environ.get("LLAMA_CPP_DIR")
    if not d or not (Path(d) / "build" / "bin" / "llama-quantize").is_file():
        raise SystemExit("set LLAMA_CPP_DIR to a llama.cpp source tree built with its tools (see this script's "
                         "docstring: build/bin/llama-quantize, llama-imatrix and libllama are needed)")
    return Path(d)


def gdir() -> Path:
    d = WORK / keyed("gguf")
    d.mkdir(parents=True, exist_ok=True)
    return d


def run(cmd: list[str], **kw) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")


def tensor_types(path: Path) -> dict[str, tuple[str, int, int]]:
    """name -> (ggml type name, bytes, weights) of every tensor of a GGUF file."""
    from gguf import GGUFReader
    r = GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, int(t.n_bytes), int(t.n_elements)) for t in r.tensors}


def is_linear(name: str) -> bool:
    return name.startswith("blk.") and name.split(".")[2] in LINEAR_PARTS


def linear_bytes(types: dict) -> int:
    return sum(b for n, (_, b, _) in types.items() if is_linear(n))


# ----------------------------------------------------------------------------- jobs (subprocess)

def job_f32() -> dict:
    """The float model as F32 GGUF, by llama.cpp's own converter."""
    ll = llama_cpp_dir()
    out = gdir() / "model-f32.gguf"
    env = {**os.environ, "PYTHONPATH": str(ll / "gguf-py")}
    t = time.perf_counter()
    run([sys.executable, str(ll / "convert_hf_to_gguf.py"), str(bench_model()), "--outtype", "f32",
         "--outfile", str(out)], env=env)
    return {"path": str(out), "seconds": time.perf_counter() - t, "bytes": out.stat().st_size}


def job_imatrix() -> dict:
    """llama.cpp's importance matrix over the protocol's calibration windows (decoded to text)."""
    from quantc.model import load_tokenizer
    ll = llama_cpp_dir()
    tok = load_tokenizer(str(bench_model()))
    windows = calibration(tok, 128, 512, 0)
    text = gdir() / "calibration.txt"
    text.write_text("\n\n".join(tok.decode(w) for w in windows), encoding="utf-8")
    out = gdir() / "imatrix.gguf"
    t = time.perf_counter()
    run([str(ll / "build" / "bin" / "llama-imatrix"), "-m", str(gdir() / "model-f32.gguf"), "-f", str(text),
         "-c", "512", "--chunks", "128", "-t", str(os.cpu_count() or 2), "-o", str(out)])
    return {"path": str(out), "seconds": time.perf_counter() - t}


def quantize(name: str, preset: str, imatrix: bool, types_from: str | None = None) -> dict:
    ll = llama_cpp_dir()
    out = gdir() / f"{name}.gguf"
    cmd = [str(ll / "build" / "bin" / "llama-quantize")]
    if imatrix:
        cmd += ["--imatrix", str(gdir() / "imatrix.gguf")]
    types = tensor_types(Path(types_from)) if types_from else {}
    if types_from:
        lines = [f"^{n.replace('.', '[.]')}$={t.lower()}" for n, (t, _, _) in types.items() if is_linear(n)]
        tf = gdir() / f"{name}-types.txt"
        tf.write_text("\n".join(lines) + "\n")
        cmd += ["--tensor-type-file", str(tf)]
        if "token_embd.weight" in types:
            cmd += ["--token-embedding-type", types["token_embd.weight"][0].lower()]
        if "output.weight" in types:
            cmd += ["--output-tensor-type", types["output.weight"][0].lower()]
    cmd += [str(gdir() / "model-f32.gguf"), str(out), preset, str(os.cpu_count() or 2)]
    t = time.perf_counter()
    run(cmd)
    got = tensor_types(out)
    res = {"path": str(out), "seconds": time.perf_counter() - t, "bytes": out.stat().st_size,
           "linear_bytes": linear_bytes(got)}
    if types_from:                   # the same per-tensor types, every one (else the comparison is void)
        res["types_differ"] = sorted(n for n in types if n in got and got[n][0] != types[n][0])
    return res


def job_quantc(preset: str, budget: int) -> dict:
    """quantc's plan on llama.cpp's grids at `budget` bytes of quantized linears, exported to GGUF."""
    from quantc.config import parse_config
    from quantc.pipeline import compile_model
    folder = gdir() / f"quantc-{preset}"
    raw = {"model": str(bench_model()),
           "quant": {"grid": "k", "bits": [2, 3, 4, 5, 6, 8], "mse": True},
           "budget": {"memory": budget}, "serve": ["gguf"],
           "export": {"targets": ["gptq", "gguf"]},
           "calibration": {"source": str(WORK / "c4-calib.jsonl"), "samples": 128, "seq_len": 512, "seed": 0}}
    t = time.perf_counter()
    m = compile_model(parse_config(raw, "bench"), folder, force=True, progress=False)
    out = folder / "gguf" / "model.gguf"
    got = tensor_types(out)
    return {"path": str(out), "seconds": time.perf_counter() - t, "timings": m["timings"],
            "bytes": out.stat().st_size, "linear_bytes": linear_bytes(got), "avg_bits": m["totals"]["avg_bits"],
            "types": _type_counts(got), "peak_rss_mb": peak_rss_mb()}


def _type_counts(types: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for n, (t, _, _) in types.items():
        if is_linear(n):
            out[t] = out.get(t, 0) + 1
    return dict(sorted(out.items()))


def job_eval_transformers(path: str) -> dict:
    """The protocol's perplexity of a GGUF file as transformers loads it (dequantized to float32)."""
    import torch
    from transformers import AutoModelForCausalLM
    from quantc.evaluate import evaluate
    from quantc.model import load_tokenizer
    tok = load_tokenizer(str(bench_model()))
    tokens = wikitext(tok, 512, 80)
    p = Path(path)
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32).eval()
    res = evaluate(model, tokens, progress=False)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:].tolist()
    return {**res, "greedy": gen, "prompt": ids[0].tolist(), "eval_s": time.perf_counter() - t}


def _llama(path: str):
    os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(llama_cpp_dir() / "build" / "bin"))
    import llama_cpp.llama_cpp as capi
    from llama_cpp import Llama
    # llama.cpp's weight repacking for this CPU (AVX-512/AMX extra buffer types) segfaults in decode on this
    # machine for every quantized file, llama.cpp's own included (llama-perplexity crashes the same way and
    # runs with --no-repack): load without it, as --no-repack does
    default = capi.llama_model_default_params

    def no_repack():
        p = default()
        p.use_extra_bufts = False
        return p
    capi.llama_model_default_params = no_repack
    return Llama(model_path=path, n_ctx=512, n_batch=512, n_ubatch=512, logits_all=True, verbose=False,
                 n_threads=os.cpu_count() or 2)


def _greedy(llm, prompt: list[int]) -> list[int]:
    """32 greedy tokens: the argmax of llama.cpp's last logits, fed back."""
    import numpy as np
    llm.reset()
    gen = []
    llm.eval(list(prompt))
    for _ in range(32):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        gen.append(nxt)
        llm.eval([nxt])
    return gen


def job_greedy_llama_cpp(path: str) -> dict:
    """llama.cpp's greedy tokens alone (for the files whose perplexity transformers gives)."""
    from quantc.model import load_tokenizer
    prompt = load_tokenizer(str(bench_model()))(PROMPT)["input_ids"]
    return {"greedy": _greedy(_llama(path), prompt), "prompt": prompt}


def job_eval_llama_cpp(path: str) -> dict:
    """The same windows' perplexity from llama.cpp's own logits, and its greedy tokens."""
    import numpy as np
    from quantc.model import load_tokenizer
    tok = load_tokenizer(str(bench_model()))
    tokens = wikitext(tok, 512, 80)
    t = time.perf_counter()
    llm = _llama(path)
    nll, count = 0.0, 0
    for w in tokens.tolist():
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[: len(w) - 1], dtype=np.float64)
        m = logits.max(1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(1, keepdims=True))
        nll -= float(logp[np.arange(len(w) - 1), w[1:]].sum())
        count += len(w) - 1
    prompt = tok(PROMPT)["input_ids"]
    gen = _greedy(llm, prompt)
    return {"ppl": math.exp(nll / count), "tokens": count, "greedy": gen, "prompt": prompt,
            "eval_s": time.perf_counter() - t}


JOBS = {"f32": job_f32, "imatrix": job_imatrix, "quantc": job_quantc, "eval-hf": job_eval_transformers,
        "eval-llama": job_eval_llama_cpp, "greedy-llama": job_greedy_llama_cpp}


# ----------------------------------------------------------------------------- driver

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", nargs=argparse.REMAINDER)
    ap.add_argument("--model", help="smollm2 (default), qwen, or a model folder")
    ap.add_argument("--presets", default="Q3_K_M,Q4_K_M")
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    if args.job:
        kind, rest = args.job[0], args.job[1:]
        if kind == "quantize":
            res = quantize(rest[0], rest[1], rest[2] == "1", rest[3] if len(rest) > 3 and rest[3] != "-" else None)
        else:
            res = JOBS[kind](*[int(a) if a.isdigit() else a for a in rest])
        print("RESULT " + json.dumps(res), flush=True)
        return
    select(args.model)
    llama_cpp_dir()
    write_calibration_file()
    res_path = gdir() / "results.json"
    res = {} if args.fresh or not res_path.is_file() else json.loads(res_path.read_text())

    def step(key: str, *job: str) -> dict:
        if key not in res:
            print(f"[bench] {key} ...", flush=True)
            res[key] = subprocess_job(list(job), "benchmarks.bench_gguf")
            print(f"[bench] {key}: " + json.dumps({k: v for k, v in res[key].items() if k != "greedy"}), flush=True)
            res_path.write_text(json.dumps(res, indent=2))
        return res[key]

    step("f32", "f32")
    step("imatrix", "imatrix")
    presets = args.presets.split(",")
    for p in presets:
        try:
            pre = step(f"preset-{p}", "quantize", f"llama-{p}", p, "1")
        except RuntimeError as e:
            why = next((ln for ln in str(e).splitlines() if "invalid" in ln), str(e).splitlines()[-1])
            raise SystemExit(f"--presets: llama-quantize refused {p!r} ({why.strip()}); give its type names, "
                             "e.g. Q3_K_M,Q4_K_M") from None
        q = step(f"quantc-{p}", "quantc", p, str(pre["linear_bytes"]))
        step(f"same-imat-{p}", "quantize", f"llama-same-imat-{p}", p, "1", q["path"])
        step(f"same-plain-{p}", "quantize", f"llama-same-plain-{p}", p, "0", q["path"])
        for kind in ("preset", "quantc", "same-imat", "same-plain"):
            step(f"eval-{kind}-{p}", "eval-hf", res[f"{kind}-{p}"]["path"])
        step(f"llama-{p}", "eval-llama", q["path"])
        for kind in ("preset", "same-imat"):     # llama.cpp's own files: the same greedy check
            step(f"greedy-{kind}-{p}", "greedy-llama", res[f"{kind}-{p}"]["path"])
    step("eval-f32", "eval-hf", res["f32"]["path"])
    write(res, presets, "python -m benchmarks.bench_gguf " + " ".join(sys.argv[1:]))


def write(res: dict, presets: list[str], cmd: str) -> None:
    f32 = tensor_types(Path(res["f32"]["path"]))
    params = sum(w for _, _, w in f32.values())
    lin_weights = sum(w for n, (_, _, w) in f32.items() if is_linear(n))
    fp = res["eval-f32"]["ppl"]
    lines = [f"## GGUF at equal size, three ways ({title()})", "",
             f"Command: `LLAMA_CPP_DIR=… {cmd}` (llama.cpp vendored by llama-cpp-python 0.3.36, built from its "
             "source package on this CPU). Each row is a GGUF file; perplexity on the protocol (WikiText-2, "
             "80 × 512 tokens) with the file loaded by transformers (dequantized to float32). Budgets: the "
             "bytes of the quantized linears of llama.cpp's preset (its own per-tensor mixture, importance "
             "matrix from the protocol's 128 × 512 C4 calibration). bpw = file bits / all weights "
             f"({params:,}); linear bpw = bits of the quantized linears / their weights. F32 GGUF: ppl {fp:.2f}.",
             "", "| size of | file | file MiB | bpw | linear bpw | linear types | ppl | Δ vs preset |",
             "|---|---|---|---|---|---|---|---|"]
    for p in presets:
        base = res[f"eval-preset-{p}"]["ppl"]
        for kind, label in (("preset", f"llama.cpp preset {p} (imatrix)"),
                            ("same-imat", "llama.cpp quantizer, quantc's types (imatrix)"),
                            ("same-plain", "llama.cpp quantizer, quantc's types (no imatrix)"),
                            ("quantc", "**quantc** (GPTQ + QEP 0.5, its defaults, on the same grids)")):
            r, e = res[f"{kind}-{p}"], res[f"eval-{kind}-{p}"]
            types = _type_counts(tensor_types(Path(r["path"])))
            ts = ", ".join(f"{t}×{n}" for t, n in types.items())
            lines.append(f"| {p} | {label} | {r['bytes'] / 2**20:.2f} | {8 * r['bytes'] / params:.3f} | "
                         f"{8 * r['linear_bytes'] / lin_weights:.3f} | {ts} | {e['ppl']:.2f} | "
                         f"{100 * (e['ppl'] / base - 1):+.1f}% |")
    lines += ["", "Checks: llama.cpp's quantizer got exactly quantc's type for every linear: " + ", ".join(
        f"{p}: {'yes' if not res[f'same-imat-{p}']['types_differ'] else 'no ' + str(res[f'same-imat-{p}']['types_differ'][:3])}"
        for p in presets) + "."]
    lines += ["", "llama.cpp itself running quantc's files (llama-cpp-python over the same build; perplexity "
              "from llama.cpp's logits on the same windows; greedy: 32 tokens after the prompt "
              f"{PROMPT!r}, against transformers on the same file):", "",
              "| file | ppl (transformers) | ppl (llama.cpp) | greedy tokens equal | first difference |",
              "|---|---|---|---|---|"]
    for p in presets:
        a, b = res[f"eval-quantc-{p}"], res[f"llama-{p}"]
        same = sum(1 for x, y in zip(a["greedy"], b["greedy"]) if x == y)
        first = next((i for i, (x, y) in enumerate(zip(a["greedy"], b["greedy"])) if x != y), None)
        lines.append(f"| quantc at {p}'s size | {a['ppl']:.2f} | {b['ppl']:.2f} | "
                     f"{'all 32' if first is None else f'{same}/32'} | {'-' if first is None else f'token {first}'} |")
    first = {}
    for p in presets:
        for kind, run in (("preset", f"greedy-preset-{p}"), ("same-imat", f"greedy-same-imat-{p}"),
                          ("quantc", f"llama-{p}")):
            a, b = res[f"eval-{kind}-{p}"]["greedy"], res[run]["greedy"]
            first[f"{kind} {p}"] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    lines += ["", "The same greedy check on llama.cpp's own files (the token where llama.cpp first departs from "
              "transformers on the same file; none = all 32 equal): " + ", ".join(
                  f"{k}: {'none' if v is None else v}" for k, v in first.items())
              + ". llama.cpp multiplies with quantized activations (its CPU dot products), so near-ties can go "
              "the other way whoever wrote the file."]
    write_section(mark(MARK), lines)


if __name__ == "__main__":
    main()
