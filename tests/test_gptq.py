import pytest
import torch

from quantc.errors import QuantcError
from quantc.gptq import find_params, gptq, qep_target, relative_error, rtn
from quantc.options import Option


def correlated_inputs(n=2048, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    scale = torch.rand(d, generator=g) * 3 + 0.1          # uneven channel magnitudes, like LLM activations
    return (torch.randn(n, d, generator=g) @ mix) * scale


def hessian(X):
    return 2 * X.t() @ X / X.shape[0]


@pytest.mark.parametrize("opt", [Option(4, 32, True), Option(3, 64, False), Option(2, 32, False, mse=True),
                                 Option(4, 32, True, act_order=True), Option(3, -1, True),
                                 Option(4, 32, True, act_order=True, static_groups=True)])
def test_gptq_beats_rtn(opt):
    X = correlated_inputs()
    W = torch.randn(96, 128, generator=torch.Generator().manual_seed(1))
    H = hessian(X)
    e_rtn = relative_error(W, rtn(W, opt).weight, H)
    res = gptq(W, H, opt)
    e_gptq = relative_error(W, res.weight, H)
    assert e_gptq < 0.85 * e_rtn, (e_gptq, e_rtn)
    # the integers, grid and g_idx reproduce the weight GPTQ propagated
    torch.testing.assert_close(res.dequantize(), res.weight, rtol=1e-5, atol=1e-5)
    maxq = 2**opt.bits - 1
    assert res.q.min() >= 0 and res.q.max() <= maxq and res.zeros.min() >= 1 and res.zeros.max() <= maxq
    gs = 128 if opt.group_size < 0 else opt.group_size
    counts = torch.bincount(res.g_idx.long())
    assert torch.all(counts == gs)                    # every group holds group_size columns
    if not opt.act_order or opt.static_groups:
        assert torch.equal(res.g_idx, torch.arange(128, dtype=torch.int32) // gs)


def test_scales_are_fp16_exact():
    W = torch.randn(32, 64)
    s, z = find_params(W, 4, sym=False)
    assert torch.equal(s, s.half().float())
    assert z.min() >= 1


def test_mse_grid_not_worse():
    W = torch.randn(64, 128) * torch.rand(64, 1)
    W[0, 0] = 20.0                                       # an outlier stretches the min-max grid
    H = torch.eye(128)
    e_minmax = relative_error(W, rtn(W, Option(3, 64, True)).weight, H)
    e_mse = relative_error(W, rtn(W, Option(3, 64, True, mse=True)).weight, H)
    assert e_mse < e_minmax


def test_dampening_raised_for_rank_deficient_hessian(caplog):
    X = correlated_inputs(n=16, d=128)                   # 16 samples: rank 16 ≪ 128
    H = hessian(X)
    H[5, 5] += 1e-3
    W = torch.randn(32, 128)
    res = gptq(W, H, Option(4, 32), percdamp=1e-9)
    assert res.damp > 1e-9
    assert "dampening raised" in caplog.text


def test_nan_hessian_fails_clearly():
    H = torch.full((64, 64), float("nan"))
    with pytest.raises(QuantcError, match="not positive definite"):
        gptq(torch.randn(32, 64), H, Option(4, 32), name="layers.0.q_proj")


@pytest.mark.parametrize("opt", [Option(4, 32), Option(4, 32, act_order=True, static_groups=True),
                                 Option(4, 32, grid="ggml")])
def test_dead_input_channel_is_handled(opt):
    X = correlated_inputs(d=64)
    X[:, 3] = 0
    res = gptq(torch.randn(32, 64, generator=torch.Generator().manual_seed(1)), hessian(X), opt)
    assert torch.isfinite(res.weight).all()
    # an input that never fired carries no information: its column is zero (GPTQ's convention), which
    # these symmetric grids store exactly, and the others columns are not
    assert torch.equal(res.weight[:, 3], torch.zeros(32))
    assert (res.weight[:, 4] != 0).any()


def test_qep_target_reduces_propagated_error():
    X = correlated_inputs(d=64)
    Xhat = X + 0.2 * correlated_inputs(d=64, seed=3)     # inputs as the quantized model produces them
    W = torch.randn(48, 64)
    Hh = hessian(Xhat)
    delta = 2 * (X - Xhat).t() @ Xhat / X.shape[0]
    opt = Option(4, 32)

    def err(Wq):
        return float(((X @ W.t() - Xhat @ Wq.t()) ** 2).sum())

    plain = gptq(W, Hh, opt).weight
    qep = gptq(qep_target(W, Hh, delta, 1.0), Hh, opt).weight
    assert err(qep) < 0.8 * err(plain)
    assert torch.equal(qep_target(W, Hh, delta, 0.0), W)


@pytest.mark.parametrize("opt", [Option(4, 32, True), Option(3, 64, False), Option(2, 32, False, mse=True),
                                 Option(4, 32, True, act_order=True, static_groups=True), Option(8, 32, True),
                                 Option(3, 256, False, grid="k"), Option(8, 32, True, grid="k"),
                                 Option(4, 32, False, grid="ggml")])
def test_codes_only_dequantize_to_the_solved_weight(opt):
    """What the measurement keeps of an option (its codes, one byte each) gives back exactly the
    weight GPTQ propagated, bit for bit."""
    X = correlated_inputs(d=256)
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    res = gptq(W, hessian(X), opt)
    small = res.codes_only()
    assert small.weight is None and small.q.dtype in (torch.uint8, torch.int8)
    assert torch.equal(small.dequantize(), res.weight)


def test_option_stacks_split_by_size_give_the_stacked_results(monkeypatch):
    import quantc.gptq as G
    X = correlated_inputs()
    W = torch.randn(96, 128, generator=torch.Generator().manual_seed(1))
    opts = [Option(2, 32, False), Option(3, 32, True), Option(4, 32, True), Option(8, 32, True),
            Option(4, 32, True, act_order=True)]
    together = G.gptq_options(W, hessian(X), opts)
    monkeypatch.setattr(G, "STACK_BYTES", 2 * W.numel() * 4)     # two options per stack
    pairs = G.gptq_options(W, hessian(X), opts)
    monkeypatch.setattr(G, "STACK_BYTES", 1)                     # one at a time
    alone = G.gptq_options(W, hessian(X), opts)
    for a, b, c in zip(together, pairs, alone):
        torch.testing.assert_close(b.weight, a.weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(c.weight, a.weight, rtol=0, atol=1e-6)
        assert (b.q != a.q).float().mean() < 1e-3 and (c.q != a.q).float().mean() < 1e-3


def test_dead_input_leaves_the_callers_hessian_untouched():
    X = correlated_inputs()
    X[:, 5] = 0
    H = hessian(X)
    before = H.clone()
    gptq(torch.randn(32, 128, generator=torch.Generator().manual_seed(2)), H, Option(4, 32))
    assert torch.equal(H, before)


@pytest.mark.parametrize("dim", [48, 256, 300, 600])
def test_hessian_from_its_upper_triangle_has_the_bits_of_the_whole_product(dim):
    """Hessian.add forms only XᵀX's upper block triangle and mirrors it when H is read: H must equal
    2·Σ_b X_bᵀX_b / n formed from the whole float32 products (the old code), bit for bit, and be
    exactly symmetric; the cross term δ is unchanged."""
    from quantc.calibration.hessian import GRAM_ROWS, Hessian
    g = torch.Generator().manual_seed(dim)
    scale = torch.rand(dim, generator=g) * 4
    xs = [torch.randn(rows, dim, generator=g) * scale for rows in (1, 37, 2 * GRAM_ROWS + 5)]
    refs = [x + 0.1 * torch.randn(x.shape, generator=g) for x in xs]
    h = Hessian(dim, cross=True)
    whole = torch.zeros(dim, dim, dtype=torch.float64)
    cross = torch.zeros(dim, dim, dtype=torch.float64)
    for x, xr in zip(xs, refs):
        h.add(x, xr)
        whole += x.t() @ x
        cross += (xr - x).t() @ x
    n = sum(x.shape[0] for x in xs)
    assert torch.equal(h.H, whole.mul_(2 / n).float())
    assert torch.equal(h.H, h.H.t())
    assert torch.equal(h.delta, cross.mul_(2 / n).float())


@pytest.mark.parametrize("opt", [Option(4, 32, True, mse=True), Option(2, 32, False, mse=True, act_order=True),
                                 Option(4, 256, False, mse=True, grid="k")])
def test_grid_search_on_all_threads_gives_the_bits_of_one(opt, monkeypatch):
    """Inside the column loop (no static groups) each group's clipped-grid search runs on every
    intra-op thread, the per-column updates on one: the result is that of the search on one thread,
    bit for bit (both at 2 threads: the blocks' GEMM updates may round differently on another count)."""
    import contextlib
    import quantc.gptq as G
    X = correlated_inputs(d=256)
    W = torch.randn(160, 256, generator=torch.Generator().manual_seed(2))
    H = hessian(X)
    n = torch.get_num_threads()
    seen = []
    real = G._threads

    def spy(k):
        seen.append(k)
        return real(k)
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(G, "_threads", spy)
        wide = gptq(W, H, opt)
        assert seen and set(seen) == {2} and torch.get_num_threads() == 2    # given back after the loop
        monkeypatch.setattr(G, "_threads", lambda k: contextlib.nullcontext())   # the search on one thread
        one = gptq(W, H, opt)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one.q, wide.q) and torch.equal(one.weight, wide.weight)
