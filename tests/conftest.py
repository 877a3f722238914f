"""Fixtures: tiny random models of each supported architecture (built here, in seconds), a small
tokenizer trained on the fly, and the real SmolLM2-135M from ../shared (converted once from GGUF
into a cache folder)."""
from __future__ import annotations

import os
import random
from pathlib import Path

# Triton kernels run on CPU tensors through the interpreter (must be set before triton is imported)
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex bold jackals "
         "model layer weight bits group scale zero error budget memory token sequence").split()


def pytest_configure(config):
    # Under pytest-xdist (setup.cfg runs one worker per core) each worker computes on one thread:
    # workers that each took every core would fight over them instead of sharing them.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def corpus(n_words: int = 4000, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_words // 12):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(12)) + ".")
    return "\n".join(lines)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus().splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_config(kind: str, tokenizer, layers: int = 2):
    """The config of a tiny random model of family `kind` (2 layers, hidden 64, 4 heads, 2 KV heads)."""
    from transformers import (Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config,
                              Qwen3Config)
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if kind == "gemma3_text":
        # sliding-window layers with a window shorter than the test sequences, then a global layer
        kinds = ["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2)
        return Gemma3TextConfig(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=12,
                                layer_types=kinds, tie_word_embeddings=True)
    if kind == "phi3":     # head_dim = hidden / heads; q/k/v and gate/up fused in the checkpoint
        return Phi3Config(**common, tie_word_embeddings=False)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[kind]
    return cls(**common, head_dim=16, tie_word_embeddings=(kind == "llama"))


def save_random(cfg, folder: Path, tokenizer, std: float = 0.08, seed: int = 0):
    """A model of `cfg` whose matrices are N(0, std²) (larger than init, so quantization error shows),
    saved with the tokenizer; returns the model."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, std)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def build_tiny(kind: str, folder: Path, tokenizer, layers: int = 2, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM
    cfg = tiny_config(kind, tokenizer, layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():   # larger-than-init weights so that quantization error is visible
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif name.endswith(".bias"):
                p.normal_(0, 0.05)
            elif kind in ("gemma3_text", "phi3"):     # norms away from 1: their offset and place matter
                p.normal_(0, 0.2 if kind == "gemma3_text" else 0.05).add_(0 if kind == "gemma3_text" else 1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_tokenizer):
    base = tmp_path_factory.mktemp("models")
    return {k: build_tiny(k, base / k, tiny_tokenizer) for k in ("llama", "mistral", "qwen2", "qwen3")}


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "calib.txt"
    p.write_text(corpus(6000, seed=1))
    return p


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def smollm2():
    """Folder of the real SmolLM2-135M as an ordinary HF model (fp32 safetensors)."""
    src = Path(os.environ.get("QUANTC_TEST_MODEL", SHARED / "models" / "smollm2-135m-instruct"))
    if not src.is_dir():
        pytest.skip(f"real test model not found at {src} (set QUANTC_TEST_MODEL)")
    if (src / "model.safetensors").is_file() or any(src.glob("*.safetensors")):
        return src
    gguf = sorted(src.glob("*.gguf"))
    if not gguf:
        pytest.skip(f"{src} has neither safetensors nor a GGUF file")
    from benchmarks.common import hf_folder_from_gguf
    return hf_folder_from_gguf(src, gguf[0].name)
