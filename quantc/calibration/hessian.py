"""Hessian capture: H = 2·XXᵀ/n over the inputs X of a linear (running average, as in the
reference GPTQ), and for error propagation the cross term δ = 2·(X − X̂)X̂ᵀ/n between the original
model's inputs X and the quantized model's inputs X̂ of the same tokens.

Linears that read the same tensor (q/k/v, gate/up) share one accumulator: H is computed once."""
from __future__ import annotations

import torch
from torch import nn

from ..model import StopForward


class Hessian:
    """Running 2·XXᵀ/n (and δ when the reference inputs are given) for one input width."""

    def __init__(self, dim: int, cross: bool = False, device: torch.device | str = "cpu"):
        self.H = torch.zeros(dim, dim, device=device)           # float32 whatever the compute dtype
        self.delta = torch.zeros(dim, dim, device=device) if cross else None
        self.n = 0

    def add(self, x: torch.Tensor, x_ref: torch.Tensor | None = None) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        t = x.shape[0]
        keep = self.n / (self.n + t)               # rescale the old mean, then add the new tokens
        self.H *= keep
        self.H.addmm_(x.t(), x, alpha=2 / (self.n + t))
        if self.delta is not None:
            xr = x_ref.reshape(-1, x.shape[-1]).to(x.device, torch.float32)
            self.delta *= keep
            self.delta.addmm_((xr - x).t(), x, alpha=2 / (self.n + t))
        self.n += t


class CaptureInput:
    """Pre-hook on one module: hand its input to `fn`, then (optionally) stop the forward."""

    def __init__(self, module: nn.Module, fn, stop: bool = True):
        self.module, self.fn, self.stop = module, fn, stop

    def __enter__(self):
        def hook(_mod, args):
            self.fn(args[0].detach())
            if self.stop:
                raise StopForward
        self.handle = self.module.register_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def run_until(fn) -> None:
    """Call fn() (a forward pass) and swallow the early stop of a capture hook."""
    try:
        fn()
    except StopForward:
        pass
