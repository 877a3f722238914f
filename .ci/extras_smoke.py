"""Exercise the path one install extra exists for, then list the third-party packages it imported.

Run by .ci/check_extras inside a fresh venv holding only torch==2.13.0 and `pip install -e ".[EXTRA]"`;
`prepare` runs in a full environment and builds a tiny compiled model (with its ONNX export) that the
onnx/ort/genai/kernels paths read.

    python .ci/extras_smoke.py prepare WORK
    python .ci/extras_smoke.py gguf|onnx|ort|genai|kernels WORK
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"


def prepare(work: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import torch
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    import conftest
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(conftest.corpus().splitlines(), trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    work.mkdir(parents=True, exist_ok=True)
    conftest.build_tiny("llama", work / "tiny", tokenizer)
    (work / "calib.txt").write_text(conftest.corpus(3000))
    (work / "tiny.yaml").write_text("model: tiny\ncalibration: {source: calib.txt, samples: 8, seq_len: 64}\n"
                                    "export: {targets: [gptq, onnx]}\n")
    torch.manual_seed(0)
    subprocess.run([sys.executable, "-m", "quantc.cli", "-q", "compile", str(work / "tiny.yaml"),
                    "-o", str(work / "tiny-q"), "--force"], check=True)


def third_party() -> list[str]:
    std = set(sys.stdlib_module_names) | {"quantc", "_distutils_hack", "__main__", "conftest"}
    return sorted({m.split(".")[0] for m in sys.modules if not m.startswith("_")} - std)


def run(extra: str, work: Path) -> None:
    from click.testing import CliRunner
    from quantc.cli import main

    def cli(*args):
        r = CliRunner().invoke(main, list(args), catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return r.output

    if extra == "gguf":        # the README's main job reads a GGUF model (dequantized by transformers)
        from quantc.model import load_model, load_tokenizer
        d = str(SHARED / "models" / "smollm2-135m-instruct")
        load_model(d, "SmolLM2-135M-Instruct.Q4_1.gguf")
        load_tokenizer(d, "SmolLM2-135M-Instruct.Q4_1.gguf")
    elif extra == "onnx":      # quantc export onnx
        cli("-q", "export", "onnx", str(work / "tiny-q"), "-o", str(work / f"onnx-{os.getpid()}"))
    elif extra == "ort":       # quantc eval/generate --backend onnx
        cli("-q", "eval", str(work / "tiny-q"), "--text", str(work / "calib.txt"), "--backend", "onnx",
            "--windows", "2", "--seq-len", "32", "--no-kl")
        cli("-q", "generate", str(work / "tiny-q"), "-p", "the quick", "-n", "4", "--backend", "onnx")
    elif extra == "genai":     # ONNX Runtime GenAI runs the exported folder
        import onnxruntime_genai as og
        model = og.Model(str(work / "tiny-q" / "onnx"))
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=12)
        gen = og.Generator(model, params)
        gen.append_tokens([[1, 5, 9]])
        while not gen.is_done():
            gen.generate_next_token()
    elif extra == "kernels":   # Triton GPTQ matmul (interpreted on the CPU)
        os.environ["TRITON_INTERPRET"] = "1"
        import torch
        from quantc.kernels import gptq_matmul
        from quantc.packing import dequantize_gptq, pack_gptq
        q = torch.randint(0, 16, (64, 128), dtype=torch.int32)
        z = torch.full((4, 64), 8, dtype=torch.int32)
        s = torch.rand(4, 64) * 0.01 + 0.001
        g = torch.arange(128, dtype=torch.int32) // 32
        p = pack_gptq(q, z, s, g, 4)
        t = [p[k] for k in ("qweight", "qzeros", "scales", "g_idx")]
        x = torch.randn(2, 128)
        y = gptq_matmul(x, *t, bits=4)
        ref = x @ dequantize_gptq(*t, bits=4).float().t()
        assert torch.allclose(y.float(), ref, rtol=1e-3, atol=1e-3)
    else:
        sys.exit(f"unknown extra {extra!r}")
    print(f"[{extra}] ok; third-party imports: {', '.join(third_party())}")


if __name__ == "__main__":
    what, work = sys.argv[1], Path(sys.argv[2])
    prepare(work) if what == "prepare" else run(what, work)
