"""Sweep 1: measure, layer by layer on the original model's activations.

For every unit (linears that share one precision) and every candidate option: the relative output
error ‖(W−Ŵ)X‖²/‖WX‖² of GPTQ (or RTN) from the Hessian, and the exact bytes the exporter writes.
For options of ≤ 4 bits, the ΔKL of the model with that unit alone quantized to that option (its
real GPTQ weights), measured on the held-out slice: large errors leave the linear regime, and an
error's direction matters as much as its size. For every unit, its linearity coefficient α (HIGGS): the change of the model's KL to the original
per unit of relative error, from noise of known relative size injected into that unit alone and
the rest of the model run on a held-out slice. For every layer, importance diagnostics: block
influence, outlier share, LieQ's quantize-this-layer-alone ΔKL/Δloss, effective rank and top-k
energy gain of its output.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..calibration.hessian import CaptureInput, Hessian
from ..gptq import gptq, rtn
from ..model import Activations, Unit, decoder_layers, layer_linears, run_layer, units
from ..options import Option
from .quantize import input_groups

OUTLIER_K = 5.0          # a weight is an outlier when |w| > k · mean|w| of its matrix
TOPK = 8                 # singular directions counted in the top-k energy diagnostic


def option_key(o: Option) -> str:
    extra = "".join(s for s, on in (("-ao", o.act_order), ("-sg", o.static_groups), ("-mse", o.mse)) if on)
    return o.label + extra


@dataclass
class Measurements:
    units: dict[str, dict] = field(default_factory=dict)   # key -> {layer, names, options: {k: {err, bytes}}, alpha}
    layers: list[dict] = field(default_factory=list)       # importance diagnostics per decoder layer
    options: dict[str, dict] = field(default_factory=dict)  # option key -> Option fields
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Measurements":
        return cls(**d)

    def option(self, key: str) -> Option:
        return Option(**self.options[key])


class Tail:
    """Runs the model from decoder layer i to the logits on a held-out slice and compares with the
    original model: KL(original ‖ perturbed) and Δ of the next-token loss, per token."""

    def __init__(self, model, tokens: torch.Tensor, hidden: Activations, every: int = 2):
        self.model, self.tokens, self.every = model, tokens, every
        self.layers = decoder_layers(model)
        self.ref_logp = self._logp(hidden, 0)
        self.ref_nll = self._nll(self.ref_logp)

    def _logp(self, acts: Activations, start: int) -> torch.Tensor:
        outs = []
        for xb, kw in acts.batches():
            h = xb
            for layer in self.layers[start:]:
                h = run_layer(layer, h, kw)
            h = self.model.model.norm(h[:, :-1:self.every])          # a subset of positions: the
            outs.append(F.log_softmax(self.model.lm_head(h).float(), -1))  # lm_head is the costly part
        return torch.cat(outs)

    def _nll(self, logp: torch.Tensor) -> float:
        target = self.tokens[:, 1::self.every][:, : logp.shape[1]]
        return float(-logp.gather(-1, target.unsqueeze(-1)).mean())

    def compare(self, acts: Activations, start: int) -> tuple[float, float]:
        logp = self._logp(acts, start)
        kl = float((self.ref_logp.exp() * (self.ref_logp - logp)).sum(-1).mean())
        return kl, self._nll(logp) - self.ref_nll


def _effective_rank(h: torch.Tensor) -> tuple[float, float]:
    """Entropy effective rank of the token × hidden matrix, and its top-k energy share."""
    s = torch.linalg.svdvals(h.double())
    p = s / s.sum()
    erank = float(torch.exp(-(p * torch.log(p.clamp(min=1e-30))).sum()))
    energy = s**2
    return erank, float(energy[:TOPK].sum() / energy.sum())


@contextlib.contextmanager
def _swapped(mods: dict, weights: dict):
    old = {n: mods[n].weight.data for n in weights}
    for n, w in weights.items():
        mods[n].weight.data = w
    try:
        yield
    finally:
        for n, w in old.items():
            mods[n].weight.data = w


@torch.no_grad()
def measure(model, acts: Activations, holdout: Activations, holdout_tokens: torch.Tensor,
            candidates: list[Option], *, unit_mode: str = "shared", method: str = "gptq",
            damp: float = 0.01, seed: int = 0, noise: float = 0.01, direct_bits: int = 4,
            progress: bool = True) -> Measurements:
    layers = decoder_layers(model)
    all_units = units(model, unit_mode)
    mods = dict(model.named_modules())
    ms = Measurements(options={option_key(o): o.to_dict() for o in candidates})
    tail = Tail(model, holdout_tokens, holdout)
    gen = torch.Generator().manual_seed(seed)
    lowest = min(candidates, key=lambda o: (o.bits, -o.group_size))
    x, xh = acts, holdout
    for i in tqdm(range(len(layers)), desc="measuring layers", disable=not progress):
        layer = layers[i]
        prefix = f"model.layers.{i}."
        lins = layer_linears(layer)
        groups = input_groups(lins)
        hess = {}
        with contextlib.ExitStack() as stack:          # all Hessians from one forward
            for g in groups:
                h = Hessian(next(iter(g.values())).in_features)
                stack.enter_context(CaptureInput(next(iter(g.values())), h.add, stop=False))
                hess.update({prefix + n: h for n in g})
            x_next = x.through(layer)

        # importance diagnostics of the block
        xin, xout = x.hidden[:, :-1].reshape(-1, x.hidden.shape[-1]), x_next.hidden[:, :-1].reshape(-1, x.hidden.shape[-1])
        influence = float(1 - F.cosine_similarity(xin, xout, dim=-1).mean())
        sample = xout[:: max(1, xout.shape[0] // 2048)]
        erank, topk_out = _effective_rank(sample)
        _, topk_in = _effective_rank(xin[:: max(1, xin.shape[0] // 2048)])
        ws = [m.weight.data.abs() for m in lins.values()]
        outliers = sum(int((w > OUTLIER_K * w.mean()).sum()) for w in ws) / sum(w.numel() for w in ws)

        lowest_w = {}
        for unit in (u for u in all_units if u.layer == i):
            entry = {"layer": i, "names": list(unit.names), "options": {},
                     "shapes": [[mods[n].in_features, mods[n].out_features] for n in unit.names],
                     "weights": sum(mods[n].in_features * mods[n].out_features for n in unit.names)}
            for o in candidates:
                num = den = 0.0
                qw = {}
                for n in unit.names:
                    W, H = mods[n].weight.data, hess[n].H
                    res = gptq(W, H, o, percdamp=damp, name=n) if method == "gptq" else rtn(W, o)
                    D = (W - res.weight).double()
                    num += float(torch.einsum("oi,ij,oj->", D, H.double(), D))
                    den += float(torch.einsum("oi,ij,oj->", W.double(), H.double(), W.double()))
                    qw[n] = res.weight
                    if o == lowest:
                        lowest_w[n] = res.weight
                m = entry["options"][option_key(o)] = {
                    "err": num / max(den, 1e-30),
                    "bytes": sum(o.bytes_for(mods[n].in_features, mods[n].out_features) for n in unit.names)}
                if o.bits <= direct_bits:       # large errors leave the linear regime: measure, don't assume
                    with _swapped(mods, qw):
                        m["dkl"], _ = tail.compare(xh, i)
            entry["alpha"] = _alpha(unit, mods, hess, tail, xh, i, gen, noise)
            ms.units[unit.key] = entry

        with _swapped(mods, lowest_w):                  # LieQ: this layer alone at the lowest option
            lieq_kl, lieq_dloss = tail.compare(xh, i)
        ms.layers.append({"layer": i, "block_influence": influence, "outlier_share": outliers,
                          "lieq_kl": lieq_kl, "lieq_dloss": lieq_dloss, "effective_rank": erank,
                          "topk_energy_gain": topk_out - topk_in, "lowest_option": option_key(lowest)})
        x, xh = x_next, xh.through(layer)
    return ms


def unit_dkl(unit: dict, key: str) -> float:
    """Predicted ΔKL of one unit at one option: the ΔKL measured with that option's own quantized
    weights where it was measured (options of ≤ `direct_bits` bits), else α·err (HIGGS' linear model,
    accurate for the small errors of 8-bit)."""
    o = unit["options"][key]
    return o["dkl"] if "dkl" in o else unit["alpha"] * o["err"]


def _alpha(unit: Unit, mods, hess, tail: Tail, xh: Activations, layer: int, gen, noise: float) -> float:
    """α = ΔKL / relative error, from Gaussian noise scaled to a relative output error `noise` over
    the whole unit (small, to stay in the linear regime)."""
    noisy, num, den = {}, 0.0, 0.0
    for n in unit.names:
        W, H = mods[n].weight.data, hess[n].H.double()
        N = torch.randn(W.shape, generator=gen) * W.std()
        noisy[n] = N
        num += float(torch.einsum("oi,ij,oj->", N.double(), H, N.double()))
        den += float(torch.einsum("oi,ij,oj->", W.double(), H, W.double()))
    scale = math.sqrt(noise * den / max(num, 1e-30))
    with _swapped(mods, {n: mods[n].weight.data + scale * N for n, N in noisy.items()}):
        kl, _ = tail.compare(xh, layer)
    return kl / noise
