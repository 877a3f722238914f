"""Hessian capture: H = 2·XXᵀ/n over the inputs X of a linear, and for error propagation the cross
term δ = 2·(X − X̂)X̂ᵀ/n between the original model's inputs X and the quantized model's inputs X̂ of
the same tokens.

Each batch's product X_bᵀX_b is computed in float32 and summed in float64; H is rounded to float32
once, when it is read. The sum over batches then does not depend on how the batches are grouped,
which is what lets ranks of a distributed run each sum their own batches and all-reduce the sums
(quantc/distributed.py) and still produce the bits of one process.

XᵀX is symmetric, so only its upper block triangle is formed and it is mirrored once, when H is read:
half the products' work (the Hessians take a third or more of a QEP compile). The BLAS forms each entry of a
block as the same dot product as the whole product does, and the whole product is itself exactly
symmetric, so H keeps the bits of the whole product (tests/test_gptq.py checks it).

Linears that read the same tensor (q/k/v, gate/up) share one accumulator: H is computed once."""
from __future__ import annotations

import torch
from torch import nn

from ..distributed import SOLO, World
from ..model import StopForward


class Hessian:
    """2·XXᵀ/n (and δ when the reference inputs are given) for one input width. `add` batch by
    batch, then read `H` / `delta` (float32 whatever the compute dtype); in a distributed run every
    rank reads them at the same point, where the sums are all-reduced."""

    def __init__(self, dim: int, cross: bool = False, device: torch.device | str = "cpu", world: World = SOLO):
        self.dim, self.device, self.world, self.want_cross = dim, device, world, cross
        self.sum = self.cross = None         # allocated at the first batch: a group's sums exist only while it runs
        self.n = 0
        self._H = self._delta = None

    def add(self, x: torch.Tensor, x_ref: torch.Tensor | None = None) -> None:
        if self._H is not None:
            raise RuntimeError("Hessian.add after H was read")
        x = x.reshape(-1, x.shape[-1]).float()
        if self.sum is None:
            self._allocate()
        _add_gram_upper(self.sum, x)              # float32 products per batch, summed in float64
        if self.cross is not None:
            xr = x_ref.reshape(-1, x.shape[-1]).to(x.device, torch.float32)
            _add_gram(self.cross, (xr - x).t(), x)
        self.n += x.shape[0]

    def _allocate(self) -> None:
        self.sum = torch.zeros(self.dim, self.dim, device=self.device, dtype=torch.float64)
        if self.want_cross:
            self.cross = torch.zeros(self.dim, self.dim, device=self.device, dtype=torch.float64)

    def finish(self) -> None:
        """Round the sums to H (and δ); in a distributed run, all-reduce them first (a collective:
        every rank calls it at the same point)."""
        if self._H is not None:
            return
        n = self.n
        if self.sum is None:                      # no batch on this rank (or none at all): zeros to sum
            self._allocate()
        if self.world.active:                     # every rank's batches: sums (and counts) over ranks
            n = int(self.world.all_reduce(torch.tensor([n], dtype=torch.float64, device=self.sum.device)).item())
            self.world.all_reduce(self.sum)
            if self.cross is not None:
                self.world.all_reduce(self.cross)
        _mirror_upper(self.sum)
        scale = 2 / max(n, 1)
        self._H = self.sum.mul_(scale).float()            # in place: no second float64 copy at the peak
        self._delta = self.cross.mul_(scale).float() if self.cross is not None else None
        self.sum = self.cross = None

    @property
    def H(self) -> torch.Tensor:
        self.finish()
        return self._H

    @property
    def delta(self) -> torch.Tensor | None:
        self.finish()
        return self._delta


GRAM_COLUMNS = 2048     # the float32 product is formed this many columns at a time: a small temporary
GRAM_ROWS = 256         # XᵀX's upper triangle is formed this many rows at a time (a row block × the rest)


def _add_gram(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (float64) += a @ b, the product in float32, in column blocks so that no second
    dim × dim matrix exists (for an 8B model's down_proj that would be another 0.8 GB)."""
    for c in range(0, b.shape[1], GRAM_COLUMNS):
        acc[:, c:c + GRAM_COLUMNS].add_(a @ b[:, c:c + GRAM_COLUMNS])


def _add_gram_upper(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc (float64) += xᵀx on and above the diagonal blocks of GRAM_ROWS (the diagonal blocks whole),
    the products in float32; the blocks below stay zero until `_mirror_upper`."""
    for r in range(0, x.shape[1], GRAM_ROWS):
        acc[r:r + GRAM_ROWS, r:].add_(x[:, r:r + GRAM_ROWS].t() @ x[:, r:])


def _mirror_upper(acc: torch.Tensor) -> None:
    """Fill the blocks below the diagonal blocks from those above, in place (no second matrix)."""
    for r in range(0, acc.shape[0], GRAM_ROWS):
        acc[r + GRAM_ROWS:, r:r + GRAM_ROWS] = acc[r:r + GRAM_ROWS, r + GRAM_ROWS:].t()


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
