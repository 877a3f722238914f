"""GPTQ int32 packing, shared by the exporter and the runtime.

GPTQ (v1 "gptq" checkpoint format, as GPTQModel and vLLM read it) stores b-bit integers as a
little-endian bit stream cut into int32 words: every 32 values take exactly `bits` words, and
value j of such a run sits at bit offset bits*j. For 2, 4 and 8 bits no value straddles two words;
for 3 bits values 10 and 21 of each run of 32 straddle a word boundary (the classic 3-word layout).

- qweight [in_features * bits / 32, out_features]: packed along the input (K) dimension.
- qzeros  [n_groups, out_features * bits / 32]: packed along the output (N) dimension, each
  zero point stored as zero - 1 (the v1 convention readers undo with +1).
- scales  [n_groups, out_features], g_idx [in_features] (group of each input channel).
"""
from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def _check(bits: int, n: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if n % 32:
        raise ValueError(f"packed dimension must be a multiple of 32, got {n}")


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers in [0, 2^bits) along dim 0: [n, m] -> int32 [n * bits / 32, m]."""
    n, m = q.shape
    _check(bits, n)
    q = q.to(torch.int64).reshape(n // 32, 32, m)
    pos = torch.arange(32, dtype=torch.int64) * bits          # bit offset of each value in its run
    word, off = pos // 32, pos % 32
    out = torch.zeros(n // 32, bits, m, dtype=torch.int64)
    for j in range(32):                                        # 32 vectorised steps, any bit width
        v = q[:, j, :] << off[j]
        out[:, word[j], :] |= v & 0xFFFFFFFF
        if off[j] + bits > 32:                                 # 3-bit values that straddle a word
            out[:, word[j] + 1, :] |= v >> 32
    out = out.reshape(n * bits // 32, m)
    # reinterpret the unsigned 32-bit words as int32 (two's complement)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_rows: int32 [n * bits / 32, m] -> int32 [n, m] in [0, 2^bits)."""
    rows, m = packed.shape
    if bits not in SUPPORTED_BITS or rows % bits:
        raise ValueError(f"cannot unpack {rows} rows at {bits} bits")
    w = packed.to(torch.int64) & 0xFFFFFFFF
    w = w.reshape(rows // bits, bits, m)
    pos = torch.arange(32, dtype=torch.int64) * bits
    word, off = pos // 32, pos % 32
    mask = (1 << bits) - 1
    out = torch.empty(rows // bits, 32, m, dtype=torch.int64)
    for j in range(32):
        v = w[:, word[j], :] >> off[j]
        if off[j] + bits > 32:
            v = v | (w[:, word[j] + 1, :] << (32 - off[j]))
        out[:, j, :] = v & mask
    return out.reshape(rows // bits * 32, m).to(torch.int32)


def pack_cols(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack along the last dim: [g, n] -> int32 [g, n * bits / 32]."""
    return pack_rows(q.t().contiguous(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_rows(packed.t().contiguous(), bits).t().contiguous()


def pack_gptq(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
              bits: int) -> dict[str, torch.Tensor]:
    """Pack integer weights q [out, in], zero points [n_groups, out] (true zeros, not zero-1),
    scales [n_groups, out] and g_idx [in] into the GPTQ v1 tensors."""
    maxq = 2**bits - 1
    if int(zeros.min()) < 1 or int(zeros.max()) > maxq:
        # v1 stores zero-1; a zero of 0 would wrap to maxq and readers would decode it as 2^bits.
        raise ValueError("GPTQ v1 zero points must lie in [1, 2^bits - 1]")
    return {
        "qweight": pack_rows(q.t().contiguous(), bits),
        "qzeros": pack_cols(zeros.to(torch.int64) - 1, bits),
        "scales": scales.to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                    g_idx: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """GPTQ v1 tensors -> dense weight [out, in] in `dtype`, rounded once: (q − z)·s is exact in float32
    (an integer of at most 8 bits times a float16 scale needs 19 mantissa bits), so computing it there
    and casting gives each weight its nearest `dtype` value, where computing in bfloat16 rounded the
    scale and then the product."""
    q = unpack_rows(qweight, bits)                          # [in, out]
    zeros = unpack_cols(qzeros, bits) + 1                   # v1: stored zero - 1
    g = g_idx.long()
    work = torch.float64 if dtype == torch.float64 else torch.float32
    w = (q.to(work) - zeros[g].to(work)) * scales.to(work)[g]   # [in, out]
    return w.to(dtype).t().contiguous()


def packed_bytes(in_features: int, out_features: int, bits: int, group_size: int,
                 act_order: bool = True) -> int:
    """Bytes the exporter writes for one quantized linear: qweight + qzeros + scales (fp16) + g_idx.
    g_idx is always written (GPTQ readers expect it); `act_order` is accepted for clarity only."""
    groups = n_groups(in_features, group_size)
    qweight = in_features * bits // 32 * out_features * 4
    qzeros = groups * (out_features * bits // 32) * 4
    scales = groups * out_features * 2
    gidx = in_features * 4
    return qweight + qzeros + scales + gidx


def n_groups(in_features: int, group_size: int) -> int:
    gs = in_features if group_size <= 0 else group_size
    return -(-in_features // gs)
