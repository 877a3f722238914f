"""Scale-out on torch.distributed: `torchrun --nproc-per-node N -m quantc compile budget.yaml` (and
`--nnodes` across machines). The one home of rank logic: which share of the work each rank does, and
the few collectives quantc needs. Passes receive the `World` inside their `Placement`.

What is split, and why the artifact is bit-identical to one process (at equal threads per process):
- Calibration (and measurement) batches: each rank takes a contiguous range of whole batches, with
  the batch boundaries of one process, so every batch's forward is the same computation on any
  rank. A Hessian is the sum of per-batch float32 products X_bᵀX_b, accumulated in float64 in one
  process too, and summed over ranks in float64 (gloo/nccl all-reduce): float32 products add up
  exactly in float64 unless their magnitudes span more than ~2^29, so the order of the sum does not
  show after the final rounding to float32.
- The GPTQ solves of a layer (sweep 2) and the unit × option solves of the measurement (sweep 1):
  round-robin over the layer's linears / the model's units. The owner solves, then broadcasts the
  result (torch's `broadcast_object_list`); a solve is a pure function of (W, H, option), the same
  on any rank.
- The measurement's held-out streams (each a perturbed copy of a few held-out sequences) and the
  fisher probes' backward passes: round-robin in the order made. Every rank runs what they share
  (the unperturbed held-out stream, the random draws); the owner carries a stream to the head and
  compares it there, and the results (floats, and per-probe float64 sums added in one order) are
  exchanged with `all_gather_object`.
- Rank 0 alone writes: the staging folder, the layer shards and resume state, the measurement cache
  and the artifact. The activations of the resume point are gathered to rank 0 after each layer and
  scattered back on resume, so a run resumes with any number of processes.
Nothing home-made: torch.distributed's own process group (gloo on CPUs; on GPUs nccl for CUDA tensors
and gloo for host tensors and the object collectives), set up from
torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).
"""
from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass, field

import torch

log = logging.getLogger("quantc")
TIMEOUT_ENV = "QUANTC_DIST_TIMEOUT_S"      # how long a collective waits for a missing rank (default 30 min)


@dataclass
class Traffic:
    """Bytes this rank sent or received in collectives, by kind (the benchmark reports them)."""
    bytes: dict = field(default_factory=dict)

    def add(self, kind: str, n: int) -> None:
        self.bytes[kind] = self.bytes.get(kind, 0) + int(n)

    def total(self) -> int:
        return sum(self.bytes.values())


@dataclass
class Solves:
    """Solves this rank ran, by sweep (sweep 1: units, each at all its options; sweep 2: linears), and
    sweep 1's held-out streams it carried (`streams`): the manifest shows how the ranks split the work
    (`per_rank`)."""
    count: dict = field(default_factory=dict)

    def add(self, sweep: str, n: int = 1) -> None:
        self.count[sweep] = self.count.get(sweep, 0) + n

    def per_rank(self, world: "World", sweeps=("measure", "quantize")) -> dict[str, list[int]]:
        """Every rank's counts (a collective: every rank calls it)."""
        t = torch.zeros(world.size, len(sweeps), dtype=torch.float64)
        t[world.rank] = torch.tensor([float(self.count.get(s, 0)) for s in sweeps], dtype=torch.float64)
        t = world.all_reduce(t)
        return {s: [int(v) for v in t[:, i]] for i, s in enumerate(sweeps)}


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def share(self, n_batches: int) -> range:
        """This rank's contiguous range of batch indices (earlier ranks take one more when uneven)."""
        base, extra = divmod(n_batches, self.size)
        lo = self.rank * base + min(self.rank, extra)
        return range(lo, lo + base + (1 if self.rank < extra else 0))

    def local_rows(self, tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
        """The rows of `tokens` in this rank's whole batches (batch boundaries as in one process)."""
        if not self.active:
            return tokens
        r = self.share(-(-tokens.shape[0] // batch_size))
        return tokens[r.start * batch_size: min(r.stop * batch_size, tokens.shape[0])]

    def owner(self, j: int) -> int:
        return j % self.size

    def mine(self, j: int) -> bool:
        return self.owner(j) == self.rank

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (every rank calls it, in the same order)."""
        if self.active:
            import torch.distributed as dist
            if dist.get_backend() == "nccl" and not t.is_cuda:    # a group of nccl alone (made by the caller)
                on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
                dist.all_reduce(on_gpu)
                t.copy_(on_gpu)
            else:
                dist.all_reduce(t)
            TRAFFIC.add("all_reduce", t.numel() * t.element_size())
        return t

    def broadcast(self, obj, src: int, patient: bool = False):
        """`obj` of rank `src` on every rank (pickled by torch; tensors travel as bytes). `patient`: the
        sender may work for hours before it sends (rank 0 sampling calibration text), so the others wait
        in a group without QUANTC_DIST_TIMEOUT_S, which is there to catch a dead rank, not a busy one."""
        if not self.active:
            return obj
        import torch.distributed as dist
        # a pickled CUDA tensor would come back on the sender's GPU index: send host tensors, and
        # each receiver moves what it uses to its own device
        box = [_on_host(obj) if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, group=_patient_group() if patient else None)
        TRAFFIC.add("broadcast", _nbytes(box[0]))
        return box[0]

    def all_gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank (pickled by torch; host tensors)."""
        if not self.active:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.size
        dist.all_gather_object(out, _on_host(obj))
        TRAFFIC.add("all_gather", sum(_nbytes(o) for o in out))
        return out

    def gather(self, obj) -> list | None:
        """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
        if not self.active:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.size if self.main else None
        dist.gather_object(_on_host(obj), out, dst=0)
        TRAFFIC.add("gather", sum(_nbytes(o) for o in out) if self.main else _nbytes(obj))
        return out

    def scatter(self, parts: list | None) -> object:
        """Rank 0's `parts[r]` on rank r (`parts` is read on rank 0 only)."""
        if not self.active:
            return parts[0]
        import torch.distributed as dist
        box = [None]
        dist.scatter_object_list(box, [_on_host(p) for p in parts] if self.main else None, src=0)
        TRAFFIC.add("scatter", _nbytes(box[0]))
        return box[0]

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist
            dist.barrier()

    def gather_rows(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """Every rank's rows of a tensor, concatenated in rank order on rank 0 (None elsewhere)."""
        if not self.active or t is None:
            return t
        import torch.distributed as dist
        parts = [None] * self.size if self.main else None
        dist.gather_object(t.cpu(), parts, dst=0)
        TRAFFIC.add("gather", t.numel() * t.element_size())
        return torch.cat(parts) if self.main else None

    def scatter_rows(self, full: torch.Tensor | None, batch_size: int) -> torch.Tensor | None:
        """Rank 0's whole tensor, each rank receiving the rows of its batches."""
        if not self.active:
            return full
        parts = None
        if self.main and full is not None:
            # copies: a pickled view carries its whole storage, so each rank would receive every row
            parts = [World(r, self.size).local_rows(full, batch_size).clone() for r in range(self.size)]
        have = self.broadcast(parts is not None, 0)
        return self.scatter(parts) if have else None


SOLO = World()
TRAFFIC = Traffic()
SOLVES = Solves()


def _on_host(obj):
    """`obj` with every tensor in it on the CPU (containers rebuilt; objects with a `cpu()` method,
    such as QuantResult, moved in place)."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _on_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_host(v) for v in obj)
    if hasattr(obj, "cpu") and callable(obj.cpu):
        return obj.cpu()
    return obj


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    if hasattr(obj, "__dict__"):
        return _nbytes(vars(obj))
    return 0


def launched() -> bool:
    """Started by torchrun (or another launcher that sets WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_shape() -> tuple[int, int, bool]:
    """(processes in the run, processes on this host, whether this host runs rank 0), as the
    launcher set them (torchrun: WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK), readable before the group
    exists: the memory check counts every process that shares this host's memory. (1, 1, True)
    without a launcher."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return world, local, int(os.environ.get("GROUP_RANK", "0")) == 0


def launched_rank() -> int:
    """This process's rank as the launcher set it (0 without one), readable before the group exists."""
    return int(os.environ.get("RANK", "0"))


_PATIENT = None


def _patient_group():
    """A gloo group of every rank that waits up to a week (created once, by every rank at the same call)."""
    global _PATIENT
    if _PATIENT is None:
        import torch.distributed as dist
        _PATIENT = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))
    return _PATIENT


def join(device: torch.device) -> World:
    """The process group of this run (created once from torchrun's environment): gloo on CPUs; on
    GPUs nccl for CUDA tensors, gloo for host ones. One process without a launcher: SOLO, and
    torch.distributed is never touched."""
    if not launched():
        return SOLO
    import torch.distributed as dist
    if not dist.is_initialized():
        # on GPUs, nccl for CUDA tensors (the Hessian sums) and gloo for host tensors: torch runs the
        # object collectives (broadcast of results, the resume point's gather and scatter) on the
        # group's cpu backend, so a layer's activations never pass through rank 0's GPU memory
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 1800)))
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=timeout)
        log.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def current() -> World:
    """The world joined by `join` (SOLO before, or without a launcher)."""
    if not launched():
        return SOLO
    import torch.distributed as dist
    if not dist.is_initialized():
        return SOLO
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def leave() -> None:
    """Tear the process group down at the end of a successful run (torchrun warns when it is left
    open). The barrier first: the other ranks wait until rank 0 has written its files."""
    if launched():
        import torch.distributed as dist
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
            import atexit
            atexit.register(_exit_without_finalizing)
    global _PATIENT
    _PATIENT = None


def _exit_without_finalizing() -> None:
    """The last step of a torchrun process whose run succeeded and whose group is torn down: flush
    and leave without the interpreter's and C++'s teardown. Gloo's worker threads can still hold
    work objects then, and their release during that teardown aborts the process (pytorch/pytorch
    #179291); here a finished rank died so twice under a loaded test suite ("terminate called without
    an active exception", SIGABRT), which torchrun reports as a failed run. Registered by `leave`
    last, so it runs first of the exit handlers; the logging handlers and stdio are flushed here."""
    import logging
    logging.shutdown()
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)
