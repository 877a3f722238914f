"""Resume state of the quantize sweep, inside the staging folder (`.OUT.partial/resume/`).

After every decoder layer: that layer's final checkpoint tensors as a shard (`layer-I.safetensors`,
packed, in the export dtype: the exporter assembles the artifact from these, so the sweep keeps no
layer's codes in memory), the activations entering the next layer (`acts-I.safetensors`, I the next
layer), and `state.json` with the compile's key, the next layer and its activations file. A rerun of
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

log = logging.getLogger("quantc")
FORMAT = 3          # 3: state.json names its activations file (2: one acts.safetensors; 1: raw codes)


class Checkpoint:
    def __init__(self, staging: Path, key: str):
        self.dir, self.key = staging / "resume", f"{key}:{FORMAT}"

    def shard(self, i: int) -> Path:
        return self.dir / f"layer-{i}.safetensors"

    def load(self):
        """(next layer, x̂, x or None) of an interrupted run of the same compile, else None."""
        from safetensors.torch import load_file
        state = self.dir / "state.json"
        if not state.is_file():
            return None
        st = json.loads(state.read_text())
        if st.get("key") != self.key:
            log.info("resume state is from another compile; starting over")
            return None
        acts = load_file(str(self.dir / st["acts"]))
        log.warning("resuming after decoder layer %d (%s)", st["next_layer"] - 1, self.dir)
        return st["next_layer"], acts["x_hat"], acts.get("x_ref")

    def save_layer(self, i: int, tensors: dict) -> None:
        from safetensors.torch import save_file
        self.dir.mkdir(exist_ok=True)
        _atomic(lambda p: save_file(tensors, str(p), metadata={"format": "pt"}), self.shard(i))

    def save_state(self, i: int, x_hat, x_ref) -> None:
        """The inputs of layer i + 1 (x̂, and x for QEP: whole tensors, every rank's rows)."""
        from safetensors.torch import save_file
        acts = {"x_hat": x_hat.contiguous()}
        if x_ref is not None:
            acts["x_ref"] = x_ref.contiguous()
        name = f"acts-{i + 1}.safetensors"
        _atomic(lambda p: save_file({k: v.cpu() for k, v in acts.items()}, str(p)), self.dir / name)
        _atomic(lambda p: p.write_text(json.dumps({"key": self.key, "next_layer": i + 1, "acts": name})),
                self.dir / "state.json")
        for old in self.dir.glob("acts-*.safetensors"):       # the state names the new file: the old can go
            if old.name != name:
                old.unlink(missing_ok=True)


FAULT_ENV, FAULT_RANK_ENV = "QUANTC_FAULT_AFTER_LAYER", "QUANTC_FAULT_RANK"


def fault_point(i: int, rank: int = 0) -> None:
    """Fault injection for the resume tests: the process of rank QUANTC_FAULT_RANK (default 0) dies
    as by SIGKILL once layer QUANTC_FAULT_AFTER_LAYER is done (no cleanup, as in a real crash)."""
    if os.environ.get(FAULT_ENV) == str(i) and os.environ.get(FAULT_RANK_ENV, "0") == str(rank):
        os.kill(os.getpid(), 9)


def _atomic(write, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
