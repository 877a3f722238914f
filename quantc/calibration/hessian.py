"""Hessian capture: H = 2·XᵀX/n for the inputs X of chosen linears (running average, as in the
reference GPTQ), and for error propagation the cross term δ = 2·(X − X̂)ᵀX̂/n between the original
model's inputs X and the quantized model's inputs X̂ of the same tokens."""
from __future__ import annotations

import torch
from torch import nn

from ..model import StopForward


class HessianCapture:
    """Forward hooks on `linears`; once every one of them has seen its input in a forward, raise
    StopForward (the rest of the layer is not needed)."""

    def __init__(self, linears: dict[str, nn.Linear], stop_early: bool = True):
        self.linears = linears
        self.stop_early = stop_early
        self.H = {n: torch.zeros(m.in_features, m.in_features) for n, m in linears.items()}
        self.delta: dict[str, torch.Tensor] = {}
        self.n = {n: 0 for n in linears}
        self.reference: dict[str, torch.Tensor] | None = None   # X of the same batch, for δ
        self.inputs: dict[str, torch.Tensor] = {}                # last batch's inputs (to record X)
        self._seen: set[str] = set()
        self._handles = []

    def __enter__(self):
        for name, m in self.linears.items():
            self._handles.append(m.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name):
        def hook(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            self.add(name, x)
            self._seen.add(name)
            if self.stop_early and len(self._seen) == len(self.linears):
                raise StopForward
        return hook

    def add(self, name: str, x: torch.Tensor) -> None:
        t = x.shape[0]
        n = self.n[name]
        # running mean of 2·xᵀx: rescale the old sum, then add the new tokens
        scale = n / (n + t)
        self.H[name] *= scale
        x2 = x * (2 / (n + t)) ** 0.5
        self.H[name] += x2.t() @ x2
        if self.reference is not None:
            xr = self.reference[name].reshape(-1, x.shape[1]).float()
            d = self.delta.setdefault(name, torch.zeros_like(self.H[name]))
            d *= scale
            d += (2 / (n + t)) * (xr - x).t() @ x
        self.n[name] = n + t

    def run(self, fn) -> None:
        """Call fn() (a forward pass) and swallow the early stop."""
        self._seen.clear()
        try:
            fn()
        except StopForward:
            pass


class InputRecorder:
    """Record the inputs of `linears` for one forward (the original model's X for the QEP term)."""

    def __init__(self, linears: dict[str, nn.Linear]):
        self.linears = linears
        self.inputs: dict[str, torch.Tensor] = {}

    def run(self, fn) -> dict[str, torch.Tensor]:
        self.inputs = {}
        handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.linears.items()]
        try:
            fn()
        except StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return self.inputs

    def _hook(self, name):
        def hook(_mod, args):
            self.inputs[name] = args[0].detach()
            if len(self.inputs) == len(self.linears):
                raise StopForward
        return hook
