"""Benchmark: peak RSS of the GPTQ export (export/gptq.py write_gptq) at Llama-3-8B's width, this code
against an older commit, side by side in one run.

    python -m benchmarks.bench_export [--layers 32] [--baseline cd138bd] [--fresh]

The export assembles the checkpoint from the per-layer shards the quantize sweep writes. Here the shards
are synthetic: `--layers` decoder layers at Llama-3-8B's width (hidden 4096, intermediate 14336, 32/8
heads) quantized at 4-bit g128 (qweight, qzeros, scales, g_idx per linear, random codes; both norms in
fp16), written once to benchmarks/work/. The embeddings and the untied head come from bench_memory_8b's
2-layer model (49,152 × 4096 each, read lazily and written in fp16), so 32 layers make a checkpoint of a
Llama-3-8B's size with a 49k vocabulary (4.4 GB: one file, under transformers' 5 GB).
Each export runs alone in its own process (peak RSS = its ru_maxrss, the libraries included), with
the code it measures first on sys.path: this checkout, and `--baseline` in a temporary git worktree.
The outputs are compared byte for byte (SHA-256 of every file written).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.bench_gptq import WORK, cached, write_section
from benchmarks.bench_memory_8b import WIDTH, folder_for
from benchmarks.common import ROOT

MARK = "<!-- bench_export -->"
BITS, GROUP = 4, 128

# Run in a fresh interpreter whose sys.path starts with the code under test (this checkout or the
# baseline's worktree), so that `quantc` is that code's. argv: code root, model, shards folder, out.
EXPORT = r"""
import hashlib, json, resource, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
import quantc
from quantc.export.gptq import write_gptq
from quantc.model import load_model
from quantc.options import Option
model = load_model(sys.argv[2], lazy=True)
shards = sorted(Path(sys.argv[3]).glob("layer-*.safetensors"), key=lambda p: int(p.stem.split("-")[1]))
names = [f"model.layers.{i}.{m}" for i in range(len(shards)) for m in
         ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj")]
out = Path(sys.argv[4])
out.mkdir(parents=True, exist_ok=True)
t = time.perf_counter()
write_gptq(out, model, shards, {n: Option(BITS, GROUP) for n in names}, [], dtype=torch.float16)
seconds = time.perf_counter() - t
files = {}
for p in sorted(out.iterdir()):
    h = hashlib.sha256()
    with p.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    files[p.name] = h.hexdigest()
print("RESULT " + json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                              "bytes": sum(p.stat().st_size for p in out.iterdir()), "files": files,
                              "quantc": quantc.__file__}))
""".replace("BITS", str(BITS)).replace("GROUP", str(GROUP))


def shard_folder(layers: int) -> Path:
    return WORK / f"export-shards-{layers}"


def make_shards(layers: int) -> dict:
    """The quantize sweep's layer shards at 8B width: one layer's random codes, written under each
    layer's names (the export copies bytes; their values do not matter)."""
    import torch
    from safetensors.torch import save_file
    h, i, kv = WIDTH["hidden_size"], WIDTH["intermediate_size"], WIDTH["num_key_value_heads"] * WIDTH["head_dim"]
    heads = WIDTH["num_attention_heads"] * WIDTH["head_dim"]
    shapes = {"self_attn.q_proj": (h, heads), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
              "self_attn.o_proj": (heads, h), "mlp.gate_proj": (h, i), "mlp.up_proj": (h, i), "mlp.down_proj": (i, h)}
    g = torch.Generator().manual_seed(0)
    one = {}
    for m, (fin, fout) in shapes.items():
        one[f"{m}.qweight"] = torch.randint(-2**31, 2**31 - 1, (fin * BITS // 32, fout), dtype=torch.int32, generator=g)
        one[f"{m}.qzeros"] = torch.randint(-2**31, 2**31 - 1, (fin // GROUP, fout * BITS // 32), dtype=torch.int32,
                                           generator=g)
        one[f"{m}.scales"] = (torch.rand(fin // GROUP, fout, generator=g) * 0.01).half()
        one[f"{m}.g_idx"] = torch.arange(fin, dtype=torch.int32) // GROUP
    for norm in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        one[norm] = torch.ones(h, dtype=torch.float16)
    folder = shard_folder(layers)
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(layers):
        save_file({f"model.layers.{n}.{k}": v for k, v in one.items()}, str(folder / f"layer-{n}.safetensors"),
                  metadata={"format": "pt"})
    return {"bytes": sum(p.stat().st_size for p in folder.glob("layer-*.safetensors"))}


def export(code: Path, layers: int, out: Path) -> dict:
    import shutil
    p = subprocess.run([sys.executable, "-c", EXPORT, str(code), str(folder_for(2)), str(shard_folder(layers)), str(out)],
                       cwd=code, capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)             # gigabytes; its hashes are kept
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            if not res["quantc"].startswith(str(code)):
                raise RuntimeError(f"the export imported {res['quantc']}, not the code under {code}")
            return res
    raise RuntimeError(f"export with {code} failed:\n{p.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--baseline", default="cd138bd", help="the older commit to compare with")
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    if not (folder_for(2) / "config.json").is_file():
        sys.exit(f"{folder_for(2)} is missing: run `python -m benchmarks.bench_memory_8b --layers 2` first "
                 "(it writes the 2-layer model whose embeddings and head the export reads)")
    commit = subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=ROOT, capture_output=True,
                            text=True)
    if commit.returncode:
        ap.error(f"--baseline: {args.baseline!r} is not a commit of this repository")
    base = commit.stdout.strip()
    WORK.mkdir(parents=True, exist_ok=True)
    names = [f"export-{args.layers}-shards", f"export-{args.layers}-{base}"]
    if args.fresh or len(list(shard_folder(args.layers).glob("layer-*.safetensors"))) != args.layers:
        for n in names:
            (WORK / f"{n}.json").unlink(missing_ok=True)
    res = {"shards": cached(names[0], lambda: make_shards(args.layers))}
    res["this"] = export(ROOT, args.layers, WORK / "export-out")      # this checkout's code: measured every run
    with tempfile.TemporaryDirectory() as tmp:
        def baseline():
            wt = Path(tmp) / "baseline"
            subprocess.run(["git", "worktree", "add", "--detach", str(wt), base], cwd=ROOT, check=True,
                           capture_output=True)
            try:
                return export(wt, args.layers, WORK / "export-out")
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(wt)], cwd=ROOT, capture_output=True)
        res["base"] = cached(names[1], baseline)              # a commit's: cached under its hash
    write(res, args.layers, base, "python -m benchmarks.bench_export " + " ".join(sys.argv[1:]))


def write(res: dict, layers: int, base: str, cmd: str) -> None:
    this, old = res["this"], res["base"]
    same = this["files"] == old["files"]
    lines = ["## Peak memory of the export at Llama-3-8B's width (synthetic layer shards, CPU)", "",
             f"Command: `{cmd}`. write_gptq assembles the checkpoint from {layers} layer shards at Llama-3-8B's width "
             f"(4-bit g128, {res['shards']['bytes'] / 2**30:.2f} GiB on disk) and the 2-layer model's embeddings and "
             "untied head (49,152 × 4096 each, written in fp16). Each export ran in its own process, one after the "
             "other in one run; peak RSS is the process's ru_maxrss, the libraries included. Both processes hold the "
             "loaded model's fp32 embeddings and head (1.5 GiB; a compile releases them before sweep 2 and reads "
             "them again one at a time).", "",
             "| code | peak RSS GiB | seconds | bytes written GiB | files |",
             "|---|---|---|---|---|"]
    for label, r in ((f"{base} (before)", old), ("this code", this)):
        lines.append(f"| {label} | {r['peak_rss_mb'] / 1024:.2f} | {r['seconds']:.0f} | {r['bytes'] / 2**30:.2f} | "
                     f"{', '.join(sorted(r['files']))} |")
    lines += ["", "Every file the two exports wrote is byte-identical (SHA-256)." if same else
              "**The two exports' files differ** (SHA-256): " + ", ".join(
                  k for k in sorted(set(this["files"]) | set(old["files"])) if this["files"].get(k) != old["files"].get(k))]
    write_section(MARK, lines)


if __name__ == "__main__":
    main()
