"""Shared by the benchmarks and the tests: the protocol's data and model preparation.

The product never reads ../shared; only these harnesses do."""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QUANTC_SHARED", ROOT.parent / "shared"))
CACHE = Path(os.environ.get("QUANTC_CACHE", Path.home() / ".cache" / "quantc"))
WORK = ROOT / "benchmarks" / "work"        # the benchmarks' cache of finished jobs and fetched models (git-ignored)


def machine() -> str:
    """This machine in words for a section's header (read, not typed: sections move between machines):
    cores, CPU model and vector extensions, memory, torch."""
    import platform
    name, flags = platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name == platform.machine():
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    if "avx512_bf16" in flags:
        simd += " with bf16"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()}-core {name} ({simd}), {mem:.0f} GiB, torch {torch.__version__}"


def model_dir() -> Path:
    return Path(os.environ.get("QUANTC_TEST_MODEL", SHARED / "models" / "smollm2-135m-instruct"))


def hf_folder_from_gguf(src: Path, gguf_name: str, out: Path | None = None) -> Path:
    """Dequantize a GGUF model once into an ordinary fp32 HF folder (default: in the cache); reuse it
    later. The tokenizer comes from the folder's tokenizer files, else from the GGUF itself."""
    out = CACHE / f"{src.name}-fp32" if out is None else out
    if (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_name, dtype=torch.float32)
    # a GGUF-loaded model refuses save_pretrained: write its (dequantized) weights ourselves
    from safetensors.torch import save_file
    tmp.mkdir(parents=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    model.config.architectures = [type(model).__name__]
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    own = (src / "tokenizer.json").is_file() or (src / "tokenizer_config.json").is_file()
    AutoTokenizer.from_pretrained(src, **({} if own else {"gguf_file": gguf_name})).save_pretrained(tmp)
    for extra in ("generation_config.json", "chat_template.jinja"):
        if (src / extra).is_file():
            shutil.copy(src / extra, tmp / extra)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def prepared_model() -> Path:
    src = model_dir()
    if any(src.glob("*.safetensors")):
        return src
    gguf = sorted(src.glob("*.gguf"))
    if not gguf:
        raise SystemExit(f"{src}: no safetensors or GGUF model; set QUANTC_TEST_MODEL")
    return hf_folder_from_gguf(src, gguf[0].name)


def c4_docs(n: int | None = None):
    with open(SHARED / "data" / "c4-validation-1k.jsonl", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if n is not None and i >= n:
                return
            yield json.loads(line)["text"]


def calibration(tokenizer, samples: int = 128, seq_len: int = 512, seed: int = 0) -> torch.Tensor:
    """The protocol: C4 docs with ≥ seq_len tokens in file order, one random window each, Random(seed)."""
    from quantc.calibration.data import windows_from_docs
    return windows_from_docs(c4_docs(), tokenizer, samples, seq_len, seed, "c4")


def wikitext(tokenizer, seq_len: int = 512, windows: int = 80) -> torch.Tensor:
    from quantc.evaluate import eval_tokens, read_text
    text = read_text(str(SHARED / "data" / "wikitext-2-raw-test.txt"), join_lines=True)
    return eval_tokens(text, tokenizer, seq_len, windows)


def save_plot(fig, ax, out: Path, xlabel: str, ylabel: str) -> Path:
    """The benchmarks' common finish of a log-scale plot: labels, grid, legend, PNG."""
    import matplotlib.pyplot as plt
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
