"""GPTQ (Frantar et al., 2022) and round-to-nearest, as short direct tensor code.

Modelled on the reference implementation (IST-DASLab/gptq, gptq.py): quantize one column at a time,
spread its error over the not-yet-quantized columns through the inverse Hessian, with lazy blocked
updates. Additions: a clip search for the grid (`mse`), the QEP target (see `qep_target`), and
automatic dampening increase when the Cholesky factorisation fails.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass

import torch

from . import ggml
from .errors import QuantcError
from .options import Option

log = logging.getLogger("quantc")


@dataclass
class QuantResult:
    """Integer weights and their grid: W ≈ (q - zeros[g_idx]) * scales[g_idx] (transposed per row).
    On a llama.cpp grid (`ggml` names the type) q holds the block codes and `fields` the blocks'
    scales (ggml.py); scales, zeros and g_idx are None."""
    q: torch.Tensor        # int   [out, in]
    scales: torch.Tensor | None   # float [groups, out]
    zeros: torch.Tensor | None    # int   [groups, out], true zero points in [1, maxq]
    g_idx: torch.Tensor | None    # int   [in]
    weight: torch.Tensor   # float [out, in], the dequantized weight
    damp: float = 0.0      # dampening actually used (fraction of mean diag)
    ggml: str | None = None        # llama.cpp type of the blocks (grid k / ggml)
    fields: dict | None = None     # the blocks' d, dmin/m, sc, mn [out, blocks, ...] as stored

    def cpu(self) -> "QuantResult":
        """The integers and grid (and the dequantized weight, if kept) on the CPU (where the exporter
        and resume files read them, and what a distributed broadcast sends)."""
        if self.weight is not None:
            self.weight = self.weight.cpu()
        if self.ggml is not None:
            self.q = self.q.cpu()
            self.fields = {k: v.cpu() for k, v in self.fields.items()}
            return self
        self.q, self.scales, self.zeros, self.g_idx = (t.cpu() for t in (self.q, self.scales, self.zeros, self.g_idx))
        return self

    def codes_only(self) -> "QuantResult":
        """The same result without the dequantized weight, its codes in the narrowest integer type
        that holds them (one byte for every grid quantc solves on): what the measurement keeps of
        each option while a layer's units are solved, a quarter of the float weight."""
        q = self.q
        lo, hi = int(q.min()), int(q.max())
        for dt in (torch.uint8, torch.int8, torch.int16):
            info = torch.iinfo(dt)
            if info.min <= lo and hi <= info.max:
                q = q.to(dt)
                break
        return dataclasses.replace(self, q=q, weight=None)

    def dequantize(self) -> torch.Tensor:
        if self.q.dtype != torch.int32:        # codes_only narrowed them: the grids compute in int32
            return dataclasses.replace(self, q=self.q.to(torch.int32)).dequantize()
        if self.ggml is not None:
            return ggml.dequantize(ggml.TYPES[self.ggml], self.q, self.fields)
        g = self.g_idx.long()
        return (self.q.float() - self.zeros[g].t().float()) * self.scales[g].t()


CLIP_STEPS = 26      # shrink factors of the clipped-grid search (GPTQ's --mse grid)


def find_params(x: torch.Tensor, bits: int, sym: bool, mse: bool = False,
                steps: int = CLIP_STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) for a slice x [rows, cols]. Zeros lie in [1, maxq] (GPTQ v1 stores zero-1).
    `mse`: the clipped-grid search over `steps` shrink factors from 1 to 0.5."""
    maxq = 2**bits - 1
    xmin = x.min(1).values.clamp(max=0)
    xmax = x.max(1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    dead = (xmin == 0) & (xmax == 0)
    xmin[dead], xmax[dead] = -1.0, 1.0

    def grid(lo, hi):
        scale = (hi - lo) / maxq
        if sym:
            zero = torch.full_like(scale, (maxq + 1) / 2)
        else:
            zero = torch.round(-lo / scale)
            # zero 0 cannot be stored in v1; widen the step so the grid [-s, (maxq-1)s] covers hi
            low = zero < 1
            scale = torch.where(low, torch.maximum(hi / (maxq - 1), -lo), scale)
            zero = zero.clamp(min=1)
        # the checkpoint stores fp16 scales: use exactly those while quantizing
        return scale.clamp(min=1e-7).to(torch.float16).float(), zero

    scale, zero = grid(xmin, xmax)
    if mse:
        # Shrink the range and keep the grid with the least |x - q|^2.4 error (as in GPTQ's --mse).
        best = torch.full_like(scale, float("inf"))
        for p in torch.linspace(1.0, 0.5, steps).tolist():
            s, z = grid(p * xmin, p * xmax)
            s1, z1 = s.unsqueeze(1), z.unsqueeze(1)
            # quantize(x, s1, z1, maxq) - x, in place: the same operations, without 5 temporaries of x's size
            err = torch.div(x, s1).round_().add_(z1).clamp_(0, maxq).sub_(z1).mul_(s1).sub_(x).abs_().pow_(2.4).sum(1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s, scale)
            zero = torch.where(better, z, zero)
    return scale, zero


def _int(x, scale, zero, maxq):
    if isinstance(maxq, torch.Tensor):           # one maximum per row (options stacked by gptq_options)
        return torch.minimum(torch.clamp(torch.round(x / scale) + zero, min=0), maxq)
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def quantize(x, scale, zero, maxq):
    return scale * (_int(x, scale, zero, maxq) - zero)


def rtn(W: torch.Tensor, opt: Option, steps: int = CLIP_STEPS) -> QuantResult:
    """Round-to-nearest baseline with the same grid as GPTQ (`steps`: of its clipped-grid search)."""
    W = W.float()
    if opt.grid != "gptq":
        t = ggml.type_for(opt.grid, opt.bits, opt.sym, W.shape[1])
        q, fields = ggml.rtn(t, W, opt.mse)
        res = QuantResult(q, None, None, None, W, ggml=t.name, fields=fields)
        res.weight = res.dequantize()
        return res
    rows, cols = W.shape
    gs = cols if opt.group_size <= 0 else opt.group_size
    maxq = 2**opt.bits - 1
    G = -(-cols // gs)
    Wp = torch.nn.functional.pad(W, (0, G * gs - cols)) if G * gs != cols else W
    # every (row, group) is one row of the grid search: one vectorised call for the whole matrix
    # (a ragged last group is zero-padded; zeros never widen a grid that always contains 0)
    s, z = find_params(Wp.reshape(rows * G, gs), opt.bits, opt.sym, opt.mse, steps)
    s, z = s.reshape(rows, G), z.reshape(rows, G)
    g_idx = torch.arange(cols, dtype=torch.int32, device=W.device) // gs
    q = _int(W, s[:, g_idx.long()], z[:, g_idx.long()], maxq).to(torch.int32)
    res = QuantResult(q, s.t().contiguous(), z.t().contiguous().to(torch.int32), g_idx, W)
    res.weight = res.dequantize()
    return res


def cholesky_inverse_upper(H: torch.Tensor, percdamp: float, name: str = "") -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp·I)⁻¹. Raise the dampening (x10 up to 1.0) if H is not
    positive definite after damping, and say so; fail clearly if even that does not help."""
    diag = torch.arange(H.shape[0], device=H.device)
    mean = torch.mean(torch.diag(H)).item()
    damp = percdamp
    while True:
        # each step drops its input as soon as the next exists: at most two n × n matrices beside H
        # (an 8B model's down_proj: 0.8 GB each)
        Hd = H.clone()
        Hd[diag, diag] += damp * mean
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if info == 0 and torch.isfinite(U).all():
                if damp != percdamp:
                    log.warning("%s: Hessian not positive definite; dampening raised to %.3g", name, damp)
                return U, damp
        if damp >= 1.0 or not math.isfinite(mean):
            raise QuantcError(
                f"{name}: the Hessian is not positive definite even with dampening {damp:.3g}·mean(diag). "
                "The calibration data may be too short or contain NaN/Inf activations: add calibration "
                "samples or raise `quant.damp` in the budget YAML.")
        damp = min(1.0, damp * 10)


@contextlib.contextmanager
def _one_thread(device: torch.device):
    """One intra-op thread on the CPU for the per-column updates: each is far below the size where
    threads pay, and with another process on the cores every op of a 2-thread pool waits at a barrier
    for a descheduled thread (measured: 4-5x slower GPTQ with one other busy process on 2 cores).
    Outer products and element-wise ops give the same bits on any thread count. Yields the thread
    count to restore (None: nothing was changed), for `_threads`."""
    if device.type != "cpu" or torch.get_num_threads() == 1:
        yield None
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield n
    finally:
        torch.set_num_threads(n)


@contextlib.contextmanager
def _threads(n: int | None):
    """`n` intra-op threads for the with-block inside `_one_thread` (None: as they are). A group's
    grid search inside the column loop (no static groups) is one large element-wise pass per shrink
    factor, |x − q|^2.4 over rows × group: threads pay there (same bits: each row is reduced whole by
    one thread, in one order)."""
    if n is None:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(1)


def gptq(W: torch.Tensor, H: torch.Tensor, opt: Option, percdamp: float = 0.01,
         blocksize: int = 128, name: str = "") -> QuantResult:
    """Quantize W [out, in] minimising ‖(W - Ŵ)X‖² for the Hessian H = 2XXᵀ/n [in, in]."""
    return gptq_options(W, H, [opt], percdamp, blocksize, name)[0]


def _layout(o: Option) -> tuple:
    if o.grid != "gptq":
        return ("grid", o)                     # each llama.cpp grid is solved on its own
    return (o.group_size, o.act_order, o.act_order and o.static_groups)


def gptq_options(W: torch.Tensor, H: torch.Tensor, opts: list[Option], percdamp: float = 0.01,
                 blocksize: int = 128, name: str = "", hinv: dict | None = None) -> list[QuantResult]:
    """GPTQ of the same W and H at several options (the measurement's candidates). Options with the
    same group layout (group size, act-order, static groups) are solved together: one Cholesky and
    one column loop over their stacked rows, each row block on its own grid (bits, sym, clip search).
    Rows never mix, so each result is the single-option solve's (to float rounding of the stacked
    products); one option runs exactly the single-option operations. `hinv`: a dict shared by calls
    with the same H (linears reading one input), so its Cholesky factor is computed once."""
    out: list[QuantResult | None] = [None] * len(opts)
    for j, r in iter_gptq_options(W, H, opts, percdamp, blocksize, name, hinv):
        out[j] = r
    return out


def iter_gptq_options(W: torch.Tensor, H: torch.Tensor, opts: list[Option], percdamp: float = 0.01,
                      blocksize: int = 128, name: str = "", hinv: dict | None = None):
    """`gptq_options` one stack at a time: yields (index in opts, result) as each stack finishes, so
    a caller that keeps less than the float weights (the measurement keeps codes) never holds every
    option's."""
    layouts: dict[tuple, list[int]] = {}
    for j, o in enumerate(opts):
        layouts.setdefault(_layout(o), []).append(j)
    hinv = {} if hinv is None else hinv         # act_order -> (Hinv, damp, perm): one Cholesky each
    per = max(1, STACK_BYTES // max(1, W.numel() * 4))   # options per stack: its W, Q and codes stay bounded
    for idx in layouts.values():
        for s in range(0, len(idx), per):
            part = idx[s:s + per]
            yield from zip(part, _gptq_stacked(W, H, [opts[j] for j in part], percdamp, blocksize, name, hinv))


# A stack holds k copies of W (and of Q and the codes): options are stacked while k·|W| stays under
# this, so small linears solve every option at once (a 0.5B model's MLP: 4 options in 70 MB) and an
# 8B model's MLP one option at a time (235 MB each) instead of several GB.
STACK_BYTES = 256 * 2**20


def _undead(H: torch.Tensor) -> torch.Tensor:
    """H with a unit diagonal where an input never fired (zero row and column), so that the Cholesky
    exists; copied only when there is such an input (an 8B down_proj's H is 0.8 GB)."""
    dead = torch.diag(H) == 0
    if bool(dead.any()):
        H = H.clone()
        H[dead, dead] = 1
    return H


def _gptq_stacked(W, H, opts: list[Option], percdamp, blocksize, name, hinv: dict) -> list[QuantResult]:
    if opts[0].grid != "gptq":
        return [_gptq_ggml(W, H, opts[0], percdamp, blocksize, name, hinv)]
    W = W.float().clone()
    W[:, torch.diag(H) == 0] = 0               # inputs that never fire carry no information (before
    H = _undead(H.float())                     # _undead gives them a unit diagonal)
    rows, cols = W.shape
    o0 = opts[0]
    gs = cols if o0.group_size <= 0 else o0.group_size
    k = len(opts)
    maxq = 2**o0.bits - 1 if k == 1 else \
        torch.cat([torch.full((rows,), 2**o.bits - 1.0, device=W.device) for o in opts])
    blocks = [(o, slice(j * rows, (j + 1) * rows)) for j, o in enumerate(opts)]

    def params(x):                             # (scale, zero) per row of x [k·rows, g], each block on its grid
        if k == 1:
            return find_params(x, o0.bits, o0.sym, o0.mse)
        sz = [find_params(x[sl], o.bits, o.sym, o.mse) for o, sl in blocks]
        return torch.cat([a for a, _ in sz]), torch.cat([b for _, b in sz])

    if o0.act_order not in hinv:
        perm = torch.arange(cols, device=W.device)
        Hp = H
        if o0.act_order:                       # quantize the columns with the largest inputs first
            perm = torch.argsort(torch.diag(H), descending=True)
            Hp = H[perm][:, perm]
        hinv[o0.act_order] = (*cholesky_inverse_upper(Hp, percdamp, name), perm)
    Hinv, damp, perm = hinv[o0.act_order]
    if o0.act_order:
        W = W[:, perm]
    invperm = torch.argsort(perm)
    if k > 1:
        W = W.repeat(k, 1)
    R = W.shape[0]

    static = None
    if o0.act_order and o0.static_groups:      # grids from the original contiguous groups: g_idx = i // gs
        static = _static_params(W[:, invperm], gs, blocks)

    Q = torch.zeros_like(W)
    qint = torch.zeros_like(W)
    scales = torch.zeros(math.ceil(cols / gs), R, device=W.device)
    zeros = torch.zeros_like(scales)
    # each column's group, in permuted order (un-permuted at the end): static groups are the original
    # contiguous ones; otherwise a group is gs consecutive columns of the quantization order
    g_idx = ((perm if static is not None else torch.arange(cols, device=W.device)) // gs).to(torch.int32)
    if static is not None:                     # every group's grid is known before the loop
        for g, (scale, zero) in enumerate(static):
            scales[g], zeros[g] = scale, zero
    col_group = g_idx.tolist()

    scale = zero = None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        with _one_thread(W.device) as n_threads:     # the column loop is many tiny ops: threads only add barriers
            for i in range(i2 - i1):
                col = i1 + i
                if static is not None:
                    scale, zero = static[col_group[col]]
                elif col % gs == 0:
                    # grid from the weights as already updated by the errors of earlier columns
                    g = col_group[col]
                    cur = torch.cat([W1[:, i:], W[:, i2:]], 1)[:, :gs]
                    with _threads(n_threads):
                        scale, zero = params(cur)
                    scales[g], zeros[g] = scale, zero
                w = W1[:, i]
                d = Hinv1[i, i]
                qi = _int(w, scale, zero, maxq)
                q = scale * (qi - zero)
                qint[:, col] = qi
                Q1[:, i] = q
                err = (w - q) / d
                W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])   # lazy batch update of the remaining columns

    Q, qint, g_idx = Q[:, invperm], qint[:, invperm], g_idx[invperm]
    if not torch.isfinite(Q).all():
        raise QuantcError(f"{name}: GPTQ produced non-finite weights (NaN/Inf in the weights or Hessian)")
    return [QuantResult(qint[sl].to(torch.int32), scales[:, sl], zeros[:, sl].to(torch.int32), g_idx, Q[sl], damp)
            for _, sl in blocks]


def _static_params(W: torch.Tensor, gs: int, blocks: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(scale, zero) of every contiguous group of W's columns, each option's rows on its own grid.
    All whole groups of an option are searched in one call (the search is per row, so batching
    (row, group) pairs changes no value but saves a Python loop per group); a ragged last group is
    searched on its own, as before."""
    rows, cols = blocks[0][1].stop - blocks[0][1].start, W.shape[1]
    full = cols // gs
    per_group: list[list] = [[] for _ in range(-(-cols // gs))]
    for o, sl in blocks:
        x = W[sl]
        if full:
            xs = x[:, :full * gs].reshape(rows, full, gs).transpose(0, 1).reshape(full * rows, gs)
            s, z = find_params(xs, o.bits, o.sym, o.mse)
            for g, (sg, zg) in enumerate(zip(s.reshape(full, rows), z.reshape(full, rows))):
                per_group[g].append((sg, zg))
        if full * gs < cols:
            per_group[full].append(find_params(x[:, full * gs:], o.bits, o.sym, o.mse))
    return [(torch.cat([s for s, _ in p]), torch.cat([z for _, z in p])) if len(p) > 1 else p[0] for p in per_group]


def _gptq_ggml(W, H, opt: Option, percdamp, blocksize, name, hinv: dict) -> QuantResult:
    """GPTQ on a llama.cpp grid: when the column loop enters a block (a K-quant's super-block of
    256, or a block of 32), the block's quantized grid (fp16 d/dmin, integer sub-block scales/mins)
    is chosen from the current, error-updated weights (the clip search weighted by the Hessian
    diagonal, as llama.cpp's imatrix does); each column is then rounded to the nearest level of that
    grid and its error spread over the later columns as usual. The codes chosen are the codes stored."""
    W = W.float().clone()
    W[:, torch.diag(H) == 0] = 0               # as in _gptq_stacked: before _undead
    H = _undead(H.float())
    rows, cols = W.shape
    t = ggml.type_for(opt.grid, opt.bits, opt.sym, cols, name)
    B, sub = t.block, t.sub
    # lazy batches must start on block boundaries, so a block's grid sees every earlier update
    if blocksize % B and B % blocksize:
        blocksize = B
    if False not in hinv:                      # shared with the GPTQ-grid options without act-order
        hinv[False] = (*cholesky_inverse_upper(H, percdamp, name), torch.arange(cols, device=W.device))
    Hinv, damp, _ = hinv[False]
    imp = torch.diag(H)

    Q = torch.zeros_like(W)
    qint = torch.zeros(rows, cols, dtype=torch.int32, device=W.device)
    blocks: list[dict] = []
    s = off = None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        with _one_thread(W.device) as n_threads:
            for i in range(i2 - i1):
                col = i1 + i
                if col % B == 0:
                    cur = torch.cat([W1[:, i:], W[:, i2:]], 1)[:, :B]
                    with _threads(n_threads):
                        fields, s, off = ggml.block_grid(t, cur, imp[col:col + B], opt.mse)
                    blocks.append(fields)
                j = (col % B) // sub
                w = W1[:, i]
                u = ggml.nearest(t, w, s[:, j], off[:, j])
                q = ggml.values(t, u, s[:, j], off[:, j])
                qint[:, col] = u
                Q1[:, i] = q
                err = (w - q) / Hinv1[i, i]
                W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if not torch.isfinite(Q).all():
        raise QuantcError(f"{name}: GPTQ produced non-finite weights (NaN/Inf in the weights or Hessian)")
    fields = {k: torch.stack([b[k] for b in blocks], 1) for k in blocks[0]}   # [rows, blocks, ...]
    return QuantResult(qint, None, None, None, Q, damp, ggml=t.name, fields=fields)


def qep_target(W: torch.Tensor, H_hat: torch.Tensor, delta: torch.Tensor, alpha: float,
               percdamp: float = 0.01) -> torch.Tensor:
    """QEP (Arai & Ichikawa, 2025): the weights that best map the quantized model's inputs X̂ to
    the original outputs WX. min_Ŵ ‖WX − ŴX̂‖² = ‖(W* − Ŵ)X̂‖² + const with
    W* = W + W·δ·Ĥ⁻¹, δ = (X − X̂)X̂ᵀ, Ĥ = X̂X̂ᵀ (both scaled like H). GPTQ then runs on W* with Ĥ;
    alpha ∈ [0, 1] scales the correction (0 = plain GPTQ)."""
    if alpha == 0:
        return W
    n = H_hat.shape[0]
    Hd = H_hat.double().clone()
    i = torch.arange(n, device=Hd.device)
    Hd[i, i] += percdamp * torch.mean(torch.diag(Hd))
    corr = torch.linalg.solve(Hd, (W.double() @ delta.double()).t()).t()   # W δ Ĥ⁻¹ (Ĥ symmetric)
    return (W.double() + alpha * corr).float()


def relative_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """‖(W − Ŵ)X‖² / ‖WX‖² computed from H ∝ XXᵀ."""
    return energy(W - Wq, H) / max(energy(W, H), 1e-30)


# ---- ‖ΔW X‖² from H, without a float64 copy of a large H -------------------------------------------

ERR_BLOCK = 2048    # the float64 error terms are formed this many rows × columns at a time


def row_errors(D: torch.Tensor, H: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """diag(D H Dᵀ), formed in `dtype` (float64 by default: the measured errors; the anchors' RTN
    proxies use float32, half the time, as their ratios cancel its rounding). Blocks of ERR_BLOCK rows
    of D and columns of H, so neither a float64 copy of H (an 8B down_proj's: 1.6 GB) nor of D exists.
    A matrix within one block (every SmolLM2 linear) takes the one-block path, the same operations as
    without blocks; larger ones differ from it only in the order of the sums."""
    rows, cols = D.shape
    if rows <= ERR_BLOCK and cols <= ERR_BLOCK:
        Dd = D.to(dtype)
        return ((Dd @ H.to(dtype)) * Dd).sum(1, dtype=torch.float64)
    out = torch.zeros(rows, dtype=torch.float64, device=D.device)
    for r in range(0, rows, ERR_BLOCK):
        Dr = D[r:r + ERR_BLOCK].to(dtype)
        for c in range(0, cols, ERR_BLOCK):
            out[r:r + ERR_BLOCK] += ((Dr @ H[:, c:c + ERR_BLOCK].to(dtype)) * Dr[:, c:c + ERR_BLOCK]).sum(1, dtype=torch.float64)
    return out


def energy(W: torch.Tensor, H: torch.Tensor) -> float:
    """tr(W H Wᵀ) in float64 (blocked like `row_errors` when large)."""
    if max(W.shape) <= ERR_BLOCK:
        Wd = W.double()
        return float(torch.einsum("oi,ij,oj->", Wd, H.double(), Wd))
    return float(row_errors(W, H).sum())
