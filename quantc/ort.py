"""Run an exported ONNX folder (`quantc export onnx`) in ONNX Runtime: logits, perplexity, greedy
generation with the KV cache. The session's real providers are reported (a CUDA build that falls
back to the CPU says so)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from .errors import QuantcError

log = logging.getLogger("quantc")


def onnx_folder(path: str | Path) -> Path:
    """The ONNX folder of an artifact: `path` itself or its `onnx/` sub-folder."""
    p = Path(path)
    for cand in (p, p / "onnx"):
        if (cand / "model.onnx").is_file():
            return cand
    raise QuantcError(f"{p}: no model.onnx (nor onnx/model.onnx); run `quantc export onnx {p}` first")


def check_single_runtime() -> None:
    """onnxruntime and onnxruntime-gpu install into one folder: with both, whichever was installed last
    wins silently (often the CPU one). Say so instead of running on the wrong provider."""
    from importlib.metadata import PackageNotFoundError, version
    found = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            found.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            pass
    if len(found) > 1:
        log.warning("both %s are installed and share one folder; `pip uninstall -y onnxruntime onnxruntime-gpu` "
                    "then install one: pip install 'quantc[ort]' (CPU) or 'quantc[ort-gpu]' (CUDA)", " and ".join(found))


class OrtModel:
    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise QuantcError("the ONNX backend needs ONNX Runtime: pip install 'quantc[ort]' "
                              "(or 'quantc[ort-gpu]' for CUDA)") from None
        check_single_runtime()
        self.folder = onnx_folder(path)
        try:
            self.info = json.loads((self.folder / "onnx_export.json").read_text())
        except (OSError, ValueError) as e:
            raise QuantcError(f"{self.folder}/onnx_export.json: missing or damaged ({e}); export again with "
                              "`quantc export onnx --force`") from None
        avail = ort.get_available_providers()
        wanted = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail]
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.folder / "model.onnx"), opts, providers=wanted)
        self.providers = self.session.get_providers()
        if wanted and wanted[0] not in self.providers:
            log.warning("asked for %s, ONNX Runtime gave %s", wanted[0], self.providers)
        self.layers, self.kv_heads = self.info["num_hidden_layers"], self.info["num_key_value_heads"]
        self.head_dim = self.info["head_dim"]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        z = np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)
        return {f"past_key_values.{i}.{kv}": z for i in range(self.layers) for kv in ("key", "value")}

    def forward(self, input_ids: np.ndarray, past: dict | None = None, past_len: int = 0):
        """Logits [B, S, V] and the new cache (present.* renamed to past_key_values.*)."""
        ids = np.asarray(input_ids, np.int64)
        b, s = ids.shape
        feeds = {"input_ids": ids, "attention_mask": np.ones((b, past_len + s), np.int64),
                 "position_ids": np.broadcast_to(np.arange(past_len, past_len + s, dtype=np.int64), (b, s)).copy(),
                 **(past if past is not None else self.empty_past(b))}
        names = [o.name for o in self.session.get_outputs()]
        outs = self.session.run(names, feeds)
        logits = outs[0]
        present = {n.replace("present.", "past_key_values.", 1): v for n, v in zip(names[1:], outs[1:])}
        return logits, present

    def generate(self, input_ids: np.ndarray, max_new_tokens: int, eos: int | None = None) -> list[int]:
        """Greedy decoding with the KV cache: one prefill, then one token per step."""
        ids = np.asarray(input_ids, np.int64).reshape(1, -1)
        logits, past = self.forward(ids)
        out, n = [], ids.shape[1]
        for _ in range(max_new_tokens):
            tok = int(logits[0, -1].argmax())
            out.append(tok)
            if eos is not None and tok == eos:
                break
            logits, past = self.forward(np.array([[tok]]), past, n)
            n += 1
        return out


def evaluate_onnx(model: OrtModel, tokens, progress: bool = True) -> dict:
    """Perplexity over the windows `tokens` [n, seq_len] (the torch evaluator's protocol)."""
    from tqdm.auto import tqdm
    nll, count = 0.0, 0
    for row in tqdm(np.asarray(tokens), desc="evaluating (onnx)", leave=False, disable=not progress):
        logits, _ = model.forward(row[None])
        lg = logits[0, :-1].astype(np.float64)
        m = lg.max(-1, keepdims=True)
        logp = lg - m - np.log(np.exp(lg - m).sum(-1, keepdims=True))
        nll += float(-logp[np.arange(len(row) - 1), row[1:]].sum())
        count += len(row) - 1
    return {"ppl": float(np.exp(nll / count)), "nll": nll / count, "windows": int(len(tokens)), "tokens": count,
            "providers": model.providers}


def generate_torch(model, input_ids, max_new_tokens: int, eos: int | None = None) -> list[int]:
    """Greedy decoding with quantc's torch runtime (the same rule as OrtModel.generate)."""
    import torch
    ids = torch.as_tensor(np.asarray(input_ids, np.int64)).reshape(1, -1)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos if eos is not None else 0)
    return out[0, ids.shape[1]:].tolist()
