"""One quantization option: what a unit of linears can be given."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .packing import packed_bytes


@dataclass(frozen=True)
class Option:
    bits: int = 4
    group_size: int = 128      # -1 = one group per output row (per-channel)
    sym: bool = True
    act_order: bool = False    # GPTQ's desc_act: quantize columns by decreasing Hessian diagonal
    static_groups: bool = False  # with act_order: grids from contiguous groups, so g_idx stays i // gs
    mse: bool = False          # search a clipped grid per group

    @property
    def label(self) -> str:
        gs = "pc" if self.group_size <= 0 else f"g{self.group_size}"
        return f"{self.bits}b-{gs}-{'sym' if self.sym else 'asym'}"

    def bytes_for(self, in_features: int, out_features: int) -> int:
        return packed_bytes(in_features, out_features, self.bits, self.group_size)

    def to_dict(self) -> dict:
        return asdict(self)
