"""Hadamard rotation folded into the weights (QuaRot / SpinQuant's R1 and R2), before calibration.

A rotation spreads the few large outlier channels of the residual stream (and of the attention values)
over all channels, so a grid of a few bits fits every group better. quantc folds it into the weights
and adds no online operation: the artifact is a plain GPTQ checkpoint that every runtime loads.

- Norms into the linears: input_layernorm's weight g goes into q/k/v (W ← W·diag(g)),
  post_attention_layernorm's into gate/up, the final norm's into lm_head; the norm weights become 1.
  (RMSNorm only: rms(R1ᵀh) = rms(h) for an orthogonal R1, so the normalisation commutes.)
- R1 (a randomized Hadamard of order hidden_size, seeded by `quant.rotate_seed`) rotates the residual
  stream h ↦ R1ᵀh: embeddings E ← E·R1; linears that read the residual W ← W·diag(g)·R1; linears
  that write it (o_proj, down_proj) W ← R1ᵀ·W, and their bias b ← R1ᵀ·b.
- R2 (a randomized Hadamard of order head_dim) rotates every attention head's values: v_proj's output
  rows per kv head W ← R2ᵀ·W (bias too), o_proj's input columns per q head W ← W·R2. One R2 for every
  head, so a q head meets its kv group's values rotated by the same matrix (GQA needs nothing else).
- A tied lm_head cannot stay tied (the final norm is folded into the head, not into the embeddings):
  the rotated model has its own lm_head, written in 16-bit like the embeddings.

For lazily loaded models (lazy.py) the decoder layers stay on disk: the model's weight source is
wrapped so that every tensor comes out rotated when a layer is materialized or read back by the
exporter (`RotatedSource`); each tensor is a pure function of its layer's tensors, R1, R2 and the
family facts below (`rotate_layer`). Embeddings, final norm and head are rotated once, at load.

Hadamard matrices of order m·2^k: a Sylvester 2^k Kronecker a Paley matrix of order m (Paley I:
m = q + 1 for a prime q ≡ 3 mod 4, e.g. 12, 20, 24, 32, 44, 48, 60; Paley II: m = 2(q + 1) for a prime
q ≡ 1 mod 4, e.g. 28, 36, 60, 76). A size with no such construction is refused, naming the size
(no silent fallback to another rotation): SmolLM2's 576 = 36·16 and Qwen2.5-0.5B's 896 = 28·32 work.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from .errors import QuantcError

from .family import BY_TYPE

log = logging.getLogger("quantc")

ROTATIONS = ("none", "hadamard")

# What the rotation folds, per model_type: from the family module (family.py), the one home of such facts
FAMILY_FACTS = {t: f.rotation_facts() for t, f in BY_TYPE.items() if f.rotation_facts() is not None}


# ------------------------------------------------------------------ Hadamard matrices

def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i), the quadratic character of GF(q) (q prime)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = [0] + [1 if a in squares else -1 for a in range(1, q)]
    return torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)


def _paley(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order m from a Paley construction, or None when there is none."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    q = m - 1
    if m % 4 == 0 and _is_prime(q) and q % 4 == 3:          # Paley I: I + [[0, 1ᵀ], [−1, Q]]
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
        return torch.eye(m, dtype=torch.float64) + s
    q = m // 2 - 1
    if m % 4 == 0 and _is_prime(q) and q % 4 == 1:          # Paley II from the conference matrix C
        c = torch.zeros(m // 2, m // 2, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
        a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, a) + torch.kron(torch.eye(m // 2, dtype=torch.float64), b)
    return None


@lru_cache(maxsize=None)
def hadamard_factors(n: int) -> tuple[int, int] | None:
    """(m, 2^k) with n = m·2^k and a Paley matrix of order m (the smallest such m), or None."""
    p = n & -n                                   # the largest power of 2 dividing n
    while p >= 1:
        if _paley(n // p) is not None:
            return n // p, p
        p //= 2
    return None


def _sylvester(p: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def check_size(n: int, what: str) -> tuple[int, int]:
    """(m, 2^k) of order n, or an error naming the size (no fallback to another rotation)."""
    f = hadamard_factors(n) if n > 0 else None
    if f is None:
        raise QuantcError(f"no Hadamard matrix of order {n} ({what}) is known to quantc (it builds orders m·2^k "
                          "with m = 1, 2, q + 1 for a prime q ≡ 3 mod 4, or 2(q + 1) for a prime q ≡ 1 mod 4); "
                          "use quant.rotate: none for this model")
    return f


def hadamard(n: int) -> torch.Tensor:
    """A ±1 matrix H of order n with H·Hᵀ = n·I (float64); a clear error when quantc cannot build one."""
    m, p = check_size(n, "requested")
    return torch.kron(_paley(m), _sylvester(p))


class RandomHadamard:
    """R = diag(s)·H/√n with seeded random signs s: orthogonal. Applied through the Kronecker factors
    of H = P ⊗ S (O(n·(m + 2^k)) per row, not O(n²)), in float64."""

    def __init__(self, n: int, seed: int, what: str = ""):
        m, p = check_size(n, what)
        self.n, self.m, self.p = n, m, p
        self.P, self.S = _paley(m), _sylvester(p)
        g = torch.Generator().manual_seed(seed)
        self.signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1

    @property
    def matrix(self) -> torch.Tensor:
        return self.signs[:, None] * torch.kron(self.P, self.S) / math.sqrt(self.n)

    def right(self, w: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """w·R over the last dimension, computed in float64, returned in `dtype`; in row blocks, so
        an embedding's float64 temporaries stay small."""
        if w.dim() == 2 and w.shape[0] > self.ROWS:
            return torch.cat([self.right(w[i:i + self.ROWS], dtype) for i in range(0, w.shape[0], self.ROWS)])
        x = (w.to(torch.float64) * self.signs).reshape(*w.shape[:-1], self.m, self.p)
        y = torch.einsum("...ab,ac,bd->...cd", x, self.P, self.S)
        return (y.reshape(w.shape) / math.sqrt(self.n)).to(dtype)

    ROWS = 16384

    def left_t(self, w: torch.Tensor) -> torch.Tensor:
        """Rᵀ·w over the first dimension (float64)."""
        return self.right(w.T).T if w.dim() == 2 else self.right(w)

    def describe(self) -> str:
        return f"{self.n} = {self.m}×{self.p}" if self.m > 1 else str(self.n)


# ------------------------------------------------------------------ the rotation of one model

@dataclass
class Rotation:
    """R1, R2 and the family facts of one model: everything a tensor's rotation depends on."""
    r1: RandomHadamard
    r2: RandomHadamard
    facts: dict
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool                       # the source ties lm_head to the embeddings
    seed: int

    def record(self, head_bytes: int | None = None) -> dict:
        """What the manifest says about the rotation."""
        rec = {"kind": "hadamard", "seed": self.seed, "r1": self.r1.describe(), "r2": self.r2.describe(),
               "untied_lm_head": self.tied}
        if head_bytes is not None and self.tied:
            rec["untied_lm_head_bytes"] = head_bytes
        return rec


def model_dims(config) -> tuple[int, int, int, int]:
    """hidden, heads, kv heads, head_dim of a transformers config."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return hidden, heads, kv, head_dim


def check_config(config) -> None:
    """Refuse a model the rotation cannot handle (preflight calls it before any weight is read)."""
    if config.model_type not in FAMILY_FACTS:
        raise QuantcError(f"hadamard is not available for model_type {config.model_type!r}; it supports "
                          f"{', '.join(FAMILY_FACTS)}; use quant.rotate: none for this model")
    hidden, _, _, head_dim = model_dims(config)
    check_size(hidden, "hidden_size")
    check_size(head_dim, "head_dim")


def rotation_for(config, seed: int) -> Rotation:
    check_config(config)
    hidden, heads, kv, head_dim = model_dims(config)
    return Rotation(RandomHadamard(hidden, seed, "hidden_size"), RandomHadamard(head_dim, seed + 1, "head_dim"),
                    FAMILY_FACTS[config.model_type], heads, kv, head_dim,
                    bool(getattr(config, "tie_word_embeddings", False)), seed)


def _reader_norms(facts: dict) -> dict[str, str]:
    """Linear (inside a layer) → the norm whose output it reads."""
    return {lin: norm for norm, lins in facts["norms"].items() for lin in lins}


def layer_needs(name: str, rot: Rotation) -> list[str]:
    """The layer tensors (names inside the layer) that tensor `name`'s rotation reads."""
    module, _, leaf = name.rpartition(".")
    norm = _reader_norms(rot.facts).get(module)
    return [name, f"{norm}.weight"] if norm and leaf == "weight" else [name]


def rotate_layer_tensor(name: str, tensors: dict[str, torch.Tensor], rot: Rotation) -> torch.Tensor:
    """One tensor of a decoder layer, rotated (`tensors` holds at least `layer_needs(name)`)."""
    facts, t = rot.facts, tensors[name]
    module, _, leaf = name.rpartition(".")
    norm = _reader_norms(facts).get(module)
    d = rot.head_dim
    if module in facts["norms"] and leaf == "weight":
        return torch.ones_like(t)                                   # folded into the readers
    if norm is not None:
        if leaf == "weight":
            w = rot.r1.right(t.to(torch.float64) * tensors[f"{norm}.weight"].to(torch.float64))
        else:
            w = t.to(torch.float64)                                 # outputs are not in the residual
        if module == facts["value"]:           # values rotated per kv head: R2ᵀ·(the head's rows)
            w = rot.r2.left_t(w.reshape(rot.kv_heads, d, -1).transpose(0, 1).reshape(d, -1))
            w = w.reshape(d, rot.kv_heads, -1).transpose(0, 1).reshape(t.shape)
        return w.to(t.dtype)
    if module in facts["writers"]:
        w = rot.r1.left_t(t.to(torch.float64))
        if module == facts["output"] and leaf == "weight":          # input columns per q head: ·R2
            w = rot.r2.right(w.reshape(w.shape[0], rot.heads, d)).reshape(w.shape)
        return w.to(t.dtype)
    return t


def rotate_layer(tensors: dict[str, torch.Tensor], rot: Rotation) -> dict[str, torch.Tensor]:
    """A decoder layer's tensors (names inside the layer) → the rotated ones: a pure function."""
    return {n: rotate_layer_tensor(n, tensors, rot) for n in tensors}


def rotated_tensor(key: str, read, rot: Rotation) -> torch.Tensor:
    """Model tensor `key` rotated, reading the source tensors it depends on with `read(key)`."""
    f = rot.facts
    if key.startswith(f["layers"]):
        i, _, name = key[len(f["layers"]):].partition(".")
        prefix = f"{f['layers']}{i}."
        return rotate_layer_tensor(name, {n: read(prefix + n) for n in layer_needs(name, rot)}, rot)
    if key == f["embed"]:
        t = read(key)
        return rot.r1.right(t, t.dtype)
    if key == f["final_norm"]:
        return torch.ones_like(read(key))
    if key == f["head"]:
        t = read(f["embed"] if rot.tied else key)
        return rot.r1.right(t * read(f["final_norm"]), t.dtype)
    return read(key)


class RotatedSource:
    """A lazy model's weight source (lazy.WeightSource) whose tensors come out rotated: decoder layers
    materialized by lazy.materialize and tensors read back by the exporter are the rotated ones."""

    def __init__(self, base, rot: Rotation):
        self.base, self.rot = base, rot
        self.folder, self.files = base.folder, base.files
        self.index = dict(base.index)
        if rot.tied:                                 # the untied head: computed from the embeddings
            self.index[rot.facts["head"]] = base.index[rot.facts["embed"]]

    def get(self, key: str, dtype=torch.float32, check: bool = False) -> torch.Tensor:
        t = rotated_tensor(key, lambda k: self.base.get(k, torch.float32, check), self.rot)
        return t.to(dtype) if t.is_floating_point() else t


def rotate_model(model: nn.Module, seed: int = 0) -> Rotation:
    """Rotate `model` (loaded by model.load_model, lazily or not) in place; return the rotation.
    Lazy models: the outside tensors now, the decoder layers when they are materialized."""
    from .lazy import _set, is_lazy
    from .model import decoder_layers, layer_linears
    if getattr(model, "_quantc_rotation", None) is not None:
        raise QuantcError("the model is rotated already; rotating it again would change its function")
    rot = rotation_for(model.config, seed)
    f = rot.facts
    known = set(_reader_norms(f)) | set(f["writers"])
    found = set(layer_linears(decoder_layers(model)[0]))      # names only: a lazy layer on meta is enough
    if found != known:         # a linear the table does not place would silently break the model's function
        raise QuantcError(f"quant.rotate: hadamard: decoder layer 0 has linears {sorted(found ^ known)} that the "
                          f"rotation table of {model.config.model_type} does not expect; use quant.rotate: none")
    if is_lazy(model):
        model._quantc_source = src = RotatedSource(model._quantc_source, rot)
        new = {k: src.get(k) for k in (f["embed"], f["final_norm"], f["head"])}
    else:
        source = {k: p.data for k, p in model.named_parameters(remove_duplicate=False)}
        read = source.__getitem__
        if rot.tied:
            source.setdefault(f["head"], source[f["embed"]])
        new = {k: rotated_tensor(k, read, rot) for k in source}    # every value before any is replaced
    for k, v in new.items():
        _set(model, k, v.contiguous())                # a new Parameter: lm_head no longer shares the embeddings
    model.config.tie_word_embeddings = False
    model._quantc_rotation = rot
    log.info("rotation: randomized Hadamard R1 (hidden %s) and R2 (head_dim %s), seed %d, folded into the "
             "weights%s", rot.r1.describe(), rot.r2.describe(), seed,
             "; lm_head untied from the embeddings" if rot.tied else "")
    return rot


def apply(model: nn.Module, cfg) -> Rotation | None:
    """The compile's hook: rotate as `quant.rotate` asks (nothing for `none`)."""
    if cfg.rotate == "none":
        return None
    return rotate_model(model, cfg.rotate_seed)


def untied_head_bytes(model, cfg) -> int:
    """The bytes of the lm_head that `quant.rotate` unties from a tied model's embeddings (a second
    vocab × hidden matrix in the export dtype), 0 where nothing is untied. They count in the budget:
    a plan pays for every byte its compile adds to the checkpoint. Works on the rotated model and on
    the unrotated skeleton the preflight reads."""
    rot = getattr(model, "_quantc_rotation", None)
    tied = rot.tied if rot is not None else cfg.rotate != "none" and bool(
        getattr(model.config, "tie_word_embeddings", False))
    if not tied:
        return 0
    return model.config.vocab_size * model.config.hidden_size * torch.finfo(getattr(torch, cfg.export_dtype)).bits // 8


def rotation_record(model, dtype: torch.dtype) -> dict | None:
    """The manifest's `rotation` entry (None without one): the rotation, and the bytes of the lm_head
    it untied (written in the export dtype; counted in the budget, see `untied_head_bytes`)."""
    rot = getattr(model, "_quantc_rotation", None)
    if rot is None:
        return None
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    return rot.record(vocab * hidden * torch.finfo(dtype).bits // 8)
