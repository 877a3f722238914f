"""Triton kernels for GPTQ-packed linears: y = x · Wᵀ with W dequantized on the fly from
qweight/qzeros/scales/g_idx (2, 3, 4, 8 bits; groups; act-order through g_idx).

Two kernels: a GEMV-style one for decode (few rows of x; a broadcast-multiply-reduce, no tensor
cores needed) and a GEMM for prefill (tl.dot on tiles). The packed format is GPTQ v1 exactly as the
exporter writes it (see packing.py): value k of a column sits at bit k·bits of the column's int32
bit stream, so a 3-bit value may straddle two words. On CPU tensors they run under
TRITON_INTERPRET=1 (tests); the runtime selects them automatically for CUDA tensors.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # the torch dequantize path is used instead
    HAVE_TRITON = False


if HAVE_TRITON:
    @triton.jit
    def _unpack(packed_ptr, row_stride, cols, idx, BITS: tl.constexpr, mask):
        """Integer value number `idx` (along the packed dim) of column `cols`: [R, C] tensors."""
        pos = idx * BITS
        word = pos // 32
        off = pos % 32
        lo = tl.load(packed_ptr + word * row_stride + cols, mask=mask, other=0).to(tl.uint32, bitcast=True)
        v = lo >> off.to(tl.uint32)
        if BITS == 3:                      # 3-bit values 10 and 21 of every 32 straddle two words
            straddle = off > 29
            hi = tl.load(packed_ptr + (word + 1) * row_stride + cols, mask=mask & straddle, other=0)
            hi = hi.to(tl.uint32, bitcast=True)
            shift = tl.where(straddle, 32 - off, 0).to(tl.uint32)
            v = v | tl.where(straddle, hi << shift, 0)
        return (v & ((1 << BITS) - 1)).to(tl.int32)

    @triton.jit
    def _dequant_tile(qw_ptr, qz_ptr, sc_ptr, gi_ptr, N, K, zstride, offs_k, offs_n, BITS: tl.constexpr):
        """Dequantized W[k, n] tile for k in offs_k, n in offs_n: [BK, BN] float32."""
        kmask = offs_k < K
        nmask = offs_n < N
        m2 = kmask[:, None] & nmask[None, :]
        q = _unpack(qw_ptr, N, offs_n[None, :], offs_k[:, None], BITS, m2)
        g = tl.load(gi_ptr + offs_k, mask=kmask, other=0)
        s = tl.load(sc_ptr + g[:, None] * N + offs_n[None, :], mask=m2, other=0.0).to(tl.float32)
        # zeros: packed along N inside row g of qzeros
        zpos = offs_n[None, :] * BITS
        zword = zpos // 32
        zoff = zpos % 32
        zlo = tl.load(qz_ptr + g[:, None] * zstride + zword, mask=m2, other=0).to(tl.uint32, bitcast=True)
        z = zlo >> zoff.to(tl.uint32)
        if BITS == 3:
            straddle = zoff > 29
            zhi = tl.load(qz_ptr + g[:, None] * zstride + zword + 1, mask=m2 & straddle, other=0)
            zhi = zhi.to(tl.uint32, bitcast=True)
            z = z | tl.where(straddle, zhi << tl.where(straddle, 32 - zoff, 0).to(tl.uint32), 0)
        z = (z & ((1 << BITS) - 1)).to(tl.int32) + 1          # v1 stores zero - 1
        return (q - z).to(tl.float32) * s

    @triton.jit
    def _gemv_kernel(x_ptr, qw_ptr, qz_ptr, sc_ptr, gi_ptr, y_ptr, M, N, K, zstride,
                     BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One program: one row of x, BLOCK_N outputs; reduce over K in BLOCK_K steps."""
        row = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + row * K + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            w = _dequant_tile(qw_ptr, qz_ptr, sc_ptr, gi_ptr, N, K, zstride, offs_k, offs_n, BITS)
            acc += tl.sum(x[:, None] * w, axis=0)
        tl.store(y_ptr + row * N + offs_n, acc.to(y_ptr.dtype.element_ty), mask=offs_n < N)

    @triton.jit
    def _gemm_kernel(x_ptr, qw_ptr, qz_ptr, sc_ptr, gi_ptr, y_ptr, M, N, K, zstride,
                     BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xm = (offs_m[:, None] < M) & (offs_k[None, :] < K)
            x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=xm, other=0.0)
            w = _dequant_tile(qw_ptr, qz_ptr, sc_ptr, gi_ptr, N, K, zstride, offs_k, offs_n, BITS)
            # fp32 operands: Triton's default on NVIDIA is TF32 (a 10-bit mantissa, ~3e-4 relative
            # error against the fp32 reference); "ieee" keeps the product exact in fp32
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        ym = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=ym)


GEMV_MAX_ROWS = 8


def gptq_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                g_idx: torch.Tensor, bits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] · Wᵀ → [..., N] with W dequantized on the fly (Triton)."""
    if not HAVE_TRITON:
        raise RuntimeError("Triton is not installed: pip install 'quantc[kernels]'")
    K, N = g_idx.numel(), scales.shape[1]
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    y = out if out is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
    zstride = qzeros.shape[1]
    if M <= GEMV_MAX_ROWS:
        grid = (M, triton.cdiv(N, 64))
        _gemv_kernel[grid](x2, qweight, qzeros, scales, g_idx, y, M, N, K, zstride,
                           BITS=bits, BLOCK_N=64, BLOCK_K=64)
    else:
        grid = (triton.cdiv(M, 32), triton.cdiv(N, 64))
        _gemm_kernel[grid](x2, qweight, qzeros, scales, g_idx, y, M, N, K, zstride,
                           BITS=bits, BLOCK_M=32, BLOCK_N=64, BLOCK_K=32)
    return y.reshape(*x.shape[:-1], N)
