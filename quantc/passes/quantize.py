"""Sweep 2: quantize the decoder layer by layer, each layer fitted on the inputs X̂ that the already
quantized layers produce (sequential GPTQ), optionally with QEP error propagation.

Within a layer the linears are fitted group by group in execution order (q/k/v, o, gate/up, down:
"true sequential"), so o_proj is fitted on the outputs of the quantized q/k/v. Linears of a group
read the same tensor and share one Hessian. Each group's forward stops as soon as its input is
captured, and later groups reuse what earlier ones computed: once o_proj is done, the attention
block is replayed from its cached input (o_proj's), and down_proj's input comes from the MLP alone.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.hessian import CaptureInput, Hessian, run_until
from ..distributed import SOLVES
from ..gptq import QuantResult, gptq, qep_target, rtn
from ..lazy import trim_heap
from ..family import Family, family_of
from ..model import (CPU, Activations, Placement, decoder_layer, decoder_layers, layer_linears, run_layer,
                     source_weight)
from ..options import Option

log = logging.getLogger("quantc")


def input_groups(linears: dict[str, nn.Linear], fam: Family) -> list[dict[str, nn.Linear]]:
    """Linears that read the same input, in execution order (the family's groups)."""
    out, done = [], set()
    for group in fam.groups:
        g = {n: linears[n] for n in group if n in linears}
        if g:
            out.append(g)
            done.update(g)
    out.extend({n: m} for n, m in linears.items() if n not in done)
    return out


def quantize_rtn(model: nn.Module, options: dict[str, Option], on_layer: Callable, progress: bool = True,
                 place: Placement = CPU) -> None:
    """Round-to-nearest: no calibration, every linear on its own. `on_layer(i, results)` takes each
    layer's {name: QuantResult} (on the CPU) as soon as the layer is done; nothing is kept here."""
    fam = family_of(model)
    for i in tqdm(range(len(decoder_layers(model))), desc="RTN layers", leave=False, disable=not progress):
        results = {}
        with decoder_layer(model, i, place) as layer:
            for short, m in layer.named_modules():
                name = fam.prefix(i) + short
                if name in options:
                    results[name] = rtn(source_weight(layer, short), options[name])
                    m.weight.data = results[name].weight.to(m.weight.dtype)
                    _shrink(results[name])
        on_layer(i, results)


def _quantize_layer(i, layer, x_hat, x_ref, options, damp, qep_alpha, true_sequential, block_size, place, fam):
    """One decoder layer: its linears fitted group by group; returns (results, next x̂, next x)."""
    prefix = fam.prefix(i)
    groups = input_groups({n: m for n, m in layer_linears(layer).items() if prefix + n in options}, fam)
    ref_in = None
    if x_ref is not None:          # before any weight of this layer changes
        ref_in, x_ref = reference_inputs(layer, x_ref, groups)

    runner = LayerRunner(layer, x_hat, fam)
    hessians = [Hessian(next(iter(g.values())).in_features, cross=ref_in is not None, device=place.device,
                        world=place.world) for g in groups]
    world, owned = place.world, 0      # distributed: the layer's solves go round-robin over the ranks
    if not true_sequential:        # all groups' Hessians from one forward of the original layer
        for j, (xb, kw) in enumerate(x_hat.batches()):
            with contextlib.ExitStack() as stack:
                for k, (g, h) in enumerate(zip(groups, hessians)):
                    ref = ref_in[k][j] if ref_in is not None else None    # QEP: the same batch of X
                    stack.enter_context(CaptureInput(next(iter(g.values())), functools.partial(h.add, x_ref=ref),
                                                     stop=False))
                run_layer(layer, xb, kw)

    layer_results = {}
    for k, group in enumerate(groups):
        hess = hessians[k]
        first = next(iter(group.values()))
        keep = None
        if true_sequential:
            is_mlp_in = runner.down is not None and fam.mlp_in in group
            keep = [] if first is runner.o_proj or is_mlp_in else None
            for j, x in runner.inputs(first):
                hess.add(x, ref_in[k][j] if ref_in is not None else None)
                if keep is not None:        # kept where the activations live (host when they do not fit)
                    keep.append(x.to(x_hat.hidden.device))
        hess.finish()               # the sums over ranks: every rank reaches this point, in this order
        solved = {}
        for j, n in enumerate(group, start=owned):
            if world.mine(j):
                name = prefix + n
                W = source_weight(layer, n)     # float32 source values, whatever the compute dtype
                if ref_in is not None:
                    W = qep_target(W, hess.H, hess.delta, qep_alpha, damp)
                solved[n] = gptq(W, hess.H, options[name], percdamp=damp, blocksize=block_size, name=name)
                SOLVES.add("quantize")
        for j, (n, m) in enumerate(group.items(), start=owned):
            res = world.broadcast(solved.get(n), world.owner(j))    # one process: its own result
            m.weight.data = res.weight.to(m.weight.device, m.weight.dtype)
            layer_results[prefix + n] = res
        owned += len(group)
        hessians[k] = hess = None   # this group's Hessian is spent: one group's at a time (true-sequential)
        trim_heap()                 # this group's batch buffers are free: give them back
        if keep is not None:
            # this group's inputs are now final: later groups start from them
            if first is runner.o_proj:
                runner.attn_in = keep
            else:
                runner.mlp_in = keep
    x_hat = runner.outputs() if true_sequential else x_hat.through(layer)
    return layer_results, x_hat, x_ref


@dataclass
class HeldOut:
    """The compile's check (`calibration.check_samples`): held-out sequences that no pass calibrates on,
    carried through every original decoder layer (`ref`, before the layer's weights change) and every
    quantized one (`hat`). At the head they give the checkpoint's KL to the original model
    (passes/measure.py divergence): the number the plan's predicted ΔKL stands for, measured on text
    that neither the measurement nor GPTQ saw. Rank 0 alone carries them; they cost two forwards of a
    few sequences per layer."""
    tokens: torch.Tensor
    ref: Activations
    hat: Activations
    seconds: float = 0.0          # spent on the two forwards per layer (the manifest's timings.check_forward_s)


def _shrink(res: QuantResult) -> None:
    """Keep only what the exporter needs: the integers as uint8 (values < 256) on the CPU, no float copy."""
    res.weight = None
    res.q = res.q.to(torch.uint8)
    res.cpu()


class LayerRunner:
    """Computes, batch by batch, the inputs of one group of linears of `layer` in its current
    (partly quantized) state, from the layer inputs `acts`, reusing earlier groups' work."""

    def __init__(self, layer: nn.Module, acts: Activations, fam: Family):
        self.layer, self.acts = layer, acts
        self.attn, self.mlp = _get(layer, fam.attention), _get(layer, fam.mlp)
        self.o_proj = _get(layer, fam.attn_out)
        self.down = _get(layer, fam.mlp_out)
        self.attn_in: list[torch.Tensor] | None = None     # o_proj's inputs, once o is final
        self.mlp_in: list[torch.Tensor] | None = None      # gate/up inputs, once they are final

    @contextlib.contextmanager
    def _attention_replay(self, j: int):
        """Replace self_attn by o_proj(cached input): the q/k/v and attention are unchanged."""
        if self.attn_in is None:
            yield
            return
        attn = self.attn
        dev = self.o_proj.weight.device
        attn.forward = lambda *a, **k: (self.o_proj(self.attn_in[j].to(dev)), None)
        try:
            yield
        finally:
            del attn.forward

    def inputs(self, first: nn.Linear):
        """Yield (batch index, input of `first`) for every calibration batch."""
        for j, (xb, kw) in enumerate(self.acts.batches()):
            got = []
            with CaptureInput(first, got.append):
                if first is self.down and self.mlp_in is not None:
                    run_until(lambda: self.mlp(self.mlp_in[j].to(first.weight.device)))
                else:
                    with self._attention_replay(j):
                        run_until(lambda: run_layer(self.layer, xb, kw))
            yield j, got[0]

    def outputs(self) -> Activations:
        out = self.acts.empty_like()
        for j, (xb, kw) in enumerate(self.acts.batches()):
            b = j * self.acts.batch_size
            with self._attention_replay(j):
                out[b:b + xb.shape[0]] = run_layer(self.layer, xb, kw)
        return self.acts.like(out)


def _get(layer: nn.Module, path: str):
    """The sub-module at `path` inside the layer, or None when the layer has none."""
    try:
        return layer.get_submodule(path)
    except AttributeError:
        return None


def reference_inputs(layer: nn.Module, acts: Activations, groups) -> tuple[list[list[torch.Tensor]], Activations]:
    """The original layer on the original inputs X: each group's input per batch, and the output."""
    firsts = [next(iter(g.values())) for g in groups]
    seen: list[list[torch.Tensor]] = [[] for _ in groups]
    out = acts.empty_like()
    with contextlib.ExitStack() as stack:
        for k, f in enumerate(firsts):      # kept where the activations live, moved batch by batch
            stack.enter_context(CaptureInput(f, lambda x, k=k: seen[k].append(x.to(acts.hidden.device)),
                                             stop=False))
        for j, (xb, kw) in enumerate(acts.batches()):
            b = j * acts.batch_size
            out[b:b + xb.shape[0]] = run_layer(layer, xb, kw)
    return seen, acts.like(out)


@torch.no_grad()
def quantize_gptq(model: nn.Module, acts: Activations, options: dict[str, Option], *, damp: float = 0.01,
                  qep_alpha: float = 0.0, true_sequential: bool = True, block_size: int = 128,
                  start_layer: int = 0, ref_acts: Activations | None = None,
                  on_layer: Callable | None = None, progress: bool = True, place: Placement = CPU,
                  release_inputs: bool = False, check: HeldOut | None = None) -> None:
    """Quantize every linear named in `options` in place (on the default CPU placement the weights
    are replaced by their dequantized values). `acts` are the quantized model's inputs of decoder
    layer `start_layer` (`ref_acts` the original model's, for QEP; the same at layer 0).
    `on_layer(i, results, x_hat, x_ref, check)` takes each finished layer's {name: QuantResult} (on the
    CPU) and the next layer's inputs, once the layer is released (the shard and resume point are written
    there); nothing is kept here, so memory holds one layer's codes, not the model's. With
    `release_inputs` the caller hands `acts` and `ref_acts` over: their hidden states are released once
    the first layer has read them, so the sweep holds its live streams only, not a stale one beside.
    `check`: the held-out streams, moved on through each layer as it was and as it is quantized."""
    layers = decoder_layers(model)
    fam = family_of(model)
    x_hat = acts
    x_ref = (ref_acts if ref_acts is not None else acts) if qep_alpha > 0 else None
    bar = tqdm(range(start_layer, len(layers)), desc="GPTQ layers", disable=not progress)
    for i in bar:
        with decoder_layer(model, i, place) as layer:       # lazy models: this layer's weights come from disk now
            if check is not None:
                t = time.perf_counter()
                check.ref = check.ref.through(layer)        # the original layer: no weight has changed yet
                check.seconds += time.perf_counter() - t
            layer_results, x_hat, x_ref = _quantize_layer(i, layer, x_hat, x_ref, options, damp, qep_alpha,
                                                          true_sequential, block_size, place, fam)
            if check is not None:
                t = time.perf_counter()
                check.hat = check.hat.through(layer)        # the layer as its quantized weights make it
                check.seconds += time.perf_counter() - t
        if release_inputs:              # the first layer's inputs are read: the outputs replace them
            for a in (acts, ref_acts):
                if a is not None and a is not x_hat and a is not x_ref:
                    a.release()
            acts = ref_acts = None
        for res in layer_results.values():
            res.cpu()
            res.weight = None           # the float copy (on the device) is not needed past here
        if on_layer is not None:
            on_layer(i, layer_results, x_hat, x_ref, check)
        del layer_results               # written to its shard: nothing of this layer stays
