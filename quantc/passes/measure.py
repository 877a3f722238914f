"""Sweep 1: measure, streaming one decoder layer at a time, on the original model's activations.

For every unit (linears that share one precision) and every candidate option: the relative output
error ‖(W−Ŵ)X‖²/‖WX‖² of GPTQ (or RTN) from the Hessian, the exact bytes the exporter writes, and
the predicted ΔKL of the model with that unit alone at that option. Each layer is loaded once per
sweep (`model.decoder_layer`), so memory holds one layer whatever the depth. Two predictors:

- `fisher` (default, O(L)): ΔKL ≈ ½·E[(∇ℓ·δ)²], the Fisher quadratic form of the output
  perturbation δ = ΔW·x. A backward sweep (one layer at a time, on the held-out slice) takes the
  gradients G of sampled-label probes ℓ = Σₜ rₜ·log p(yₜ), yₜ ~ p, rₜ = ±1, so E[(∇ℓ·δ)²] = 2·T·ΔKL
  to second order. Keeping only the diagonal over output channels and positions, and taking G² and
  x as independent (K-FAC), gives ΔKL ≈ Σ_c b_c·(ΔW H ΔWᵀ)_cc / (4·T) with b_c = Σ G²_c / probes:
  only the diagonal of ΔW H ΔWᵀ per option is kept (out_features numbers). Those approximations
  drop how errors of one channel or position add up coherently downstream, so the prediction is
  then scaled per option by Σ measured / Σ predicted over a fixed sample of 8 units (spread over the
  depth and the unit kinds) measured alone with their own weights at every solved option: a constant number
  of held-out streams carried through the same forward sweep, so still O(L). With `plan.check_uniform`,
  the uniform plan at each option is carried too, as a check of the whole-model prediction.
  With `solve: anchors` (the default), GPTQ solves one option per bit width and grid (the anchor:
  symmetric g128 where offered; "bit width" means bits with the same grid and solver settings) for
  every unit; each other option's diag(ΔW H ΔWᵀ) is predicted per output row as its round-to-
  nearest error (with mse options, a coarse clip search) × the anchor's GPTQ / round-to-nearest
  ratio of that row. Options that differ from the anchor only in group size or zero point then cost
  a cheap RTN instead of a solve, so a candidate set 4.5× as large costs little more than its
  anchors. Streams (sample and uniform) are carried for anchors only. A predicted option takes its
  anchor's factor × Σ solved / Σ predicted Fisher form over the calibration sample, whose units
  solve every option for that (keeping only the anchors' codes): the factor then also takes out
  the prediction's mean bias. `solve: all` solves and measures every option everywhere.
- `exact` (validation, O(L²) compute): the measured ΔKL of every unit × option of ≤ `direct_bits`
  bits with its real GPTQ weights, and HIGGS' α from injected noise for the rest. Every perturbed
  held-out stream starts at its layer and is carried forward together with the others, so each
  layer is still loaded once; the numbers equal those of re-running each tail on its own.

For every layer, importance diagnostics: block influence, outlier share, LieQ's quantize-this-layer-
alone ΔKL/Δloss (measured by `exact`, predicted by `fisher`), effective rank and top-k energy gain.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..calibration.hessian import CaptureInput, Hessian
from ..config import PREDICTORS
from ..distributed import SOLO, SOLVES, World
from ..gptq import QuantResult, energy, iter_gptq_options, row_errors, rtn
from ..family import family_of
from ..model import (CPU, Activations, Placement, Unit, decoder_layer, decoder_layers, final_norm, layer_linears,
                     layer_prefix, output_head, run_layer, source_weight, units)
from ..options import Option
from ..resume import MEASURE_FAULT_ENV, fault_point
from .quantize import input_groups

OUTLIER_K = 5.0          # a weight is an outlier when |w| > k · mean|w| of its matrix
TOPK = 8                 # singular directions counted in the top-k energy diagnostic


def anchors(candidates: list[Option]) -> list[int]:
    """For each candidate, the index of its anchor: the option of the same bits, grid and solver
    settings that GPTQ solves for every unit (solve: anchors) — symmetric, then group 128, then the
    widest group (per-channel the widest of all). An option alone in its kind is its own anchor
    (today's one-option-per-bits sets solve exactly as before)."""
    kind = lambda o: (o.bits, o.grid, o.act_order, o.static_groups, o.mse)
    rank = lambda o: (not o.sym, o.group_size != 128, o.size_order[1])     # then the widest group
    best: dict[tuple, int] = {}
    for j, o in enumerate(candidates):
        b = best.get(kind(o))
        if b is None or rank(o) < rank(candidates[b]):
            best[kind(o)] = j
    return [best[kind(o)] for o in candidates]


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


CALIBRATION_UNITS = 8      # fisher: units measured exactly at every solved option to fix the scale per option
PROXY_STEPS = 6            # solve: anchors: shrink factors of the RTN proxy's clip search, for mse options
#                            (GPTQ's own: 26).
#                            On SmolLM2's linears, 6 steps predict an option's GPTQ error within 5–15% (sd of
#                            log over 12 linears) where 1 step (no search) scatters 10–35%.
PROXY_DTYPE = torch.float32   # solve: anchors: the RTN proxies' diag(ΔW H ΔWᵀ) (float64: 2× the time, a ratio's worth)
KL_NOISE = 1e-7            # nats: below this a measured ΔKL is float rounding, not a signal


class Head:
    """The model's final norm and lm_head on a subset of positions of the held-out slice: KL(original
    ‖ perturbed) and Δ of the next-token loss, per token, against the reference.

    Each comparison works from the logit shift d = z − z_ref instead of two log-softmaxes:
    KL = LSE(z) − LSE(z_ref) − Σ p·d = log Σ p·e^d − Σ p·d, which with e = d − Σ p·d is
    log1p(Σ p·expm1(e)) (exact algebra). Beside the lm_head's matmul, a comparison's work over the
    vocabulary takes about a third of the two log-softmaxes' time (measured: 0.12 s against 0.33 s at
    4×128 positions × 49,152), at the same float32 accuracy (tests/test_measure.py: within 5e-4 of
    float64 on small shifts)."""

    def __init__(self, model, tokens: torch.Tensor, place: Placement, every: int = 2):
        self.model, self.tokens, self.every, self.place = model, tokens, every, place
        self.ref_z = self.ref_p = None
        self.positions = 0
        self._placed = False

    @contextlib.contextmanager
    def on_device(self):
        """Norm and lm_head on the compute device for the with-block (nested blocks move nothing)."""
        if self.place.is_default or self._placed:
            yield
            return
        mods = (final_norm(self.model), output_head(self.model))
        for m in mods:
            m.to(self.place.device)
        self._placed = True
        try:
            yield
        finally:
            self._placed = False
            for m in mods:
                m.to("cpu")

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        head = output_head(self.model)
        h = final_norm(self.model)(h[:, :-1:self.every].to(head.weight.dtype))
        return head(h).float()                  # a subset of positions: the lm_head is the costly part

    def targets(self) -> torch.Tensor:
        return self.tokens[:, 1::self.every]

    def set_reference(self, acts: Activations) -> None:
        """The unperturbed logits z_ref and p = softmax(z_ref), renormalised so that Σ p = 1 to float32
        rounding (the shift form below takes it as exact). Both stay for every comparison: two
        vocabulary-sized arrays (memory.activation_bytes counts them)."""
        with self.on_device():
            z = torch.cat([self.logits(xb) for xb, _ in acts.batches()])
        p = (z - torch.logsumexp(z, -1, keepdim=True)).exp_()
        self.ref_z, self.ref_p = z, p.div_(p.sum(-1, keepdim=True))
        self.positions = z.shape[0] * z.shape[1]     # every comparison averages over these

    def drop_reference(self) -> None:
        """Free z_ref and p once every comparison is done (`positions` stays): the fisher probes'
        backward sweep runs after the comparisons and needs neither."""
        self.ref_z = self.ref_p = None

    def compare(self, acts: Activations) -> tuple[float, float]:
        """(KL(original ‖ perturbed), Δ next-token loss), means over the compared positions. Per
        position, with d = z − z_ref, d̄ = Σ p·d and shift = LSE(z) − LSE(z_ref) − d̄:
        KL = shift and Δloss = (LSE(z) − z_y) − (LSE(z_ref) − z_ref,y) = d̄ + shift − d_y."""
        kl = dloss = 0.0
        row = 0
        with self.on_device():
            for xb, _ in acts.batches():
                d = self.logits(xb)
                rows = slice(row, row + d.shape[0])
                row += d.shape[0]
                p = self.ref_p[rows]
                d.sub_(self.ref_z[rows])                             # the logit shift, in place
                target = self.targets()[rows, : d.shape[1]].to(d.device)
                d_y = d.gather(-1, target.unsqueeze(-1)).squeeze(-1)
                d_bar = torch.einsum("btv,btv->bt", p, d)
                shift = torch.log1p(torch.einsum("btv,btv->bt", p, d.sub_(d_bar.unsqueeze(-1)).expm1_()))
                kl += float(shift.double().sum())
                dloss += float((d_bar + shift - d_y).double().sum())
        return kl / self.positions, dloss / self.positions


@torch.no_grad()
def divergence(model, tokens: torch.Tensor, ref: Activations, hat: Activations, place: Placement = CPU) -> dict:
    """The compile's check at the head (passes/quantize.py HeldOut): KL(original ‖ quantized) and Δ of the
    next-token loss per token, over every second position as the measurement's Head compares, from
    the final hidden states of the original (`ref`) and the quantized (`hat`) model on `tokens`. One
    sequence at a time, so only one sequence's vocabulary-sized arrays are alive."""
    kl = dloss = 0.0
    positions, bs = 0, ref.batch_size
    for j, ((r, kw), (h, _)) in enumerate(zip(ref.batches(), hat.batches())):
        for row in range(r.shape[0]):
            head = Head(model, tokens[j * bs + row: j * bs + row + 1], place)
            head.set_reference(Activations(r[row:row + 1], [kw], 1, None, place))
            k, d = head.compare(Activations(h[row:row + 1], [kw], 1, None, place))
            kl, dloss, positions = kl + k * head.positions, dloss + d * head.positions, positions + head.positions
    return {"sequences": int(tokens.shape[0]), "positions": positions, "kl": kl / max(positions, 1),
            "delta_loss": dloss / max(positions, 1)}


def _effective_rank(h: torch.Tensor) -> tuple[float, float]:
    """Entropy effective rank of the token × hidden matrix, and its top-k energy share (singular values
    from the eigenvalues of the hidden × hidden Gram matrix: far cheaper than an SVD of the tokens)."""
    h = h.double()
    return _spectrum(h.t() @ h if h.shape[0] >= h.shape[1] else h @ h.t())   # the smaller side: same values


def _spectrum(gram: torch.Tensor) -> tuple[float, float]:
    s = torch.linalg.eigvalsh(gram).flip(0).clamp(min=0).sqrt()
    p = s / s.sum()
    erank = float(torch.exp(-(p * torch.log(p.clamp(min=1e-30))).sum()))
    energy = s**2
    return erank, float(energy[:TOPK].sum() / energy.sum())


@contextlib.contextmanager
def _swapped(mods: dict, weights: dict):
    """The linears named in `weights` run with those weights instead of their own: a tensor is set
    for the whole block; a QuantResult (an option's codes) is dequantized just before its linear
    runs and dropped after, so at most one dequantized linear exists at a time (at 8B width, every
    option's float weights of a layer would be several GB)."""
    old = {n: mods[n].weight.data for n in weights}
    handles = []
    for n, w in weights.items():
        if isinstance(w, torch.Tensor):
            mods[n].weight.data = w
            continue

        def pre(mod, args, res=w, like=old[n]):
            mod.weight.data = res.dequantize().to(like.device, like.dtype)

        def post(mod, args, out, like=old[n]):
            mod.weight.data = like
        handles += [mods[n].register_forward_pre_hook(pre), mods[n].register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for n, w in old.items():
            mods[n].weight.data = w


@torch.no_grad()
def measure(model, acts: Activations, holdout: Activations, holdout_tokens: torch.Tensor,
            candidates: list[Option], *, predictor: str = "fisher", probes: int = 8, unit_mode: str = "shared",
            method: str = "gptq", damp: float = 0.01, seed: int = 0, noise: float = 0.01, direct_bits: int = 4,
            progress: bool = True, place: Placement = CPU, solve: str = "anchors",
            release_inputs: bool = False, point=None, qep_beta: float = 1.0,
            check_uniform: bool = False) -> Measurements:
    """Sweep 1 (see the module docstring). `point` (resume.MeasurePoint): where each finished layer is
    saved, and the state an interrupted run of the same measurement continues from. `qep_beta` (fisher):
    the factor on the gradient that enters every linear's input in the backward sweep (1 − α·ρ, see
    `_fisher_diagonal`; 1: none). `check_uniform` (fisher): also carry the uniform plan at each solved
    option to the head, as a check of the whole-model prediction (meta.calibration; no plan reads it)."""
    if predictor not in PREDICTORS:
        raise ValueError(f"unknown predictor {predictor!r}; one of {PREDICTORS}")
    n_layers, fam = len(decoder_layers(model)), family_of(model)
    by_layer: dict[int, list[Unit]] = {}
    for u in units(model, unit_mode):
        by_layer.setdefault(u.layer, []).append(u)
    ms = Measurements(options={option_key(o): o.to_dict() for o in candidates})
    head = Head(model, holdout_tokens, place)
    gen = torch.Generator().manual_seed(seed)
    lowest = min(candidates, key=lambda o: o.size_order)
    exact = predictor == "exact"
    anchor = (anchors(candidates) if solve == "anchors" and not exact and method == "gptq"
              else list(range(len(candidates))))
    anchor_keys = {option_key(o): option_key(candidates[a]) for o, a in zip(candidates, anchor)}
    world, owned = place.world, 0
    # The held-out streams are split over the ranks: stream j (in the order made, the same on every
    # rank) is carried and compared by rank world.owner(j) alone. Every rank still runs what the
    # streams share (the unperturbed stream xh, the codes, the random draws), so each stream's numbers
    # do not depend on where it runs.
    keys: list[tuple] = []                          # every stream's key, on every rank

    def own(key: tuple) -> bool:
        keys.append(key)
        return world.mine(len(keys) - 1)
    streams: dict[tuple, torch.Tensor] = {}        # this rank's perturbed held-out streams, from their layer on
    uniform = ({} if exact or not check_uniform else      # fisher, as a check: the uniform plan at each option
               {k: holdout.hidden for k in (option_key(candidates[a]) for a in sorted(set(anchor)))   # solved for
                if own(("uniform", k))})                                                          # every unit
    sample = set() if exact else calibration_sample(by_layer, n_layers, CALIBRATION_UNITS)
    held_in: list[torch.Tensor] = []                # fisher: the held-out inputs of every layer
    sq: dict[str, dict[str, torch.Tensor]] = {}      # fisher: linear -> option -> diag(ΔW H ΔWᵀ)
    sq_solved: dict[str, dict[str, torch.Tensor]] = {}   # the sample's predicted options, solved
    x, xh = acts, holdout
    start = 0
    found = point.load(acts.batch_size) if point is not None else None
    if found is not None:               # an interrupted run of the same measurement: its finished layers
        start, done, st = found
        for rec in done:
            ms.units.update(rec["units"])
            ms.layers.append(rec["diagnostics"])
            sq.update(rec["sq"])
            sq_solved.update(rec["sq_solved"])
            if not exact:              # where a measured layer keeps it: offloaded, in a file
                held_in.append(holdout.like(rec["held_in"]).hidden)
        x = acts.like(st["x"]) if st["x"] is not None else None     # None: every layer was done
        xh = holdout.like(st["xh"])
        keys[:] = st["keys"]                # the point's load hands each rank its own streams
        streams = {k: holdout.like(v).hidden for k, v in st["streams"].items()}
        uniform = {k: holdout.like(v).hidden for k, v in st["uniform"].items()}
        owned = st["owned"]
        gen.set_state(st["gen"])
        found = st = done = rec = None  # the restored tensors live on only where they were placed above
        if release_inputs:
            acts.release()
            holdout.release()
    for i in tqdm(range(start, n_layers), initial=start, total=n_layers, desc="measuring layers",
                  disable=not progress):
        with decoder_layer(model, i, place) as layer:
            lins = layer_linears(layer)
            prefix = layer_prefix(model, i)
            mods = {prefix + n: m for n, m in lins.items()}
            hess = {}
            with contextlib.ExitStack() as stack:           # all Hessians from one forward
                for g in input_groups(lins, fam):
                    first = next(iter(g.values()))
                    h = Hessian(first.in_features, device=place.device, world=world)
                    stack.enter_context(CaptureInput(first, h.add, stop=False))
                    hess.update({prefix + n: h for n in g})
                x_next = x.through(layer)
            for h in dict.fromkeys(hess.values()):          # distributed: summed over ranks, in this order
                h.finish()
            h = None                                        # the loop's last Hessian: only `hess` holds them
            ms.layers.append(_diagnostics(i, x, x_next, lins, lowest, world))
            # older streams: through the original layer i
            for k in list(streams):     # in place: each old stream goes as its successor comes
                streams[k] = xh.like(streams[k]).through(layer).hidden
            if not exact:
                held_in.append(xh.hidden)

            quantized: dict[str, dict[str, QuantResult]] = {option_key(o): {} for o in candidates}   # codes
            here, first = by_layer.get(i, []), owned     # this layer's units are numbered first, first + 1, ...
            owned += len(here)
            # distributed: units go round-robin over the ranks; each rank solves all of its units before
            # any result is sent, so the solves run in parallel. Largest first: the widest input's
            # Cholesky and option stack are the layer's largest working set, and they then coexist
            # with no other unit's codes; each Hessian goes once its last unit is solved (the exact
            # predictor keeps them for its noise probes).
            order = sorted((j for j in range(first, owned) if world.mine(j)),
                           key=lambda j: _solve_size(here[j - first], mods))
            solved: dict = {}
            for n_done, j in enumerate(order):
                if not exact:
                    _release_hessians(hess, [here[jj - first] for jj in order[n_done:]])
                u = here[j - first]
                solved[j] = _solve_unit(u, prefix, layer, mods, hess, candidates, method, damp,
                                        keep_sq=not exact, anchor=anchor, every=u.key in sample,
                                        parts={n: fam.parts(n) for n in u.names})
                SOLVES.add("measure")
            if not exact:
                hess.clear()
            for j, unit in enumerate(here, start=first):
                entry, weights, unit_sq, unit_solved = world.broadcast(solved.pop(j, None), world.owner(j))
                for k, ws in weights.items():
                    quantized[k].update(ws)
                for n, per in unit_sq.items():
                    sq.setdefault(n, {}).update(per)
                for n, per in unit_solved.items():
                    sq_solved.setdefault(n, {}).update(per)
                for j_o, o in enumerate(candidates):
                    k = option_key(o)
                    # measured with its own weights: the exact predictor's options; the fisher sample's
                    # solved-everywhere options (a predicted option's factor comes from its anchor's)
                    if ((exact and o.bits <= direct_bits) or (unit.key in sample and anchor[j_o] == j_o)) \
                            and own(("dkl", unit.key, k)):
                        with _swapped(mods, {n: quantized[k][n] for n in unit.names}):
                            streams[("dkl", unit.key, k)] = xh.through(layer).hidden
                if exact:
                    noisy = _noisy(unit, mods, hess, gen, noise)     # every rank: the generator moves alike
                    if own(("alpha", unit.key)):
                        with _swapped(mods, noisy):
                            streams[("alpha", unit.key)] = xh.through(layer).hidden
                    noisy = None
                ms.units[unit.key] = entry
            if exact and own(("lieq", i)):                  # LieQ: this layer alone at the lowest option
                with _swapped(mods, quantized[option_key(lowest)]):
                    streams[("lieq", i)] = xh.through(layer).hidden
            for k, v in uniform.items():                    # fisher: the uniform plan at each option
                with _swapped(mods, quantized[k]):
                    uniform[k] = xh.like(v).through(layer).hidden
            x, xh = x_next, xh.through(layer)
            if release_inputs and i == 0:     # handed over: the layer-0 inputs are not needed again (the held-out
                acts.release()                # ones live on as held_in[0]); the decorator's arguments hold
                holdout.release()             # the two objects for the whole sweep, so their tensors go here
            # the layer's codes and Hessians go now, not when the next layer rebinds the names: the
            # next capture's float64 sums and the next solves would run beside them
            quantized = weights = ws = hess = None
        if point is not None:
            every = world.gather((streams, uniform))      # rank 0 saves every rank's streams, in the order made
            if every is not None:
                every = _in_order(keys, every)
            names = [n for u in here for n in u.names]
            point.save(i, {"units": {u.key: ms.units[u.key] for u in here}, "diagnostics": ms.layers[-1],
                           "sq": {n: sq[n] for n in names if n in sq},
                           "sq_solved": {n: sq_solved[n] for n in names if n in sq_solved},
                           "held_in": None if exact else held_in[-1]},
                       {"xh": xh.hidden, "streams": every and every[0], "uniform": every and every[1],
                        "keys": keys, "owned": owned, "gen": gen.get_state()},
                       x.hidden if i + 1 < n_layers else None)      # after the last layer: no next one
            every = None            # rank 0's copies (one process: the last layer's streams themselves)
            fault_point(i, world.rank, MEASURE_FAULT_ENV)

    with head.on_device():                          # moved once for every comparison below
        head.set_reference(xh)
        SOLVES.add("streams", len(streams) + len(uniform))     # the streams this rank carried to the head
        found = _compared(head, xh, {**streams, **{("uniform", k): v for k, v in uniform.items()}}, keys, world)
        streams = uniform = None                    # compared: they go before the backward sweep,
        head.drop_reference()                       # and so do the reference logits
        if exact:
            _exact_results(ms, found, noise)
        else:
            acc = _fisher_diagonal(model, head, held_in, xh, probes, gen, place, progress, world=world,
                                   beta=qep_beta)
            _fisher_results(ms, head.positions, sq, acc, found, sq_solved, anchor_keys)
    if not exact and qep_beta != 1.0:
        ms.meta["qep_beta"] = qep_beta
    ms.meta.update({"predictor": predictor, "probes": None if exact else probes, "anchors": anchor_keys,
                    "held_out_streams": len(keys)})
    return ms


def _solve_size(unit: Unit, mods: dict) -> tuple[int, int]:
    """Sort key, largest solve first: the widest input (its Cholesky's n × n matrices), then weights."""
    return (-max(mods[n].in_features for n in unit.names), -sum(mods[n].weight.numel() for n in unit.names))


def _release_hessians(hess: dict, pending: list[Unit]) -> None:
    """Drop from `hess` every Hessian that no unit in `pending` reads (linears sharing an input share
    one object: it goes with its last reader)."""
    keep = {id(hess[n]) for u in pending for n in u.names}
    for n in [n for n, h in hess.items() if id(h) not in keep]:
        del hess[n]


def _solve_unit(unit: Unit, prefix: str, layer, mods: dict, hess: dict, candidates: list[Option], method: str,
                damp: float, keep_sq: bool, anchor: list[int] | None = None, every: bool = False,
                parts: dict[str, int] | None = None):
    """Every candidate option of one unit: (its measurement entry, {option key: {linear: quantized
    weight}}, {linear: {option key: diag(ΔW H ΔWᵀ)}} for the fisher predictor, {linear: {predicted
    option key: its solved diag}} for the calibration sample). A pure function of the unit's weights
    and Hessians: the same on whichever rank solves it. `anchor` (solve: anchors): each option's
    anchor; only anchors are solved, the other options' errors are predicted (_predicted), and only
    anchors' codes are kept. `every` (the calibration sample): every option is solved too, and a
    predicted option's solved error is returned beside its prediction (and kept as err_solved). `parts`:
    how many linears the export writes each one as (Family.parts; the entry keeps them where any is not 1)."""
    anchor = anchor if anchor is not None else list(range(len(candidates)))
    parts = {n: (parts or {}).get(n, 1) for n in unit.names}
    predict = [j for j, a in enumerate(anchor) if a != j]
    solve = list(range(len(candidates))) if every else sorted(set(anchor))
    entry = {"layer": unit.layer, "names": list(unit.names), "options": {}, "alpha": None,
             "shapes": [[mods[n].in_features, mods[n].out_features] for n in unit.names],
             "weights": sum(mods[n].in_features * mods[n].out_features for n in unit.names),
             **({"parts": [parts[n] for n in unit.names]} if set(parts.values()) != {1} else {})}
    hinv: dict = {}                 # linears reading one input share its Hessian's Cholesky
    W = {n: source_weight(layer, n[len(prefix):]) for n in unit.names}   # float32 source values
    den = sum(energy(W[n], hess[n].H) for n in unit.names)
    weights: dict[str, dict[str, QuantResult]] = {}
    sq: dict[str, dict[str, torch.Tensor]] = {}
    sq_solved: dict[str, dict[str, torch.Tensor]] = {}   # the calibration sample: predicted options, solved
    num = {option_key(o): 0.0 for o in candidates}
    solved_num: dict[str, float] = {}
    for n in unit.names:
        # options in stacks (iter_gptq_options): each result is reduced to its error terms and codes
        # as it comes, so only one stack's float weights exist at a time
        solved = (iter_gptq_options(W[n], hess[n].H, [candidates[c] for c in solve], percdamp=damp, name=n,
                                    hinv=hinv.setdefault(id(hess[n]), {}))
                  if method == "gptq" else ((c, rtn(W[n], candidates[solve[c]])) for c in range(len(solve))))
        per_option = {}
        for c, res in solved:
            k = option_key(candidates[solve[c]])
            per_option[k] = row_errors(W[n] - res.weight, hess[n].H)     # diag(ΔW H ΔWᵀ)
            if anchor[solve[c]] == solve[c]:        # only anchors' codes are swapped in, by anyone
                weights.setdefault(k, {})[n] = res.codes_only()
        if predict:
            pred = _predicted(W[n], hess[n].H, candidates, anchor, predict, per_option)
            for k, v in pred.items():
                if k in per_option:
                    solved_num[k] = solved_num.get(k, 0.0) + float(per_option[k].sum())
                    sq_solved.setdefault(n, {})[k] = per_option[k].cpu()
                per_option[k] = v
        for o in candidates:                    # summed in candidate order, whatever the stack order
            k = option_key(o)
            num[k] += float(per_option[k].sum())
            if keep_sq:
                sq.setdefault(n, {})[k] = per_option[k].cpu()
    for j, o in enumerate(candidates):
        k = option_key(o)
        entry["options"][k] = {
            "err": num[k] / max(den, 1e-30),
            "bytes": sum(o.bytes_for(mods[n].in_features, mods[n].out_features, parts[n]) for n in unit.names)}
        if j in predict:
            entry["options"][k]["predicted_from"] = option_key(candidates[anchor[j]])
        if k in solved_num:
            entry["options"][k]["err_solved"] = solved_num[k] / max(den, 1e-30)
    return entry, weights, sq, sq_solved


def _predicted(W: torch.Tensor, H: torch.Tensor, candidates: list[Option], anchor: list[int], predict: list[int],
               solved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diag(ΔW H ΔWᵀ) of the options in `predict`, from their anchors' solved ones: per output row,
    RTN(option) × GPTQ(anchor) / RTN(anchor), RTN on the option's grid with a coarse clip search
    (PROXY_STEPS). GPTQ's gain over rounding depends mostly on H and the bit width, which the option
    shares with its anchor; the row's RTN error carries what the group size and zero point change.
    A row the anchor's rounding leaves exact keeps its RTN error."""
    proxy: dict[int, torch.Tensor] = {}

    def rtn_err(j: int) -> torch.Tensor:
        if j not in proxy:
            proxy[j] = row_errors(W - rtn(W, candidates[j], steps=PROXY_STEPS).weight, H, PROXY_DTYPE)
        return proxy[j]
    out = {}
    for j in predict:
        a = anchor[j]
        ra = rtn_err(a)
        ratio = torch.where(ra > 0, solved[option_key(candidates[a])] / ra.clamp(min=1e-300), torch.ones_like(ra))
        out[option_key(candidates[j])] = rtn_err(j) * ratio
    return out


def _diagnostics(i: int, x: Activations, x_next: Activations, lins: dict, lowest: Option,
                 world: World = SOLO) -> dict:
    """Importance diagnostics of block i (LieQ's ΔKL is filled in after the sweep). The streams are
    read batch by batch, as the sweep reads them: they may live in offload files or on the host
    while the layer runs on a GPU, and whole-stream copies cost about five streams of memory (2.5 GiB
    for two 512 MiB streams: tests/test_measure.py) that the estimate does not count. The sums and the
    sampled rows stay on the compute device, where the batches arrive. The spectra sample every
    step-th row of the whole row order (all ranks' rows, in rank order), as before. In a distributed run
    the sums behind them are all-reduced (float64), so these report-only numbers differ from one
    process's only in their last digits."""
    n, t, hid = x.hidden.shape[0], x.hidden.shape[1] - 1, x.hidden.shape[-1]
    rows = torch.zeros(world.size, dtype=torch.float64)
    rows[world.rank] = n * t
    rows = world.all_reduce(rows)                         # every rank's row count (ranks hold rows in order)
    step = max(1, int(rows.sum()) // 2048)
    row = int(rows[:world.rank].sum())                    # this rank's first row, globally
    dev = x.place.device                                  # where the batches come to: the sums stay there
    cos_sum = torch.zeros(1, dtype=torch.float64, device=dev)
    picked_in, picked_out = [], []
    for (xb, _), (yb, _) in zip(x.batches(), x_next.batches()):
        a, b = xb[:, :-1], yb[:, :-1]                     # views: the batch is not copied to flatten it
        cos_sum += F.cosine_similarity(a.float(), b.float(), dim=-1).double().sum()
        n_rows = a.shape[0] * a.shape[1]
        idx = torch.arange((-row) % step, n_rows, step, device=a.device)   # on the global step grid
        picked_in.append(a[idx // t, idx % t].double())
        picked_out.append(b[idx // t, idx % t].double())
        row += n_rows
    none = torch.zeros(0, hid, dtype=torch.float64, device=dev)  # a rank without a batch: no rows
    xin, xout = torch.cat([none, *picked_in]), torch.cat([none, *picked_out])
    influence = float(1 - float(world.all_reduce(cos_sum)[0]) / rows.sum())
    if world.active:
        grams = [world.all_reduce(h.t() @ h) for h in (xout, xin)]
        (erank, topk_out), (_, topk_in) = _spectrum(grams[0]), _spectrum(grams[1])
    else:
        erank, topk_out = _effective_rank(xout)
        _, topk_in = _effective_rank(xin)
    ws = [m.weight.data.abs() for m in lins.values()]
    outliers = sum(int((w > OUTLIER_K * w.mean()).sum()) for w in ws) / sum(w.numel() for w in ws)
    return {"layer": i, "block_influence": influence, "outlier_share": outliers, "lieq_kl": None,
            "lieq_dloss": None, "effective_rank": erank, "topk_energy_gain": topk_out - topk_in,
            "lowest_option": option_key(lowest)}


def _noisy(unit: Unit, mods, hess, gen, noise: float) -> dict[str, torch.Tensor]:
    """The unit's weights plus Gaussian noise scaled to a relative output error `noise` over the
    whole unit (small, to stay in the linear regime): α = ΔKL / noise (HIGGS)."""
    noisy, num, den = {}, 0.0, 0.0
    for n in unit.names:
        W, H = mods[n].weight.data, hess[n].H
        N = (torch.randn(W.shape, generator=gen) * W.float().std().cpu()).to(W.device)
        noisy[n] = N
        num += energy(N, H)
        den += energy(W, H)
    scale = math.sqrt(noise * den / max(num, 1e-30))
    return {n: (mods[n].weight.data + scale * N).to(mods[n].weight.dtype) for n, N in noisy.items()}


def _in_order(keys: list[tuple], parts: list) -> tuple[dict, dict]:
    """Every rank's (streams, uniform streams), merged in the order the streams were made."""
    streams, uniform = {}, {}
    for s, u in parts:
        streams.update(s)
        uniform.update(u)
    return ({k: streams[k] for k in keys if k in streams},
            {k[1]: uniform[k[1]] for k in keys if k[0] == "uniform" and k[1] in uniform})


def _compared(head: Head, xh: Activations, streams: dict, keys: list[tuple], world: World) -> dict:
    """(ΔKL, Δloss) at the head of every stream, in the order made, on every rank: each rank compares
    its own streams (a comparison depends only on its stream), and the results are exchanged."""
    mine = {k: head.compare(xh.like(v)) for k, v in streams.items()}
    found = {}
    for part in world.all_gather(mine):
        found.update(part)
    return {k: found[k] for k in keys}


def _exact_results(ms: Measurements, found: dict, noise: float) -> None:
    """Each perturbed stream's ΔKL at the head: dkl of unit × option, α of each unit, LieQ per layer."""
    for key, (kl, dloss) in found.items():
        if key[0] == "dkl":
            ms.units[key[1]]["options"][key[2]]["dkl"] = kl
        elif key[0] == "alpha":
            ms.units[key[1]]["alpha"] = kl / noise
        else:
            ms.layers[key[1]].update(lieq_kl=kl, lieq_dloss=dloss)


def _fisher_diagonal(model, head: Head, held_in: list[torch.Tensor], final: Activations, probes: int,
                     gen: torch.Generator, place: Placement, progress: bool,
                     world: World = SOLO, beta: float = 1.0) -> dict[str, torch.Tensor]:
    """Backward sweep, one layer at a time from the last: for every linear, the squared gradient of
    the probes ℓ w.r.t. its output, summed over held-out positions and probes, / probes, per channel.
    The probes are split over the ranks (probe k on rank world.owner(k); every rank draws every
    probe's labels, so the generator moves alike): each layer's per-probe sums are exchanged and
    added in one order, batch by batch and probe by probe, as one process adds them.

    `beta` < 1 (plan.qep_discount): the gradient that enters any linear through its input is scaled
    by β = 1 − α·ρ. Error propagation refits every later linear to map the quantized model's inputs
    to the original outputs, which removes a share (α·ρ) of an upstream error's effect through that
    linear; the residual stream and the head carry theirs whole. An error is then weighted by what
    reaches the head in a QEP compile: q/k/v's and gate/up's through their own layer's o/down by β,
    and every unit's through the later layers' blocks by β per linear on the path."""
    mine = [k for k in range(probes) if world.mine(k)]
    g_next = []                         # [batch][probe]: ∂ℓ/∂(hidden states leaving the current layer)
    with head.on_device(), torch.enable_grad():
        lm_head = output_head(model)
        head_w = lm_head.weight
        head_f = head_w.float()
        for xb, _ in final.batches():
            h = xb.detach().requires_grad_()
            hn = final_norm(model)(h[:, :-1:head.every].to(head_w.dtype))
            with torch.no_grad():
                p = lm_head(hn).float().softmax(-1)
                pw = p @ head_f                       # shared by every probe: (onehot(y) − p)·W = W[y] − p·W
            labels = probe_labels(p, probes, gen)
            p = None
            per = [None] * probes       # another rank's probe: None here
            for k in mine:              # ∂ℓ/∂logits = r·(onehot(y) − p), y ~ p, r = ±1
                y, r = labels[k]
                g_hn = r.unsqueeze(-1) * (head_f[y] - pw)
                per[k] = torch.autograd.grad(hn, h, g_hn.to(hn.dtype), retain_graph=k != mine[-1])[0].detach()
            g_next.append(per)
    acc: dict[str, torch.Tensor] = {}
    n_layers = len(held_in)
    for i in tqdm(reversed(range(n_layers)), total=n_layers, desc="measuring layers (backward)",
                  disable=not progress):
        with decoder_layer(model, i, place) as layer:
            lins = layer_linears(layer)
            sums = {n: torch.zeros(m.out_features, dtype=torch.float64) for n, m in lins.items()}
            parts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}    # (batch, probe) -> linear -> sum
            for j, (xb, kw) in enumerate(final.like(held_in[i]).batches()):
                if not mine:                                    # more ranks than probes: nothing to run here
                    break
                outs: dict[str, torch.Tensor] = {}
                hooks = [m.register_forward_hook(lambda _m, _a, o, n=n: outs.__setitem__(n, o))
                         for n, m in lins.items()]
                if beta != 1.0:
                    hooks += [m.register_forward_pre_hook(lambda _m, a: (_scaled_grad(a[0], beta),) + a[1:])
                              for m in lins.values()]
                try:
                    with torch.enable_grad():                   # one forward, every probe backward through it
                        x = xb.detach().requires_grad_()
                        y = run_layer(layer, x, kw)
                finally:
                    for hk in hooks:
                        hk.remove()
                names = list(outs)
                for k in mine:
                    with torch.enable_grad():
                        gs = torch.autograd.grad(y, [x] + [outs[n] for n in names], g_next[j][k].to(y.dtype),
                                                 retain_graph=k != mine[-1], allow_unused=True)
                    g_next[j][k] = gs[0].detach()
                    parts[(j, k)] = {n: g.double().pow(2).reshape(-1, g.shape[-1]).sum(0).cpu()
                                     for n, g in zip(names, gs[1:]) if g is not None}
                del y, outs
            every = {}
            for part in world.all_gather(parts):
                every.update(part)
            for jk in sorted(every):                        # batch by batch, probe by probe
                for n, v in every[jk].items():
                    sums[n] += v
            acc.update({layer_prefix(model, i) + n: v / probes for n, v in sums.items()})
    return acc


def probe_labels(p: torch.Tensor, probes: int, gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each probe's sampled labels y ~ p (inverse CDF in float64) and signs r = ±1, for a batch of
    next-token distributions p (sequences × positions × vocabulary). The draws are made first, in
    the order one loop over the probes makes them (u, then r, per probe); the CDF is then built one
    sequence at a time, because a batch's float64 copy and CDF are four vocabulary-sized float32
    arrays per sequence (151,936 entries per position for Qwen2.5). Every probe shares the CDF."""
    draws = [(torch.rand(p.shape[:-1], generator=gen, dtype=torch.float64).to(p.device),
              (torch.randint(0, 2, p.shape[:-1], generator=gen) * 2 - 1).to(p)) for _ in range(probes)]
    ys = [torch.empty(p.shape[:-1], dtype=torch.long, device=p.device) for _ in range(probes)]
    for s in range(p.shape[0]):
        cdf = p[s].double().cumsum(-1)
        for k, (u, _) in enumerate(draws):
            ys[k][s] = torch.searchsorted(cdf, (u[s] * cdf[..., -1]).unsqueeze(-1)).squeeze(-1)
    return [(y.clamp_(max=p.shape[-1] - 1), r) for y, (_, r) in zip(ys, draws)]


def _scaled_grad(x: torch.Tensor, beta: float) -> torch.Tensor:
    """x itself in the forward; the gradient that flows back into x through this use is × beta (a
    view, so x's other uses keep theirs)."""
    v = x.view_as(x)
    if v.requires_grad:
        v.register_hook(lambda g: g * beta)
    return v


def calibration_sample(by_layer: dict[int, list[Unit]], n_layers: int, m: int) -> set[str]:
    """`m` units spread over the depth and over the unit kinds (q/k/v, o, gate/up, down in turn): the
    fisher predictor measures these exactly at every option to fix its scale. A fixed number of
    streams, each at most one pass over the layers: the cost stays O(layers)."""
    out = []
    for j in range(min(m, sum(len(v) for v in by_layer.values()))):
        i = round(j * (n_layers - 1) / max(m - 1, 1))
        units_i = by_layer.get(i, [])
        if units_i:
            out.append(units_i[j % len(units_i)].key)
    return set(out)


def _fisher_results(ms: Measurements, targets: int, sq: dict, acc: dict, found: dict,
                    sq_solved: dict | None = None, anchor: dict | None = None) -> None:
    """Predicted ΔKL of every unit × option: the Fisher form, scaled per option by Σ measured / Σ
    Fisher over the calibration sample (units measured alone with their own weights, the regime the
    allocator adds up). Options without a usable sample (measured ΔKL not above float noise) take the
    factor of the nearest calibrated bit width. A predicted option (solve: anchors; `anchor` maps
    each option to its anchor) takes its anchor's factor times Σ solved / Σ predicted Fisher form over
    the sample, which takes out the prediction's mean bias. The uniform plans are measured too, as a
    check of the whole-model prediction (meta.calibration). `found`: each held-out stream's measured
    (ΔKL, Δloss), in the order the streams were made (_compared); `targets`: the positions compared."""
    anchor = anchor or {k: k for k in ms.options}
    sq_solved = sq_solved or {}
    for u in ms.units.values():
        for k, o in u["options"].items():
            o["fisher"] = sum(float((acc[n] * sq[n][k]).sum()) for n in u["names"]) / (4 * targets)
            if all(k in sq_solved.get(n, {}) for n in u["names"]):      # the sample's predicted options
                o["fisher_solved"] = sum(float((acc[n] * sq_solved[n][k]).sum()) for n in u["names"]) / (4 * targets)
    measured: dict[str, float] = {}
    fisher: dict[str, float] = {}
    sample_runs = [(key[1], key[2], kl) for key, (kl, _) in found.items() if key[0] == "dkl"]
    for key, k, kl in sample_runs:                     # the calibration sample, measured alone
        ms.units[key]["options"][k]["measured"] = kl
        measured[k] = measured.get(k, 0.0) + kl
        fisher[k] = fisher.get(k, 0.0) + ms.units[key]["options"][k]["fisher"]
    cal = {}
    for k in ms.options:
        if anchor[k] != k:
            continue
        ok = measured.get(k, 0.0) > KL_NOISE and fisher.get(k, 0.0) > 0
        cal[k] = {"sample_measured": measured.get(k), "sample_fisher": fisher.get(k),
                  "factor": measured[k] / fisher[k] if ok else None}
    good = [k for k, c in cal.items() if c["factor"] is not None]
    for k, c in cal.items():
        if c["factor"] is None:
            near = min(good, key=lambda g: (abs(ms.options[g]["bits"] - ms.options[k]["bits"]),
                                            -ms.options[g]["bits"]), default=None)
            c["factor"], c["from"] = (cal[near]["factor"], near) if near else (1.0, None)
    sample = sorted({key for key, _, _ in sample_runs})   # sorted: sums in one order in every process
    for k in ms.options:                               # predicted options: the anchor's factor, debiased
        if anchor[k] == k:
            continue
        pred = sum(ms.units[u]["options"][k]["fisher"] for u in sample)
        real = sum(ms.units[u]["options"][k].get("fisher_solved", 0.0) for u in sample)
        bias = real / pred if pred > 0 and real > 0 else 1.0
        cal[k] = {"sample_fisher": pred, "sample_fisher_solved": real, "anchor": anchor[k],
                  "factor": cal[anchor[k]]["factor"] * bias}
    cal = {k: cal[k] for k in ms.options}              # in candidate order
    for u in ms.units.values():
        for k, o in u["options"].items():
            o["dkl"] = cal[k]["factor"] * o["fisher"]
    for k in (key[1] for key in found if key[0] == "uniform"):   # check: the whole model at one option
        cal[k]["uniform_measured"] = found[("uniform", k)][0]
        cal[k]["uniform_predicted"] = sum(u["options"][k]["dkl"] for u in ms.units.values())
    low = ms.layers[0]["lowest_option"] if ms.layers else None
    for layer in ms.layers:         # LieQ's layer importance, predicted: its units at the lowest option
        kl = sum(u["options"][low]["dkl"] for u in ms.units.values() if u["layer"] == layer["layer"])
        layer.update(lieq_kl=kl, lieq_dloss=None)     # predicted ΔKL; no Δloss without a measured stream
    ms.meta["calibration"] = cal
    ms.meta["calibration_units"] = sample


def unit_dkl(unit: dict, key: str) -> float:
    """Predicted ΔKL of one unit at one option: `dkl` where the measurement gave one (the fisher
    predictor: every option; exact: options of ≤ `direct_bits` bits), else α·err (HIGGS' linear
    model, accurate for the small errors of 8-bit)."""
    o = unit["options"][key]
    return o["dkl"] if "dkl" in o else unit["alpha"] * o["err"]
