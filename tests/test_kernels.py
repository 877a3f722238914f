"""Triton kernels against a float64 reference, under TRITON_INTERPRET=1 on the CPU (set in conftest)."""
import os

import pytest
import torch

from quantc.packing import dequantize_gptq, pack_gptq

triton = pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[kernels]')")
from quantc.kernels import gptq_matmul  # noqa: E402


def packed(bits, K, N, gs, act_order, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (N, K), generator=g, dtype=torch.int32)
    zeros = torch.randint(1, 2**bits, (K // gs, N), generator=g, dtype=torch.int32)
    scales = (torch.rand(K // gs, N, generator=g) * 0.02 + 0.001).half()
    g_idx = torch.arange(K, dtype=torch.int32) // gs
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=g)]
    return pack_gptq(q, zeros, scales.float(), g_idx, bits)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("M", [1, 3, 40])            # decode (GEMV path) and prefill (GEMM path)
@pytest.mark.parametrize("act_order", [False, True])
def test_kernel_matches_float64_reference(bits, M, act_order):
    K, N, gs = 128, 96, 32
    t = packed(bits, K, N, gs, act_order, seed=bits * 10 + M)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    W = dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, torch.float64)
    ref = x.double() @ W.t()
    out = torch.full((M, N), float("nan"))                 # poisoned: every element must be written
    y = gptq_matmul(x, t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, out=out)
    assert torch.isfinite(y).all()
    rel = float((y.double() - ref).norm() / ref.norm())
    assert rel < 1e-5, rel


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter test")
def test_ragged_shapes_and_batch_dims():
    bits, K, N, gs = 3, 96, 64, 32                          # K not a multiple of the K block
    t = packed(bits, K, N, gs, True, seed=5)
    x = torch.randn(2, 5, K)
    W = dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, torch.float64)
    y = gptq_matmul(x, t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits)
    assert y.shape == (2, 5, N)
    torch.testing.assert_close(y.double(), x.double() @ W.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter test")
def test_runtime_selects_kernel(tmp_path, tiny_models, calib_file):
    import quantc
    from quantc.config import parse_config
    from quantc.pipeline import compile_model
    raw = {"model": str(tiny_models["qwen2"]), "quant": {"bits": 3, "group_size": 32, "static_groups": False},
           "calibration": {"source": str(calib_file), "samples": 4, "seq_len": 32}}
    compile_model(parse_config(raw), tmp_path / "o", progress=False)
    lin = quantc.load(tmp_path / "o").model.layers[0].self_attn.k_proj     # has a bias
    x = torch.randn(2, 7, lin.in_features)
    ref = lin(x)                                               # CPU: torch dequantize path
    lin.kernel = "triton"
    torch.testing.assert_close(lin(x), ref, rtol=1e-5, atol=1e-5)
