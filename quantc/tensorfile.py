"""The safetensors file layout: read a file's header, and write a file one tensor at a time.

A file is 8 bytes (little-endian u64 N), then N bytes of JSON header (compact, padded with spaces to a
multiple of 8), then the tensors' bytes back to back. The header maps each tensor name to
{dtype, shape, data_offsets: [begin, end]} (offsets into the data that follows the header), with an
optional "__metadata__" (str → str) first.

`write` puts the tensors in the order safetensors' own writer (`safetensors.torch.save_file`) gives
them. It asks that writer for the order on one-element stand-ins of the same names and dtypes, so as
not to restate its rule. So the bytes equal save_file's on the same tensors (tests/test_packing.py),
and an export assembled this way is the file it was before. What `write` holds at once is one tensor
made in memory, or one chunk of a tensor copied from another file."""
from __future__ import annotations

import contextlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import durable

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
          torch.int16: "I16", torch.int8: "I8", torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16",
          torch.uint8: "U8", torch.bool: "BOOL"}
BY_NAME = {v: k for k, v in DTYPES.items()}
COPY_CHUNK = 16 * 2**20          # bytes per read when a tensor is copied from another file


def read_header(path: str | Path) -> tuple[dict, int]:
    """(header, where the data starts) of a safetensors file, reading the header only."""
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        return json.loads(fh.read(n)), 8 + n


@dataclass
class Entry:
    """One tensor to write: its dtype and shape, and where its bytes come from: `make()` builds it
    in memory (called when it is written), or `path` with the byte range [begin, end)."""
    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor] | None = None
    path: str | None = None
    begin: int = 0
    end: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def file_entries(path: str | Path) -> dict[str, Entry]:
    """Every tensor of a safetensors file, as entries that copy their bytes from it."""
    header, start = read_header(path)
    return {k: Entry(BY_NAME[v["dtype"]], tuple(v["shape"]), path=str(path), begin=start + v["data_offsets"][0],
                     end=start + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


def tensor_entry(make: Callable[[], torch.Tensor], dtype: torch.dtype, shape) -> Entry:
    return Entry(dtype, tuple(shape), make=make)


def _order(entries: dict[str, Entry]) -> list[str]:
    """The order safetensors' writer gives these names and dtypes (from its own header)."""
    from safetensors.torch import save
    blob = save({k: torch.zeros(1, dtype=e.dtype) for k, e in entries.items()})
    n = struct.unpack("<Q", blob[:8])[0]
    return [k for k in json.loads(blob[8:8 + n]) if k != "__metadata__"]


def write(path: str | Path, entries: dict[str, Entry], metadata: dict[str, str] | None = None) -> int:
    """Write `entries` as one safetensors file at `path` (through a temporary name, then renamed);
    return the tensor bytes written. `metadata` of one key gives save_file's bytes (with several, the
    order of its keys is this dict's, where save_file's follows a hash map)."""
    header: dict = {"__metadata__": metadata} if metadata is not None else {}
    order, offset = _order(entries), 0
    for k in order:
        e = entries[k]
        if e.path is not None and e.end - e.begin != e.nbytes:
            raise ValueError(f"{e.path}: tensor {k} holds {e.end - e.begin} bytes, its shape and dtype need {e.nbytes}")
        header[k] = {"dtype": DTYPES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    blob += b" " * (-len(blob) % 8)

    def fill(tmp):
        with open(tmp, "wb") as out, contextlib.ExitStack() as stack:
            sources: dict[str, object] = {}          # each source file opened once for all its tensors
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            for k in order:
                e = entries[k]
                if e.make is not None:
                    t = e.make().cpu().contiguous()
                    if t.dtype != e.dtype or tuple(t.shape) != e.shape:
                        raise ValueError(f"tensor {k}: made {t.dtype} {tuple(t.shape)}, announced {e.dtype} {e.shape}")
                    out.write(t.reshape(-1).view(torch.uint8).numpy().data)   # the tensor's memory, not a copy
                    del t
                else:
                    if e.path not in sources:
                        sources[e.path] = stack.enter_context(open(e.path, "rb"))
                    src = sources[e.path]
                    src.seek(e.begin)
                    left = e.end - e.begin
                    while left:
                        chunk = src.read(min(COPY_CHUNK, left))
                        if not chunk:
                            raise ValueError(f"{e.path}: ends inside tensor {k}")
                        out.write(chunk)
                        left -= len(chunk)

    durable.write(path, fill)
    return offset
