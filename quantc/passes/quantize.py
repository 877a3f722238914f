"""Sweep 2: quantize the decoder layer by layer, each layer fitted on the inputs X̂ that the already
quantized layers produce (sequential GPTQ), optionally with QEP error propagation.

Within a layer the linears are done in execution order (q/k/v, o, gate/up, down: "true
sequential"), so o_proj is fitted on the outputs of the quantized q/k/v. Each stage's forward stops
as soon as its linears have seen their inputs.
"""
from __future__ import annotations

import copy
import logging
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.hessian import HessianCapture, InputRecorder
from ..gptq import QuantResult, gptq, qep_target, rtn
from ..model import SHARED_UNITS, Activations, decoder_layers, layer_linears, run_layer
from ..options import Option

log = logging.getLogger("quantc")


def stages(linears: dict[str, nn.Linear], true_sequential: bool) -> list[dict[str, nn.Linear]]:
    """Groups of linears that see the same input, in execution order."""
    if not true_sequential:
        return [linears] if linears else []
    out, done = [], set()
    for group in SHARED_UNITS:
        st = {n: m for n, m in linears.items() if n.rsplit(".", 1)[-1] in group}
        if st:
            out.append(st)
            done.update(st)
    out.extend({n: m} for n, m in linears.items() if n not in done)
    return out


def quantize_rtn(model: nn.Module, options: dict[str, Option]) -> dict[str, QuantResult]:
    """Round-to-nearest: no calibration, every linear on its own."""
    mods = dict(model.named_modules())
    results = {}
    for name, opt in tqdm(options.items(), desc="RTN", leave=False):
        results[name] = rtn(mods[name].weight.data, opt)
        mods[name].weight.data = results[name].weight.to(mods[name].weight.dtype)
    return results


@torch.no_grad()
def quantize_gptq(model: nn.Module, acts: Activations, options: dict[str, Option], *, damp: float = 0.01,
                  qep_alpha: float = 0.0, true_sequential: bool = True, block_size: int = 128,
                  start_layer: int = 0, on_layer: Callable | None = None, progress: bool = True):
    """Quantize every linear named in `options` in place (weights replaced by their dequantized
    values) and return {name: QuantResult}. `acts` are the inputs of decoder layer `start_layer`;
    `on_layer(i, results, x_hat, x_ref)` is called after each layer (resume checkpoints)."""
    layers = decoder_layers(model)
    results: dict[str, QuantResult] = {}
    x_hat = acts
    x_ref = acts if qep_alpha > 0 else None          # the original model's inputs, for QEP
    bar = tqdm(range(start_layer, len(layers)), desc="GPTQ layers", disable=not progress)
    for i in bar:
        layer = layers[i]
        prefix = f"model.layers.{i}."
        todo = {n: m for n, m in layer_linears(layer).items() if prefix + n in options}
        ref_layer = copy.deepcopy(layer) if x_ref is not None else None
        ref_lin = layer_linears(ref_layer) if ref_layer is not None else {}
        layer_results = {}
        for stage in stages(todo, true_sequential):
            cap = HessianCapture(stage)
            with cap:
                for j, (xb, kw) in enumerate(x_hat.batches()):
                    if x_ref is not None:   # the same tokens through the original layer: X for δ
                        xr = x_ref.hidden[j * x_ref.batch_size:j * x_ref.batch_size + xb.shape[0]]
                        rec = InputRecorder({n: ref_lin[n] for n in stage})
                        cap.reference = rec.run(lambda: run_layer(ref_layer, xr, kw))
                    cap.run(lambda: run_layer(layer, xb, kw))
            for n, m in stage.items():
                name = prefix + n
                W = m.weight.data.float()
                if x_ref is not None:
                    W = qep_target(W, cap.H[n], cap.delta[n], qep_alpha, damp)
                res = gptq(W, cap.H[n], options[name], percdamp=damp, blocksize=block_size, name=name)
                m.weight.data = res.weight.to(m.weight.dtype)
                layer_results[name] = res
            del cap
        results.update(layer_results)
        x_hat = x_hat.through(layer)
        if x_ref is not None:
            x_ref = x_ref.through(ref_layer)
        if on_layer is not None:
            on_layer(i, layer_results, x_hat, x_ref)
    return results
