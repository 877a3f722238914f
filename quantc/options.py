"""One quantization option: what a unit of linears can be given."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from . import ggml
from .packing import packed_bytes


@dataclass(frozen=True)
class Option:
    bits: int = 4
    group_size: int = 128      # -1 = one group per output row (per-channel)
    sym: bool = True
    act_order: bool = False    # GPTQ's desc_act: quantize columns by decreasing Hessian diagonal
    static_groups: bool = False  # with act_order: grids from contiguous groups, so g_idx stays i // gs
    mse: bool = False          # search a clipped grid per group
    # "gptq": GPTQ's grid (fp16 scale + integer zero per group), packed as GPTQ v1. "k" / "ggml": the
    # grid of a llama.cpp type (ggml.py: K-quants by bits, or the group-32 Q4_0…Q8_0 by bits and sym),
    # stored as llama.cpp blocks; its type fixes group_size and sym, and there is no act-order.
    grid: str = "gptq"

    def __post_init__(self):
        if self.grid == "gptq":
            return
        t = ggml.main_type(self.grid, self.bits, self.sym)      # ValueError for a combination with no type
        for k, v in (("group_size", t.sub), ("sym", not t.mins), ("act_order", False), ("static_groups", False)):
            object.__setattr__(self, k, v)

    @property
    def ggml_type(self) -> "ggml.GGMLType | None":
        """The llama.cpp type this option names (None for the GPTQ grid); a linear whose rows are not
        whole blocks gets llama.cpp's fallback (ggml.type_for)."""
        return None if self.grid == "gptq" else ggml.main_type(self.grid, self.bits, self.sym)

    @property
    def size_order(self) -> tuple[int, int]:
        """Sort key from the smallest option to the largest: bits, then finer groups (more scales), with
        per-channel (group_size -1) the coarsest of all."""
        return self.bits, -(self.group_size if self.group_size > 0 else 2**31)

    @property
    def label(self) -> str:
        if self.grid != "gptq":
            return self.ggml_type.label
        gs = "pc" if self.group_size <= 0 else f"g{self.group_size}"
        return f"{self.bits}b-{gs}-{'sym' if self.sym else 'asym'}"

    def bytes_for(self, in_features: int, out_features: int, parts: int = 1) -> int:
        """Bytes of the linear as written. `parts`: it is written as that many equal row blocks
        (family.Family.export_split: Phi-3's gate_up_proj), each with its own g_idx, scales and zeros."""
        if parts > 1:
            return parts * self.bytes_for(in_features, out_features // parts)
        if self.grid != "gptq":
            return ggml.tensor_bytes(ggml.type_for(self.grid, self.bits, self.sym, in_features), in_features,
                                     out_features)
        return packed_bytes(in_features, out_features, self.bits, self.group_size)

    def to_dict(self) -> dict:
        # the GPTQ grid is left out, so records (plans, manifests, cache keys) of GPTQ options are unchanged
        d = asdict(self)
        if self.grid == "gptq":
            del d["grid"]
        return d

