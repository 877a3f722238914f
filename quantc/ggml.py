"""llama.cpp's block formats (ggml-common.h, gguf-py's quants.py) as quantc grids: which type an
option gets for a linear, its exact bytes, how a block's grid is chosen from weights, and the codes
↔ block bytes ↔ dequantized weights, bit-exact with gguf-py's (and llama.cpp's) dequantization.

Every type here dequantizes a block of B weights as  value = s_j · L[u] − off_j  where u is the code
stored for the weight, L the type's levels (u − z for the linear types, a table for IQ4_NL) and
(s_j, off_j) the grid of the weight's sub-block j:

  type     B    sub  code bits  s_j (all products in float32)      off_j             bytes/block
  Q4_0     32   32   4          d                                  0                 18
  Q4_1     32   32   4          d                                  −m                20
  Q5_0     32   32   5          d                                  0                 22
  Q5_1     32   32   5          d                                  −m                24
  Q8_0     32   32   8          d                                  0                 34
  IQ4_NL   32   32   4 (table)  d                                  0                 18
  Q2_K     256  16   2          d · sc_j   (sc 4-bit)              dmin · m_j (4-bit)  84
  Q3_K     256  16   3          d · (sc_j − 32)  (sc 6-bit)        0                 110
  Q4_K     256  32   4          d · sc_j   (sc 6-bit)              dmin · m_j (6-bit)  144
  Q5_K     256  32   5          d · sc_j   (sc 6-bit)              dmin · m_j (6-bit)  176
  Q6_K     256  16   6          d · sc_j   (sc int8)               0                 210

d, dmin, m are fp16. `fields` below hold exactly what a block stores: codes "q" [R, nb, B] (uint8),
"d" (and "dmin" / "m") [R, nb] fp16, "sc" (and "mn") [R, nb, B/sub] integer sub-block scales (mins).

An Option names a family (Option.grid): "k" = llama.cpp's K-quants by bit width (Q2_K…Q6_K, 8-bit:
Q8_0), "ggml" = the group-32 types (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 by bits and sym). A K-quant needs rows
of whole super-blocks (in_features % 256 == 0); otherwise the linear gets the type llama.cpp's own
quantizer falls back to (llama-quant.cpp: Q2_K/Q3_K → IQ4_NL, Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from .errors import QuantcError

GRIDS = ("gptq", "k", "ggml")      # Option.grid: GPTQ's per-group grid (the default) or a llama.cpp family
IQ4NL_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@dataclass(frozen=True)
class GGMLType:
    name: str           # gguf's GGMLQuantizationType name
    block: int          # weights per block (super-block for the K types)
    sub: int            # weights per sub-block grid (s_j, off_j)
    bits: int           # code bits
    size: int           # bytes per block
    zero: int           # L[u] = u − zero (linear types)
    sc_bits: int = 0    # K types: bits of the sub-block scales (and mins)
    mins: bool = False  # off_j ≠ 0: Q4_1/Q5_1 (fp16 m), Q2_K/Q4_K/Q5_K (dmin · m_j)

    @property
    def levels(self) -> torch.Tensor:
        return _levels(self.name, "cpu")

    @property
    def label(self) -> str:
        return self.name.lower()


@functools.lru_cache(maxsize=None)
def _levels(name: str, device: str) -> torch.Tensor:
    """L[u] of a type, made once per device (the GPTQ column loop asks for it every column)."""
    t = TYPES[name]
    L = torch.tensor(IQ4NL_LEVELS) if name == "IQ4_NL" else torch.arange(2 ** t.bits) - t.zero
    return L.to(dtype=torch.float32, device=device)


TYPES = {t.name: t for t in (
    GGMLType("Q4_0", 32, 32, 4, 18, 8),
    GGMLType("Q4_1", 32, 32, 4, 20, 0, mins=True),
    GGMLType("Q5_0", 32, 32, 5, 22, 16),
    GGMLType("Q5_1", 32, 32, 5, 24, 0, mins=True),
    GGMLType("Q8_0", 32, 32, 8, 34, 128),
    GGMLType("IQ4_NL", 32, 32, 4, 18, 0),
    GGMLType("Q2_K", 256, 16, 2, 84, 0, sc_bits=4, mins=True),
    GGMLType("Q3_K", 256, 16, 3, 110, 4, sc_bits=6),
    GGMLType("Q4_K", 256, 32, 4, 144, 0, sc_bits=6, mins=True),
    GGMLType("Q5_K", 256, 32, 5, 176, 0, sc_bits=6, mins=True),
    GGMLType("Q6_K", 256, 16, 6, 210, 32, sc_bits=8),
)}
K_TYPES = {2: "Q2_K", 3: "Q3_K", 4: "Q4_K", 5: "Q5_K", 6: "Q6_K", 8: "Q8_0"}
GROUP32 = {(4, True): "Q4_0", (4, False): "Q4_1", (5, True): "Q5_0", (5, False): "Q5_1", (8, True): "Q8_0"}
FALLBACK = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
GRID_BITS = {"k": tuple(K_TYPES), "ggml": (4, 5, 8)}


def main_type(grid: str, bits: int, sym: bool = True) -> GGMLType:
    """The type an option of family `grid` names (before any fallback for a row length)."""
    if grid == "k":
        if bits not in K_TYPES:
            raise ValueError(f"grid k has no {bits}-bit type; allowed bits: {', '.join(map(str, K_TYPES))}")
        return TYPES[K_TYPES[bits]]
    if grid == "ggml":
        if (bits, sym) not in GROUP32:
            raise ValueError(f"grid ggml has no {bits}-bit {'sym' if sym else 'asym'} type; allowed: "
                             + ", ".join(f"{b}-bit {'sym' if s else 'asym'}" for b, s in GROUP32))
        return TYPES[GROUP32[(bits, sym)]]
    raise ValueError(f"grid {grid!r} is not a llama.cpp family; allowed: k, ggml")


def type_for(grid: str, bits: int, sym: bool, in_features: int, name: str = "linear") -> GGMLType:
    """The type a linear with `in_features` inputs gets: the option's own, or llama.cpp's fallback
    when its rows are not whole super-blocks."""
    t = main_type(grid, bits, sym)
    if in_features % t.block and t.name in FALLBACK:
        t = TYPES[FALLBACK[t.name]]
    if in_features % t.block:
        raise QuantcError(f"{name}: {in_features} inputs are not a multiple of {t.block}, which llama.cpp's "
                          f"{t.name} needs; give this linear a GPTQ option (grid: gptq) or keep it in 16-bit")
    return t


def stored_type(grid: str, bits: int, sym: bool, size: int) -> GGMLType:
    """The type of blocks stored for an option of family `grid` whose blocks are `size` bytes (the
    option's type or its fallback: their sizes differ)."""
    t = main_type(grid, bits, sym)
    for c in (t, TYPES.get(FALLBACK.get(t.name, ""))):
        if c is not None and c.size == size:
            return c
    raise QuantcError(f"blocks of {size} bytes are neither {t.name} nor its fallback")


def tensor_bytes(t: GGMLType, in_features: int, out_features: int) -> int:
    return out_features * (in_features // t.block) * t.size


# ---- choosing a block's grid -------------------------------------------------------------------

def nearest(t: GGMLType, x: torch.Tensor, s: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    """Codes of the levels nearest to x on the grid value = s·L[u] − off (s, off broadcast to x)."""
    y = torch.where(s != 0, (x + off) / torch.where(s != 0, s, torch.ones_like(s)), torch.zeros_like(x))
    if t.name == "IQ4_NL":
        L = _levels(t.name, str(x.device))
        return torch.bucketize(y, (L[1:] + L[:-1]) / 2).to(torch.int32)
    return (torch.round(y) + t.zero).clamp(0, 2 ** t.bits - 1).to(torch.int32)


def values(t: GGMLType, u: torch.Tensor, s: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    """s·L[u] − off in float32, the operations gguf-py's dequantization does, in its order."""
    L = _levels(t.name, str(u.device))
    return s * L[u.long()] - off


def _float_grid(t: GGMLType, xs: torch.Tensor, imp: torch.Tensor | None, mse: bool):
    """Unquantized (s, off) per sub-block of xs [R, n, sub]: range-based, or with `mse` the best, by
    importance-weighted squared error, of the shrunk ranges and their least-squares refits."""
    maxq = 2 ** t.bits - 1
    lo, hi = xs.min(-1).values, xs.max(-1).values
    if t.mins:
        if t.sc_bits:                     # K types: off = dmin·m ≥ 0, so the grid holds 0 or less
            lo = lo.clamp(max=0)

        def grid(p):
            s = (p * hi - p * lo) / maxq
            return s, -p * lo
    else:
        amax = torch.where(hi.abs() > lo.abs(), hi, lo)    # the signed extreme maps to the lowest level
        L0 = float(t.levels[0])

        def grid(p):
            return p * amax / L0, torch.zeros_like(amax)
    s, off = grid(1.0)
    if not mse:
        return s, off
    w = torch.ones_like(xs) if imp is None else imp.expand_as(xs)
    best = torch.full_like(s, float("inf"))

    def keep(sp, op):
        nonlocal s, off, best
        v = values(t, nearest(t, xs, sp[..., None], op[..., None]), sp[..., None], op[..., None])
        err = (w * (v - xs) ** 2).sum(-1)
        better = err < best
        best = torch.where(better, err, best)
        s, off = torch.where(better, sp, s), torch.where(better, op, off)

    for p in torch.linspace(1.0, 0.5, 26).tolist():
        sp, op = grid(p)
        keep(sp, op)
        keep(*_refit(t, xs, w, nearest(t, xs, sp[..., None], op[..., None]), sp, op))
    return s, off


def _refit(t: GGMLType, xs, w, u, s, off):
    """The weighted least-squares (s, off) for fixed codes u (as llama.cpp's make_qkx2_quants
    refines its scales): min Σ w·(s·L[u] − off − x)²; off stays ≥ 0 on the K types, 0 without mins."""
    L = _levels(t.name, str(xs.device))[u.long()]
    A, B, C = w.sum(-1), (w * L).sum(-1), (w * L * L).sum(-1)
    X, Y = (w * xs).sum(-1), (w * L * xs).sum(-1)
    safe = lambda d: torch.where(d != 0, d, torch.ones_like(d))   # noqa: E731
    s1 = torch.where(C > 0, Y / safe(C), s)                       # no offset
    if not t.mins:
        return s1, torch.zeros_like(s1)
    det = A * C - B * B
    s2 = torch.where(det > 0, (A * Y - B * X) / safe(det), s)
    m2 = torch.where(det > 0, (C * X - B * Y) / safe(det), -off)  # value = s·L + m, m = −off
    if t.sc_bits:                     # K types: the mins are ≥ 0 multiples of dmin (m ≤ 0), scales ≥ 0
        s2, m2 = torch.where(m2 > 0, s1, s2), m2.clamp(max=0)
        s2, m2 = torch.where(s2 > 0, s2, s), torch.where(s2 > 0, m2, -off)
    return s2, -m2


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16)


def block_grid(t: GGMLType, x: torch.Tensor, imp: torch.Tensor | None = None, mse: bool = False):
    """The grid of one block per row of x [R, B] (the current weights): returns (fields, s, off)
    with fields {"d", ("dmin" | "m"), ("sc", "mn")} as stored (d etc. fp16 [R], sc/mn int [R, n]) and
    the effective s, off [R, n] (float32, exactly as dequantization computes them). `imp` [B]:
    per-column importance (the Hessian diagonal) weighting the clip search."""
    R, B = x.shape
    n = B // t.sub
    xs = x.reshape(R, n, t.sub)
    ip = None if imp is None else imp.reshape(1, n, t.sub)
    s_f, off_f = _float_grid(t, xs, ip, mse)
    if not t.sc_bits:                                   # one fp16 scale (and min) per block
        d = _fp16(s_f[:, 0])
        fields = {"d": d}
        s = d.float()[:, None]
        off = torch.zeros_like(s)
        if t.mins:
            m = _fp16(-off_f[:, 0])
            fields["m"] = m
            off = -m.float()[:, None]
        return fields, s, off
    if t.mins:                                          # unsigned sub-scales and mins under fp16 d, dmin
        top = 2 ** t.sc_bits - 1
        d = _fp16(s_f.max(-1).values / top)
        dmin = _fp16(off_f.max(-1).values / top)
        sc = _ratio(s_f, d, 0, top)
        mn = _ratio(off_f, dmin, 0, top)
        s = d.float()[:, None] * sc.float()
        off = dmin.float()[:, None] * mn.float()
        return {"d": d, "dmin": dmin, "sc": sc, "mn": mn}, s, off
    # signed sub-scales (Q3_K: 6-bit stored +32, Q6_K: int8): the largest |s| maps to −2^(bits−1)
    half = 2 ** (t.sc_bits - 1)
    idx = s_f.abs().argmax(-1, keepdim=True)
    d = _fp16(s_f.gather(-1, idx)[:, 0] / -half)
    sc = _ratio(s_f, d, -half, half - 1)
    s = d.float()[:, None] * sc.float()
    fields = {"d": d, "sc": sc + (half if t.name == "Q3_K" else 0)}
    return fields, s, torch.zeros_like(s)


def _ratio(v: torch.Tensor, d: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    df = d.float()[:, None]
    r = torch.where(df != 0, v / torch.where(df != 0, df, torch.ones_like(df)), torch.zeros_like(v))
    return torch.round(r).clamp(lo, hi).to(torch.int32)


def grid_of(t: GGMLType, fields: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, off) [R, nb, n] of stored fields (d [R, nb]...), as dequantization computes them."""
    d = fields["d"].float()[..., None]
    if not t.sc_bits:
        off = -fields["m"].float()[..., None] if t.mins else torch.zeros_like(d)
        return d, off
    sc = fields["sc"].float() - (32 if t.name == "Q3_K" else 0)
    s = d * sc
    off = fields["dmin"].float()[..., None] * fields["mn"].float() if t.mins else torch.zeros_like(s)
    return s, off


RTN_ROWS = 8192     # rows per `rtn` call: the clip search's float32 temporaries are a few times a chunk


def rtn(t: GGMLType, W: torch.Tensor, mse: bool = False, rows: int | None = None):
    """Round-to-nearest on the type's grid: (codes [R, K] int32, fields [R, nb, ...]). Rows are
    quantized independently, so a big matrix (a 128k-vocab head) goes `rows` (RTN_ROWS) at a time,
    each chunk in float32, with the same bits as one call and a fraction of its temporaries."""
    rows = RTN_ROWS if rows is None else rows
    if W.shape[0] > rows:
        parts = [rtn(t, W[r:r + rows], mse, rows) for r in range(0, W.shape[0], rows)]
        return (torch.cat([q for q, _ in parts]),
                {k: torch.cat([f[k] for _, f in parts]) for k in parts[0][1]})
    W = W.float()
    R, K = W.shape
    nb = K // t.block
    blocks = W.reshape(R * nb, t.block)
    fields, s, off = block_grid(t, blocks, None, mse)
    sub = t.block // t.sub
    u = nearest(t, blocks.reshape(R * nb, sub, t.sub), s[..., None], off[..., None])
    return u.reshape(R, K), {k: v.reshape(R, nb, *v.shape[1:]) for k, v in fields.items()}


def dequantize(t: GGMLType, q: torch.Tensor, fields: dict) -> torch.Tensor:
    """codes [R, K] + fields → weights [R, K] float32, bit-exact with gguf-py's dequantize."""
    R, K = q.shape
    nb = K // t.block
    s, off = grid_of(t, fields)                          # [R, nb, n]
    u = q.reshape(R, nb, t.block // t.sub, t.sub)
    return values(t, u, s[..., None], off[..., None]).reshape(R, K)


# ---- block bytes (ggml-common.h layouts) -------------------------------------------------------

def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo & 15) | ((hi & 15) << 4)


def _bitplane(q: np.ndarray, bit: int, n: int) -> np.ndarray:
    """Bit `bit` of codes [.., n·8·w] set in bytes [.., w]: element e is bit e // w of byte e % w."""
    w = q.shape[-1] // n
    b = ((q >> bit) & 1).reshape(*q.shape[:-1], n, w)
    return sum((b[..., i, :] << i) for i in range(n)).astype(np.uint8)


def _crumbs(q: np.ndarray, parts: int) -> np.ndarray:
    """2-bit values: element e = part·32 + l of each 32·parts run is bits 2·part of byte l."""
    c = (q & 3).reshape(*q.shape[:-1], -1, parts, 32)
    return sum((c[..., i, :] << (2 * i)) for i in range(parts)).reshape(*q.shape[:-1], -1).astype(np.uint8)


def _k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 bytes of eight 6-bit scales and mins."""
    out = np.zeros(sc.shape[:-1] + (12,), np.uint8)
    out[..., 0:4] = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
    out[..., 4:8] = (mn[..., :4] & 63) | ((mn[..., 4:] >> 4) << 6)
    out[..., 8:12] = (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)
    return out


def pack(t: GGMLType, q: torch.Tensor, fields: dict) -> torch.Tensor:
    """codes [R, K] + fields [R, nb, ...] → blocks uint8 [R, nb, t.size] as llama.cpp stores them."""
    R, K = q.shape
    nb = K // t.block
    u = q.cpu().numpy().astype(np.uint8).reshape(R, nb, t.block)
    f = {k: v.cpu().numpy() for k, v in fields.items()}

    def h(name):                                         # fp16 → its 2 bytes
        return f[name].astype(np.float16).reshape(R, nb, 1).view(np.uint8)

    if t.name in ("Q4_0", "IQ4_NL"):
        parts = [h("d"), _nibbles(u[..., :16], u[..., 16:])]
    elif t.name == "Q4_1":
        parts = [h("d"), h("m"), _nibbles(u[..., :16], u[..., 16:])]
    elif t.name in ("Q5_0", "Q5_1"):
        bits = ((u >> 4) & 1).astype(np.uint32)
        qh = (bits << np.arange(32, dtype=np.uint32)).sum(-1, dtype=np.uint32).astype("<u4")
        qh = qh.reshape(R, nb, 1).view(np.uint8)
        parts = [h("d")] + ([h("m")] if t.name == "Q5_1" else []) + [qh, _nibbles(u[..., :16], u[..., 16:])]
    elif t.name == "Q8_0":
        parts = [h("d"), (u.astype(np.int16) - 128).astype(np.int8).view(np.uint8)]
    elif t.name == "Q2_K":
        scales = (f["sc"] & 15) | ((f["mn"] & 15) << 4)
        parts = [scales.astype(np.uint8), _crumbs(u, 4), h("d"), h("dmin")]
    elif t.name == "Q3_K":
        sc = f["sc"].astype(np.uint8)
        scales = np.zeros((R, nb, 12), np.uint8)
        scales[..., 0:8] = (sc[..., 0:8] & 15) | ((sc[..., 8:16] & 15) << 4)
        scales[..., 8:12] = sum(((sc[..., 4 * i:4 * i + 4] >> 4) & 3) << (2 * i) for i in range(4))
        parts = [_bitplane(u, 2, 8), _crumbs(u, 4), scales, h("d")]
    elif t.name in ("Q4_K", "Q5_K"):
        lo = (u & 15).reshape(R, nb, 4, 2, 32)
        qs = _nibbles(lo[..., 0, :], lo[..., 1, :]).reshape(R, nb, 128)
        qh = [_bitplane(u, 4, 8)] if t.name == "Q5_K" else []
        parts = [h("d"), h("dmin"), _k_scales(f["sc"].astype(np.uint8), f["mn"].astype(np.uint8))] + qh + [qs]
    elif t.name == "Q6_K":
        lo = (u & 15).reshape(R, nb, 2, 2, 64)
        ql = _nibbles(lo[..., 0, :], lo[..., 1, :]).reshape(R, nb, 128)
        qh = _crumbs(u >> 4, 4)
        parts = [ql, qh, f["sc"].astype(np.int8).view(np.uint8), h("d")]
    else:
        raise QuantcError(f"quantc does not write {t.name}")
    out = np.concatenate(parts, axis=-1)
    assert out.shape[-1] == t.size, (t.name, out.shape)
    return torch.from_numpy(np.ascontiguousarray(out))


def unpack(t: GGMLType, blocks: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """blocks uint8 [R, nb, t.size] → (codes [R, K] int32, fields): the inverse of `pack`."""
    b = blocks.cpu().numpy().astype(np.uint8)
    R, nb, _ = b.shape

    def h(at):
        return torch.from_numpy(np.ascontiguousarray(b[..., at:at + 2]).view(np.float16)[..., 0].copy())

    def nib(qs):                                         # 16 bytes → 32 codes (j | j+16 << 4)
        return np.concatenate([qs & 15, qs >> 4], -1)

    def planes(qh, n):                                   # bytes [.., w] → bits [.., n·w]: e → bit e // w of byte e % w
        return np.concatenate([(qh >> i) & 1 for i in range(n)], -1)

    def crumbs(qs, parts):                               # inverse of _crumbs over runs of 32 bytes
        c = qs.reshape(R, nb, -1, 1, 32) >> (2 * np.arange(parts, dtype=np.uint8)).reshape(1, 1, 1, parts, 1)
        return (c & 3).reshape(R, nb, -1)

    f: dict = {"d": None}
    if t.name in ("Q4_0", "IQ4_NL"):
        f["d"], u = h(0), nib(b[..., 2:18])
    elif t.name == "Q4_1":
        f["d"], f["m"], u = h(0), h(2), nib(b[..., 4:20])
    elif t.name in ("Q5_0", "Q5_1"):
        at = 2 if t.name == "Q5_0" else 4
        f["d"] = h(0)
        if t.name == "Q5_1":
            f["m"] = h(2)
        qh = np.ascontiguousarray(b[..., at:at + 4]).view("<u4")[..., 0]
        hi = (qh[..., None] >> np.arange(32, dtype=np.uint32)) & 1
        u = nib(b[..., at + 4:at + 20]) | (hi.astype(np.uint8) << 4)
    elif t.name == "Q8_0":
        f["d"], u = h(0), (b[..., 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    elif t.name == "Q2_K":
        sc = b[..., 0:16]
        f.update(sc=sc & 15, mn=sc >> 4)
        u, f["d"], f["dmin"] = crumbs(b[..., 16:80], 4), h(80), h(82)
    elif t.name == "Q3_K":
        u = crumbs(b[..., 32:96], 4) | (planes(b[..., 0:32], 8) << 2)
        s = b[..., 96:108]
        lo = np.concatenate([s[..., 0:8] & 15, s[..., 0:8] >> 4], -1)
        hi = np.concatenate([(s[..., 8:12] >> (2 * i)) & 3 for i in range(4)], -1)
        f["sc"], f["d"] = lo | (hi << 4), h(108)
    elif t.name in ("Q4_K", "Q5_K"):
        f["d"], f["dmin"] = h(0), h(2)
        s = b[..., 4:16]
        f["sc"] = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], -1)
        f["mn"] = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], -1)
        qs = b[..., -128:].reshape(R, nb, 4, 32)
        u = np.concatenate([qs & 15, qs >> 4], -1).reshape(R, nb, 256)
        if t.name == "Q5_K":
            u = u | (planes(b[..., 16:48], 8) << 4)
    elif t.name == "Q6_K":
        ql = b[..., 0:128].reshape(R, nb, 2, 64)
        lo = np.concatenate([ql & 15, ql >> 4], -1).reshape(R, nb, 256)
        u = lo | (crumbs(b[..., 128:192], 4) << 4)
        f["sc"], f["d"] = b[..., 192:208].view(np.int8), h(208)
    else:
        raise QuantcError(f"quantc does not read {t.name}")
    fields = {k: (v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v).astype(np.int32)))
              for k, v in f.items()}
    return torch.from_numpy(np.ascontiguousarray(u).astype(np.int32)).reshape(R, nb * t.block), fields


def dequantize_blocks(t: GGMLType, blocks: torch.Tensor) -> torch.Tensor:
    q, fields = unpack(t, blocks)
    return dequantize(t, q, fields)
