"""Evaluation: perplexity on a text, and the mean KL divergence of the next-token distribution
against the original model, over the same windows."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import QuantcError


def eval_tokens(text: str, tokenizer, seq_len: int = 512, windows: int | None = 80) -> torch.Tensor:
    """Non-overlapping windows of seq_len tokens from the start of the text: [n, seq_len]."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
    n = ids.numel() // seq_len
    if windows is not None:
        n = min(n, windows)
    if n == 0:
        raise QuantcError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len)


def read_text(path: str, join_lines: bool = False) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise QuantcError(f"{path}: not a UTF-8 text file (byte {e.start}); save it as UTF-8") from None
    # WikiText-style files hold one row per line; evaluation joins them with a blank line
    return "\n\n".join(line for line in text.splitlines() if line.strip()) if join_lines else text


@torch.no_grad()
def evaluate(model, tokens: torch.Tensor, reference=None, progress: bool = True) -> dict:
    """Perplexity of `model` on the windows; with a reference, KL(reference ‖ model) per token and the
    reference's own next-token loss (`ref_nll`, from the same forwards)."""
    nll, kl, ref_nll, count = 0.0, 0.0, 0.0, 0
    for ids in tqdm(tokens, desc="evaluating", leave=False, disable=not progress):
        ids = ids.unsqueeze(0)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        logp = F.log_softmax(logits, -1)
        nll += float(-logp.gather(1, ids[0, 1:, None]).sum())
        if reference is not None:
            ref = F.log_softmax(reference(input_ids=ids, use_cache=False).logits[0, :-1].float(), -1)
            kl += float((ref.exp() * (ref - logp)).sum())
            ref_nll += float(-ref.gather(1, ids[0, 1:, None]).sum())
        count += ids.shape[1] - 1
    out = {"ppl": math.exp(nll / count), "nll": nll / count, "windows": int(tokens.shape[0]),
           "tokens": count}
    if reference is not None:
        out["kl"], out["ref_nll"], out["ref_ppl"] = kl / count, ref_nll / count, math.exp(ref_nll / count)
    return out
