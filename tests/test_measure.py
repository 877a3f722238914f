"""Sweep 1 (passes/measure.py): the streaming exact predictor against an independent whole-model
oracle, one decoder layer in memory at a time, and the fisher predictor against the exact one."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from quantc.calibration.hessian import CaptureInput, Hessian
from quantc.gptq import gptq
from quantc.model import Activations, capture_layer0_inputs, decoder_layers, load_model, units
from quantc.options import Option
from quantc.passes.measure import measure, option_key

from conftest import build_tiny

CANDIDATES = [Option(2, 32, sym=False), Option(4, 32), Option(8, 32)]


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory, tiny_tokenizer):
    return build_tiny("llama", tmp_path_factory.mktemp("deep") / "llama", tiny_tokenizer, layers=4, seed=3)


def _tokens(vocab: int, n: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(3, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def _measure(model, calib, hold, predictor, **kw):
    h, k = capture_layer0_inputs(model, calib, 4)
    hh, hk = capture_layer0_inputs(model, hold, 4)
    return measure(model, Activations(h, k, 4), Activations(hh, hk, 4), hold, CANDIDATES,
                   predictor=predictor, progress=False, **kw)


def _oracle_dkl(model, calib, hold, unit, opt) -> float:
    """ΔKL of the whole model with `unit` alone at `opt`: Hessians from a full forward, GPTQ, then
    a full forward on the held-out tokens (every=2 positions, as the measurement's head)."""
    mods = dict(model.named_modules())
    hess = {}
    with contextlib.ExitStack() as stack, torch.no_grad():
        for n in unit.names:
            hess[n] = Hessian(mods[n].in_features)
            stack.enter_context(CaptureInput(mods[n], hess[n].add, stop=False))
        for b in range(0, calib.shape[0], 4):
            model(input_ids=calib[b:b + 4])
    with torch.no_grad():
        ref = F.log_softmax(model(input_ids=hold).logits[:, :-1:2].float(), -1)
        old = {n: mods[n].weight.data for n in unit.names}
        try:
            for n in unit.names:
                mods[n].weight.data = gptq(old[n], hess[n].H, opt).weight
            logp = F.log_softmax(model(input_ids=hold).logits[:, :-1:2].float(), -1)
        finally:
            for n, w in old.items():
                mods[n].weight.data = w
    return float((ref.exp() * (ref - logp)).sum(-1).mean())


def test_streaming_exact_matches_whole_model_oracle(deep_llama):
    model = load_model(str(deep_llama))
    vocab = model.config.vocab_size
    calib, hold = _tokens(vocab, 8, 48, 0), _tokens(vocab, 4, 32, 1)
    ms = _measure(model, calib, hold, "exact")
    checked = 0
    for unit in units(model):
        for opt in CANDIDATES[:2]:                     # ≤ 4 bits: measured directly
            got = ms.units[unit.key]["options"][option_key(opt)]["dkl"]
            want = _oracle_dkl(model, calib, hold, unit, opt)
            assert got == pytest.approx(want, rel=1e-3, abs=1e-7), (unit.key, opt.label)
            checked += 1
    assert checked == 4 * 4 * 2
    assert all(u["alpha"] > 0 for u in ms.units.values())
    assert all(x["lieq_kl"] > 0 for x in ms.layers)


@pytest.mark.parametrize("predictor", ["fisher", "exact"])
def test_measurement_holds_one_layer_at_a_time(deep_llama, predictor, monkeypatch):
    import quantc.lazy as lazy
    model = load_model(str(deep_llama), lazy=True)
    layers = decoder_layers(model)
    most = []
    real = lazy.materialize

    def counting(m, i):
        real(m, i)
        most.append(sum(not any(p.is_meta for p in layer.parameters()) for layer in layers))

    monkeypatch.setattr(lazy, "materialize", counting)
    vocab = model.config.vocab_size
    ms = _measure(model, _tokens(vocab, 6, 32, 0), _tokens(vocab, 2, 32, 1), predictor)
    assert len(ms.units) == 4 * 4
    assert most and max(most) == 1                       # never two decoder layers in memory
    assert all(any(p.is_meta for p in layer.parameters()) for layer in layers)   # all released after


def _spearman(a: list[float], b: list[float]) -> float:
    ra, rb = torch.tensor(a).argsort().argsort().float(), torch.tensor(b).argsort().argsort().float()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def test_fisher_predictor_ranks_units_like_the_exact_one(deep_llama):
    model = load_model(str(deep_llama))
    vocab = model.config.vocab_size
    calib, hold = _tokens(vocab, 8, 48, 0), _tokens(vocab, 4, 32, 1)
    exact = _measure(model, calib, hold, "exact")
    fisher = _measure(model, calib, hold, "fisher", probes=16)
    for opt in CANDIDATES[:2]:
        k = option_key(opt)
        e = [exact.units[u]["options"][k]["dkl"] for u in exact.units]
        f = [fisher.units[u]["options"][k]["dkl"] for u in exact.units]
        assert _spearman(e, f) > 0.6, (k, e, f)
        assert 0.5 < sum(f) / sum(e) < 2.0               # scaled by the uniform plans: the right size
    cal = fisher.meta["calibration"]
    assert set(cal) == {option_key(o) for o in CANDIDATES}
    for c in cal.values():
        assert c["factor"] > 0
    for u in fisher.units.values():                       # fewer bits, more damage, unit by unit
        d = [u["options"][option_key(o)]["dkl"] for o in CANDIDATES]
        assert d[0] > d[1] > d[2] > 0


def test_bounded_working_set_gives_the_same_measurement(deep_llama, monkeypatch):
    """The memory bounds of sweep 1 (options solved one stack at a time, float64 error terms in
    blocks, codes kept instead of float weights and dequantized as each linear runs) change no
    number: the measurement with the smallest blocks equals the default one."""
    import quantc.gptq as G
    model = load_model(str(deep_llama))
    vocab = model.config.vocab_size
    calib, hold = _tokens(vocab, 6, 32, 0), _tokens(vocab, 2, 32, 1)
    base = _measure(model, calib, hold, "fisher")
    monkeypatch.setattr(G, "STACK_BYTES", 1)             # every option alone
    monkeypatch.setattr(G, "ERR_BLOCK", 8)               # error terms in 8 × 8 blocks
    small = _measure(model, calib, hold, "fisher")
    for key, u in base.units.items():
        for k, o in u["options"].items():
            got = small.units[key]["options"][k]
            assert got["bytes"] == o["bytes"]
            assert got["err"] == pytest.approx(o["err"], rel=1e-12)
            assert got["dkl"] == pytest.approx(o["dkl"], rel=1e-9, abs=1e-15)


def test_swapped_codes_run_like_their_weights(deep_llama):
    """A QuantResult swapped in runs exactly as its dequantized weight set directly, exists as a
    float weight only during its linear's forward, and the original weight is back afterwards."""
    from quantc.passes.measure import _swapped
    model = load_model(str(deep_llama))
    layer = decoder_layers(model)[0]
    lin = layer.mlp.down_proj
    W = lin.weight.data.clone()
    x = torch.randn(2, 5, lin.in_features)
    res = gptq(W, torch.eye(lin.in_features) * 2, Option(4, 32)).codes_only()
    assert res.weight is None and res.q.dtype == torch.uint8
    mods = {"down": lin}
    with _swapped(mods, {"down": res}):
        assert torch.equal(lin.weight.data, W)           # not yet dequantized
        got = lin(x)
        assert torch.equal(lin.weight.data, W)           # dropped after the forward
    with _swapped(mods, {"down": res.dequantize()}):
        want = lin(x)
    assert torch.equal(got, want)
    assert torch.equal(lin.weight.data, W)


# options of one bit width differing in group size and zero point: solve: anchors solves one per width
WIDE = [Option(4, 32), Option(4, 64), Option(4, 64, sym=False), Option(2, 32, sym=False),
        Option(2, 64, sym=False), Option(8, 32), Option(8, 64)]


def test_the_uniform_check_changes_no_prediction(deep_llama):
    """plan.check_uniform carries the whole model at each solved option to the head beside the sample
    units' streams: it adds the measured uniform ΔKL to meta.calibration and changes no other number."""
    model = load_model(str(deep_llama))
    vocab = model.config.vocab_size
    calib, hold = _tokens(vocab, 8, 48, 0), _tokens(vocab, 4, 32, 1)
    plain = _measure(model, calib, hold, "fisher", probes=4)
    check = _measure(model, calib, hold, "fisher", probes=4, check_uniform=True)
    assert plain.units == check.units and plain.layers == check.layers
    assert check.meta["held_out_streams"] == plain.meta["held_out_streams"] + len(CANDIDATES)
    for k, c in check.meta["calibration"].items():
        assert c.pop("uniform_measured") > 0 and c.pop("uniform_predicted") > 0
        assert c == plain.meta["calibration"][k]
    assert not any("uniform_measured" in c for c in plain.meta["calibration"].values())


def test_anchors_are_one_option_per_bit_width():
    from quantc.config import CANDIDATE_SETS
    from quantc.passes.measure import anchors
    wide = [Option(b, g, s, act_order=True, static_groups=True, mse=True) for b, g, s in CANDIDATE_SETS["wide"]]
    a = anchors(wide)
    assert {wide[j].label for j in set(a)} == {"2b-g128-asym", "3b-g128-sym", "4b-g128-sym", "8b-g128-sym"}
    assert all(wide[j].bits == o.bits for o, j in zip(wide, a))
    assert anchors(CANDIDATES) == [0, 1, 2]                  # one option per width: each its own anchor
    assert anchors([Option(4, 128, act_order=True), Option(4, 64)]) == [0, 1]   # other solver settings
    assert anchors([Option(4, 32), Option(4, -1)]) == [1, 1]  # no g128: the widest group (per-channel)


def test_anchor_solves_predict_the_other_options(deep_llama, monkeypatch):
    """solve: anchors gives the anchors' numbers unchanged, predicts every other option's error close
    to its solved one, solves only anchors outside the calibration sample (whose units solve every
    option), measures the sample's streams at the anchors as before, and gives a predicted option its
    anchor's factor, debiased by the sample's solved errors."""
    import quantc.passes.measure as M
    model = load_model(str(deep_llama))
    vocab = model.config.vocab_size
    calib, hold = _tokens(vocab, 8, 48, 0), _tokens(vocab, 4, 32, 1)
    h, k = capture_layer0_inputs(model, calib, 4)
    hh, hk = capture_layer0_inputs(model, hold, 4)
    run = lambda solve: measure(model, Activations(h, k, 4), Activations(hh, hk, 4), hold, WIDE, progress=False,
                                solve=solve, check_uniform=True)
    full = run("all")
    solved: list[int] = []
    real = M.iter_gptq_options
    monkeypatch.setattr(M, "iter_gptq_options", lambda W, H, opts, **kw: (solved.append(len(opts)), real(W, H, opts, **kw))[1])
    fast = run("anchors")
    anchor_keys = {option_key(WIDE[j]) for j in set(M.anchors(WIDE))}
    assert anchor_keys == {option_key(o) for o in (WIDE[1], WIDE[4], WIDE[6])}    # no g128: the widest
    sample = set(fast.meta["calibration_units"])
    n_lin = {key: len(u["names"]) for key, u in fast.units.items()}
    assert sorted(solved) == sorted([len(WIDE)] * sum(n_lin[u] for u in sample)
                                    + [len(anchor_keys)] * sum(n for u, n in n_lin.items() if u not in sample))
    ratios = []
    for key, u in fast.units.items():
        for kk, o in u["options"].items():
            want = full.units[key]["options"][kk]
            assert o["bytes"] == want["bytes"]
            if kk in anchor_keys:
                assert "predicted_from" not in o
                assert o["err"] == pytest.approx(want["err"], rel=1e-12)
                assert o["dkl"] == pytest.approx(want["dkl"], rel=1e-9)
                continue
            assert o["predicted_from"] in anchor_keys
            ratios.append(o["err"] / want["err"])
            if key in sample:                                # solved too: its real error is kept
                assert o["err_solved"] == pytest.approx(want["err"], rel=1e-12)
    ratios = torch.tensor(ratios).log()
    assert ratios.abs().max() < 0.5 and ratios.mean().abs() < 0.15, ratios   # within 1.65×, unbiased to 15%
    cal = fast.meta["calibration"]
    assert {kk for kk, c in cal.items() if "uniform_measured" in c} == anchor_keys
    assert set(full.meta["calibration"]) == {kk for kk, c in full.meta["calibration"].items() if "uniform_measured" in c}
    for kk, c in cal.items():
        if kk in anchor_keys:                    # the sample measured with the anchors' real weights, as before
            assert c["sample_measured"] == pytest.approx(full.meta["calibration"][kk]["sample_measured"], rel=1e-9)
            continue
        # a predicted option: its anchor's factor × Σ solved / Σ predicted Fisher form over the sample
        a = c["anchor"]
        assert a in anchor_keys and "sample_measured" not in c
        real = sum(fast.units[u]["options"][kk]["fisher_solved"] for u in sample)
        pred = sum(fast.units[u]["options"][kk]["fisher"] for u in sample)
        assert c["factor"] == pytest.approx(cal[a]["factor"] * real / pred, rel=1e-12)
        for u in fast.units.values():
            assert u["options"][kk]["dkl"] == pytest.approx(c["factor"] * u["options"][kk]["fisher"], rel=1e-12)


@pytest.mark.parametrize("scale", [1e-2, 1e-3])
def test_head_kl_from_the_logit_shift_matches_float64(deep_llama, scale):
    """Head.compare (the logit-shift form of KL and Δloss) against two float64 log-softmaxes of the
    same float32 logits, at a real LM's logit magnitude (~10), with small shifts of the hidden states
    (the ΔKL of a unit at 4 and 8 bits) and batches of unequal sizes (4, 4, 2 sequences)."""
    from quantc.model import CPU
    from quantc.passes.measure import Head
    model = load_model(str(deep_llama))
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(10, 33, model.config.hidden_size, generator=gen)
    h2 = h + scale * torch.randn(h.shape, generator=gen)
    tokens = _tokens(model.config.vocab_size, 10, 33, 2)
    head = Head(model, tokens, CPU)
    acts = Activations(h, [{}, {}, {}], 4)
    with torch.no_grad():
        head.set_reference(acts)
        kl, dloss = head.compare(acts.like(h2))
        z, z2 = head.logits(h).double(), head.logits(h2).double()
    ref, got = F.log_softmax(z, -1), F.log_softmax(z2, -1)
    want = float((ref.exp() * (ref - got)).sum(-1).mean())
    target = tokens[:, 1::2].unsqueeze(-1)
    want_dloss = float(-got.gather(-1, target).mean() + ref.gather(-1, target).mean())
    assert z.abs().max() > 10                         # a real LM's logit magnitude
    assert kl == pytest.approx(want, rel=5e-4)
    assert dloss == pytest.approx(want_dloss, rel=5e-4, abs=1e-7)


@pytest.mark.parametrize("predictor", ["fisher", "exact"])
def test_sweep_1_solves_the_largest_unit_first_and_frees_each_hessian(deep_llama, predictor, monkeypatch):
    """The widest input's solve (down_proj: the layer's largest Cholesky) runs first, before any other
    unit's codes exist, and with the fisher predictor each Hessian is freed once its last unit is
    solved (the exact one keeps them for its noise probes)."""
    import gc
    import weakref
    import quantc.passes.measure as M
    from quantc.gptq import QuantResult
    real, calls, seen = M._solve_unit, [], {}

    def spy(unit, prefix, layer, mods, hess, *a, **kw):
        gc.collect()
        for n, h in hess.items():
            seen.setdefault(n, weakref.ref(h))
        alive = {n for n, r in seen.items() if n.startswith(prefix) and r() is not None}
        codes = sum(isinstance(o, QuantResult) for o in gc.get_objects())
        calls.append((unit, alive, codes))
        return real(unit, prefix, layer, mods, hess, *a, **kw)
    monkeypatch.setattr(M, "_solve_unit", spy)
    model = load_model(str(deep_llama))
    vocab = model.config.vocab_size
    _measure(model, _tokens(vocab, 8, 48, 0), _tokens(vocab, 4, 32, 1), predictor)
    by_layer: dict[int, list] = {}
    for unit, alive, codes in calls:
        by_layer.setdefault(unit.layer, []).append((unit, alive, codes))
    assert sorted(by_layer) == [0, 1, 2, 3]
    for i, seq in by_layer.items():
        order = [u.key.split(".", 1)[1] for u, _, _ in seq]
        assert order == ["down", "gate+up", "q+k+v", "o"], order
        assert seq[0][2] == 0, i                           # no codes of any unit, this layer's or earlier
        every = {n for u, _, _ in seq for n in u.names}
        for j, (unit, alive, _) in enumerate(seq):
            pending = {n for u, _, _ in seq[j:] for n in u.names}
            assert alive == (pending if predictor == "fisher" else every), (i, unit.key)
    gc.collect()
    if predictor == "fisher":
        assert all(r() is None for r in seen.values())        # none outlives its layer's solves


def _whole_stream_diagnostics(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    """The diagnostics' numbers from whole-stream copies: block influence, effective rank, top-k gain."""
    from quantc.passes.measure import _effective_rank
    xin, xout = x[:, :-1].reshape(-1, x.shape[-1]), y[:, :-1].reshape(-1, y.shape[-1])
    step = max(1, xin.shape[0] // 2048)
    erank, top_out = _effective_rank(xout[::step])
    _, top_in = _effective_rank(xin[::step])
    return float(1 - F.cosine_similarity(xin, xout, dim=-1).double().mean()), erank, top_out - top_in


@pytest.mark.parametrize("batch", [1, 2, 6])
def test_layer_diagnostics_read_the_streams_batch_by_batch(batch):
    """Batches of 999 rows put the spectra's every-2nd-row grid at another offset in every batch: the
    sampled rows are still the whole stream's."""
    from quantc.passes.measure import _diagnostics
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1000, 64, generator=g)
    y = x + 0.3 * torch.randn(6, 1000, 64, generator=g)
    kw = [{}] * 6
    lins = {"a": torch.nn.Linear(64, 64)}
    d = _diagnostics(0, Activations(x, kw, batch), Activations(y, kw, batch), lins, Option(bits=4))
    influence, erank, gain = _whole_stream_diagnostics(x, y)
    assert d["block_influence"] == pytest.approx(influence, rel=1e-9)
    assert d["effective_rank"] == erank and d["topk_energy_gain"] == gain      # the same rows, the same order


def test_layer_diagnostics_do_not_copy_the_streams(tmp_path):
    """Two 1 GiB streams in 16 batches of 64 MiB (above glibc's largest mmap threshold, as a batch is at
    8B width: smaller ones can stay in the heap's arenas after they are freed, which measures the
    allocator): the diagnostics may add a batch's temporaries, the sampled rows and the first call's
    library set-up, not a whole stream (the copies of `hidden[:, :-1]` cost about five streams before)."""
    import subprocess
    import sys
    script = (
        "import resource, torch\n"
        "from quantc.model import Activations\n"
        "from quantc.options import Option\n"
        "from quantc.passes.measure import _diagnostics\n"
        "x = torch.ones(64, 4096, 1024); y = torch.full((64, 4096, 1024), 2.0)\n"
        "lins = {'a': torch.nn.Linear(1024, 1024)}\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "_diagnostics(0, Activations(x, [{}] * 16, 4), Activations(y, [{}] * 16, 4), lins, Option(bits=4))\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    grown_mib = float(r.stdout.split()[-1])
    assert grown_mib < 512, f"the diagnostics raised the peak by {grown_mib:.0f} MiB (a stream is 1024 MiB)"


def test_layer_diagnostics_of_two_ranks_are_one_process_s():
    """Two ranks (threads summing through a barrier, as all_reduce does), each with its whole batches:
    rank 1's first row (2997) is off the every-2nd-row grid, so it must start one row in. The numbers
    equal one process's up to the order of the float64 sums."""
    import threading
    from quantc.passes.measure import _diagnostics
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 1000, 64, generator=g)
    y = x + 0.3 * torch.randn(6, 1000, 64, generator=g)
    lins = {"a": torch.nn.Linear(64, 64)}
    one = _diagnostics(0, Activations(x, [{}] * 6, 2), Activations(y, [{}] * 6, 2), lins, Option(bits=4))
    bar, box, out = threading.Barrier(2), {}, {}

    class Rank:
        active, size = True, 2

        def __init__(self, rank):
            self.rank = rank

        def all_reduce(self, t):
            box[self.rank] = t.clone()
            bar.wait()
            total = box[0] + box[1]
            bar.wait()
            return t.copy_(total)

    def run(r):
        rows = slice(3 * r, 3 * r + 3)
        out[r] = _diagnostics(0, Activations(x[rows], [{}] * 2, 2), Activations(y[rows], [{}] * 2, 2), lins,
                              Option(bits=4), Rank(r))
    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in (0, 1):
        for k in ("block_influence", "effective_rank", "topk_energy_gain"):
            assert out[r][k] == pytest.approx(one[k], rel=1e-9, abs=1e-12), (r, k)


def test_qep_discount_weights_each_error_by_what_reaches_the_head(deep_llama, monkeypatch):
    """plan.qep_discount: the backward sweep scales the gradient into every linear's input by β. At
    β = 0 only the residual stream carries an error to the head, so every layer's o_proj and down_proj
    see the gradient of the last hidden state, and q/k/v and gate/up (whose errors reach the residual
    only through o/down) see none; the last down_proj, with nothing but the head after it, keeps its
    weight at any β."""
    import quantc.passes.measure as M
    seen = []
    real = M._fisher_results

    def spy(ms, targets, sq, acc, *a, **kw):
        seen.append(acc)
        return real(ms, targets, sq, acc, *a, **kw)
    monkeypatch.setattr(M, "_fisher_results", spy)
    model = load_model(str(deep_llama))
    vocab = model.config.vocab_size
    calib, hold = _tokens(vocab, 8, 48, 0), _tokens(vocab, 4, 32, 1)
    ms = {b: _measure(model, calib, hold, "fisher", qep_beta=b) for b in (1.0, 0.5, 0.0)}
    whole, half, cut = seen
    last = len(decoder_layers(model)) - 1
    down = lambda i: f"model.layers.{i}.mlp.down_proj"
    for i in range(last + 1):
        p = f"model.layers.{i}."
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            assert float(cut[p + n].abs().max()) == 0.0, p + n
            assert float(half[p + n].sum()) > 0, p + n
        torch.testing.assert_close(cut[p + "self_attn.o_proj"], cut[down(last)], rtol=1e-5, atol=0)
        torch.testing.assert_close(cut[down(i)], cut[down(last)], rtol=1e-5, atol=0)
    for acc in (half, cut):
        torch.testing.assert_close(acc[down(last)], whole[down(last)], rtol=1e-6, atol=0)
    assert float(half[down(0)].sum()) != pytest.approx(float(whole[down(0)].sum()), rel=1e-3)   # it reweights
    assert ms[0.5].meta["qep_beta"] == 0.5 and "qep_beta" not in ms[1.0].meta


@pytest.mark.parametrize("shape", [(3, 5, 40), (1, 7, 3)])
def test_probe_labels_are_the_whole_batch_draw(shape):
    """The probes' labels come from one sequence's CDF at a time (the batch's float64 CDF was four
    vocabulary-sized arrays per sequence): they equal the whole-batch inverse-CDF draw that made
    every earlier measurement, label for label and sign for sign, and the generator ends where it did."""
    from quantc.passes.measure import probe_labels
    g = torch.Generator().manual_seed(7)
    p = torch.randn(shape, generator=g).mul_(3).softmax(-1)
    p[0, 0] = 0
    p[0, 0, -1] = 1                       # all mass on the last label: the clamp's edge
    ref_gen, gen = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    cdf = p.double().cumsum(-1)
    want = []
    for _ in range(4):
        u = torch.rand(p.shape[:-1], generator=ref_gen, dtype=torch.float64) * cdf[..., -1]
        y = torch.searchsorted(cdf, u.unsqueeze(-1)).squeeze(-1).clamp(max=p.shape[-1] - 1)
        want.append((y, (torch.randint(0, 2, y.shape, generator=ref_gen) * 2 - 1).to(p)))
    got = probe_labels(p, 4, gen)
    for (y, r), (wy, wr) in zip(got, want):
        assert torch.equal(y, wy) and torch.equal(r, wr)
    assert bool((got[0][0][0, 0] == shape[-1] - 1).all())
    assert torch.equal(gen.get_state(), ref_gen.get_state())
    assert len({tuple(y.flatten().tolist()) for y, _ in got}) > 1      # the probes draw apart
