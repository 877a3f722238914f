"""GPU benchmark of the Triton GPTQ GEMV (decode, batch 1) at 4096×4096 and 4096×14336 for 2/3/4/8
bits, as achieved bandwidth (bytes of packed weights + scales + zeros + g_idx + x + y per call) over
the card's measured device-to-device copy bandwidth, against torch's fp16 matmul.

    python -m benchmarks.bench_kernels        # needs a CUDA GPU; writes a section of RESULTS.md
"""
from __future__ import annotations

import sys

import torch

SHAPES = [(4096, 4096), (4096, 14336)]   # (K, N)


def timed(fn, iters=200) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1e3


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench_kernels needs a CUDA GPU (torch.cuda.is_available() is False); "
                 "kernel correctness on CPU is covered by tests/test_kernels.py under TRITON_INTERPRET=1")
    from quantc.kernels import gptq_matmul
    from quantc.packing import pack_gptq
    buf = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(buf)
    copy_bw = 2 * buf.numel() / timed(lambda: dst.copy_(buf), 50)
    rows = [f"Device: {torch.cuda.get_device_name()}, measured copy bandwidth {copy_bw / 1e9:.0f} GB/s", "",
            "| K×N | kernel | µs | GB/s | share of copy bandwidth |", "|---|---|---|---|---|"]
    for K, N in SHAPES:
        x = torch.randn(1, K, device="cuda", dtype=torch.float16)
        w16 = torch.randn(N, K, device="cuda", dtype=torch.float16)
        t = timed(lambda: x @ w16.t())
        moved = w16.numel() * 2 + x.numel() * 2 + N * 2
        rows.append(f"| {K}×{N} | torch fp16 matmul | {t * 1e6:.1f} | {moved / t / 1e9:.0f} | {moved / t / copy_bw:.0%} |")
        for bits in (2, 3, 4, 8):
            gs = 128
            q = torch.randint(0, 2**bits, (N, K), dtype=torch.int32)
            z = torch.randint(1, 2**bits, (K // gs, N), dtype=torch.int32)
            s = torch.rand(K // gs, N) * 0.01
            p = {k: v.cuda() for k, v in pack_gptq(q, z, s, torch.arange(K, dtype=torch.int32) // gs, bits).items()}
            t = timed(lambda: gptq_matmul(x, p["qweight"], p["qzeros"], p["scales"], p["g_idx"], bits))
            moved = sum(v.numel() * v.element_size() for v in p.values()) + x.numel() * 2 + N * 2
            rows.append(f"| {K}×{N} | quantc Triton {bits}-bit g128 | {t * 1e6:.1f} | {moved / t / 1e9:.0f} | "
                        f"{moved / t / copy_bw:.0%} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
