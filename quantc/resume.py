"""Resume state of the two sweeps: the quantize sweep's (`Checkpoint`) and the measurement's
(`MeasurePoint`).

The quantize sweep's lives inside the staging folder (`.OUT.partial/resume/`).

After every decoder layer: that layer's final checkpoint tensors as a shard (`layer-I.safetensors`,
packed, in the export dtype: the exporter assembles the artifact from these, so the sweep keeps no
layer's codes in memory), the activations entering the next layer (`acts-I.safetensors`, I the next
layer), and `state.json` with the compile's key, the next layer and its activations file; with the compile's check (passes/quantize.py HeldOut) the activations
file also holds the held-out streams through the original and the quantized layers. A rerun of
the same compile (same model files, config, plan, calibration and compute placement: `key`) continues
after the last finished layer.

The point moves in one step: the new activations are written under their own name first, then
`state.json` is replaced to name them, and only then does the previous file go. A process that dies
between any two of these (SIGKILL, the OOM killer, torchrun's SIGTERM) leaves a state that names
activations matching it.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from . import durable

log = logging.getLogger("quantc")
FORMAT = 4          # 4: the check's held-out streams beside x̂ and x; 3: state.json names its activations
#                     file (2: one acts.safetensors; 1: raw codes)


class Checkpoint:
    def __init__(self, staging: Path, key: str):
        self.dir, self.key = staging / "resume", f"{key}:{FORMAT}"

    def shard(self, i: int) -> Path:
        return self.dir / f"layer-{i}.safetensors"

    def load(self):
        """(next layer, x̂, x or None, the check's (original, quantized) streams or None) of an interrupted
        run of the same compile, else None. A resume point of another compile, or one that cannot be read
        whole (its state, its activations, the header of every finished layer's shard: a copied folder,
        a file system that ignored fsync), is discarded first: this run then writes its own shards over
        it, which a later run must never resume from under the old state."""
        from safetensors import safe_open
        from safetensors.torch import load_file
        state = self.dir / "state.json"
        if not state.is_file():
            self.discard()               # shards without a state (a run stopped before its first state)
            return None
        try:
            st = json.loads(state.read_text())
            if st.get("key") != self.key:
                log.warning("the resume point in %s is from another compile (other settings, calibration or "
                            "weights); starting over", self.dir)
                self.discard()
                return None
            n = int(st["next_layer"])
            for i in range(n):
                with safe_open(str(self.shard(i)), "pt"):
                    pass
            acts = load_file(str(self.dir / st["acts"]))
            x_hat = acts["x_hat"]
        except Exception as e:           # noqa: BLE001 - any damage means the same: start over
            log.warning("the resume point in %s cannot be read (%s: %s); starting over", self.dir,
                        type(e).__name__, e)
            self.discard()
            return None
        log.warning("resuming after decoder layer %d (%s)", n - 1, self.dir)
        for p in self.dir.glob("*.tmp"):     # a killed run's half-written copies (this run holds the lock)
            p.unlink(missing_ok=True)
        check = (acts["check_ref"], acts["check_hat"]) if "check_ref" in acts else None
        return n, x_hat, acts.get("x_ref"), check

    def discard(self) -> None:
        """Remove the resume point: the state first (durably), so no later run resumes from the shards
        that go or are overwritten after it."""
        state = self.dir / "state.json"
        if state.exists():
            state.unlink()
            durable.fsync(self.dir)
        for p in self.dir.glob("*") if self.dir.is_dir() else ():
            if p.is_file():
                p.unlink(missing_ok=True)

    def save_layer(self, i: int, tensors: dict) -> None:
        from safetensors.torch import save_file
        self.dir.mkdir(exist_ok=True)
        _atomic(lambda p: save_file(tensors, str(p), metadata={"format": "pt"}), self.shard(i))

    def save_state(self, i: int, x_hat, x_ref, check=None) -> None:
        """The inputs of layer i + 1 (x̂, and x for QEP: whole tensors, every rank's rows; `check`: the
        held-out streams' (original, quantized))."""
        from safetensors.torch import save_file
        acts = {"x_hat": x_hat.contiguous()}
        if x_ref is not None:
            acts["x_ref"] = x_ref.contiguous()
        if check is not None:
            acts["check_ref"], acts["check_hat"] = (t.contiguous() for t in check)
        name = f"acts-{i + 1}.safetensors"
        _atomic(lambda p: save_file({k: v.cpu() for k, v in acts.items()}, str(p)), self.dir / name)
        _atomic(lambda p: p.write_text(json.dumps({"key": self.key, "next_layer": i + 1, "acts": name})),
                self.dir / "state.json")
        for old in self.dir.glob("acts-*.safetensors"):       # the state names the new file: the old can go
            if old.name != name:
                old.unlink(missing_ok=True)


class MeasurePoint:
    """Resume state of the measurement (sweep 1), beside the measurement cache (`partial-KEY/`, KEY the
    measurement's key: the same model files, calibration, candidates and settings). After every
    decoder layer: that layer's own results in `layer-I.pt` (its units' entries and error diagonals,
    its diagnostics, its held-out input), then `state.pt`, replaced in one step, with what the next
    layer starts from (the calibration stream with every rank's rows, gathered by rank 0; the held-out
    and perturbed streams, every rank's, with their keys in the order made, which say each stream's
    rank; the random generator). A state names only layers whose files were written
    before it. Rank 0 writes and reads; the other ranks get their part through the collectives, so
    any number of processes resumes it. The cache entry, once written, replaces the folder."""

    FORMAT = 2       # of the files below; another format is measured from the start (2: the streams' keys)

    def __init__(self, folder: Path, world):
        self.dir, self.world, self.broken = folder, world, False

    def save(self, i: int, layer: dict, state: dict, x) -> None:
        """After layer i: its results, then the state (every rank calls it: `x`'s rows are gathered,
        None after the last layer, and every rank waits until rank 0 has written). A failed write
        (a full disk) costs the resume point, not the measurement: rank 0 warns and stops saving."""
        import torch
        from .distributed import _on_host
        full = self.world.gather_rows(x)
        if self.world.main and not self.broken:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                _atomic(lambda p: torch.save(_on_host(layer), p), self.dir / f"layer-{i}.pt")
                _atomic(lambda p: torch.save(_on_host({**state, "next_layer": i + 1, "format": self.FORMAT, "x": full}),
                                             p), self.dir / "state.pt")
            except OSError as e:
                self.broken = True
                log.warning("%s: cannot save the measurement's resume point (%s); measuring on without one",
                            self.dir, e)
        self.world.barrier()

    def load(self, batch_size: int):
        """(next layer, each finished layer's results, state with this rank's rows as `x` and this
        rank's held-out streams: stream j of `keys` belongs to rank World.owner(j)), or None (every
        rank calls it). The finished layers come as an iterator that reads and sends one layer at a
        time (each holds a held-out input: 16 MiB at 8B width), so rank 0 never loads them all and
        no pickle of them all is made; where the caller puts each one in a file (offload_activations),
        at most two are in memory. Every rank must consume it whole, in step, before its next
        collective."""
        import torch
        found = None
        if self.world.main and (self.dir / "state.pt").is_file():
            try:
                st = torch.load(self.dir / "state.pt", weights_only=True)
                if st.get("format") == self.FORMAT and self._layers_readable(st["next_layer"]):
                    if {"xh", "streams", "uniform", "keys", "owned", "gen"} <= set(st):
                        found = st
            except Exception as e:      # an unreadable state is no reason to stop: measure from the start
                log.warning("%s: cannot read the measurement's resume state (%s); measuring from the start",
                            self.dir, e)
        if not self.world.broadcast(found is not None, 0):
            return None
        st = found or {}
        x = self.world.scatter_rows(st.pop("x", None), batch_size)
        streams = self.world.scatter(_split_streams(st, self.world) if self.world.main else None)
        st = self.world.broadcast(st if self.world.main else None, 0)
        st["streams"], st["uniform"] = streams
        if self.world.main:
            log.warning("measurement: resuming after decoder layer %d (%s)", st["next_layer"] - 1, self.dir)
        return st["next_layer"], self._layers(st["next_layer"]), {**st, "x": x}

    NEED = {"units", "diagnostics", "sq", "sq_solved", "held_in"}     # in every layer-I.pt

    def _layers_readable(self, n: int) -> bool:
        """Whether layers 0..n-1 are all there and whole (rank 0; each read and dropped in turn, so a
        damaged file is found before the resume starts, not halfway through it)."""
        import torch
        return all(self.NEED <= set(torch.load(self.dir / f"layer-{i}.pt", weights_only=True))
                   for i in range(n))

    def _layers(self, n: int):
        import torch

        from .errors import QuantcError
        for i in range(n):
            rec = None
            if self.world.main:
                try:
                    rec = torch.load(self.dir / f"layer-{i}.pt", weights_only=True)
                except Exception as e:      # removed or damaged since load() checked it (another run of
                    rec = str(e)            # this measurement finished and cleared it): every rank stops
            rec = self.world.broadcast(rec, 0)
            if isinstance(rec, str):
                raise QuantcError(f"{self.dir / f'layer-{i}.pt'}: the measurement's resume point changed while "
                                  f"it was being read ({rec}); another run of the same measurement may have "
                                  f"finished it. Run the same command again: it uses that run's cached "
                                  f"measurement, or measures from the start.")
            yield rec
            rec = None          # the generator's copy: gone before the next layer is read

    def clear(self) -> None:
        import shutil
        if self.world.main:
            (self.dir / "state.pt").unlink(missing_ok=True)      # first: a half-removed folder names nothing
            shutil.rmtree(self.dir, ignore_errors=True)


def other_points(cache: Path, key: str) -> str | None:
    """A note on the resume points of other measurements in the cache folder, or None. A measurement
    stopped and then started with other settings leaves its point (the first settings may come back,
    and another run may be using it), so it stays until deleted; the note gives their size and names
    them."""
    import time
    others, size, oldest = [], 0, None
    for d in sorted(cache.glob("partial-*")):
        if d.name == f"partial-{key}" or not d.is_dir():
            continue
        try:
            files = [f.stat() for f in d.iterdir() if f.is_file()]
        except OSError:            # cleared by its own run meanwhile
            continue
        others.append(d)
        size += sum(f.st_size for f in files)
        t = max((f.st_mtime for f in files), default=None)
        oldest = t if oldest is None or (t is not None and t < oldest) else oldest
    if not others:
        return None
    when = time.strftime("%Y-%m-%d", time.localtime(oldest)) if oldest else "?"
    names = " ".join(str(d) for d in others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
    return (f"{cache}: {len(others)} resume point(s) of measurements with other settings take {size / 2**20:.0f} MiB "
            f"(the oldest last written {when}); each lets a stopped run with its settings continue. Delete them "
            f"once no run needs them: rm -r {names}")


def _split_streams(st: dict, world) -> list[tuple[dict, dict]]:
    """Each rank's (streams, uniform streams) of a saved state, taken out of it: stream j of
    st["keys"] (a uniform one keyed ("uniform", option)) goes to rank world.owner(j)."""
    streams, uniform = st.pop("streams"), st.pop("uniform")
    parts = [({}, {}) for _ in range(world.size)]
    for j, k in enumerate(st["keys"]):
        s, u = parts[world.owner(j)]
        if k[0] == "uniform":
            u[k[1]] = uniform[k[1]]
        else:
            s[k] = streams[k]
    return parts


FAULT_ENV, FAULT_RANK_ENV = "QUANTC_FAULT_AFTER_LAYER", "QUANTC_FAULT_RANK"
MEASURE_FAULT_ENV = "QUANTC_FAULT_AFTER_MEASURED_LAYER"


def fault_point(i: int, rank: int = 0, env: str = FAULT_ENV) -> None:
    """Fault injection for the resume tests: the process of rank QUANTC_FAULT_RANK (default 0) dies
    as by SIGKILL once layer QUANTC_FAULT_AFTER_LAYER (of the quantize sweep; of the measurement:
    QUANTC_FAULT_AFTER_MEASURED_LAYER) is done (no cleanup, as in a real crash)."""
    if os.environ.get(env) == str(i) and os.environ.get(FAULT_RANK_ENV, "0") == str(rank):
        os.kill(os.getpid(), 9)


def _atomic(write, path: Path) -> None:
    durable.write(path, write)       # (a name of its own: the resume tests stop it between two files)
