"""Bounded memory: a model whose decoder layers stay on the meta device (no memory) until a pass needs
them, read from the model's memory-mapped safetensors one layer at a time and released afterwards.

The skeleton is built by transformers on the meta device; only what sits outside the decoder layers
(embeddings, final norm, lm_head, rotary tables) is materialized at load. Peak memory during the
quantize sweep is then about one layer's weights plus the calibration activations, not the model.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from torch import nn

from .errors import QuantcError, interrupts, reraise_interrupt
from .family import family_of

log = logging.getLogger("quantc")


class WeightSource:
    """Tensor name → safetensors file of a local model folder; reads one tensor at a time (mmap)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open
        self.folder = folder
        from .model import weight_files
        self.files = weight_files(folder)
        self.index: dict[str, Path] = {}
        for f in self.files:
            before = interrupts()
            try:
                with safe_open(str(f), framework="pt") as sf:
                    for k in sf.keys():
                        self.index[k] = f
            except Exception as e:
                reraise_interrupt(e, before)
                raise QuantcError(f"{f}: cannot read safetensors ({e}); the file is truncated or corrupt") from None

    def get(self, key: str, dtype=torch.float32, check: bool = False) -> torch.Tensor:
        from safetensors import safe_open
        f = self.index.get(key)
        if f is None:
            raise QuantcError(f"{self.folder}: tensor {key} is missing from the model's safetensors files")
        before = interrupts()
        try:    # opened per read: the mapping (and its resident pages) goes away with the handle
            with safe_open(str(f), framework="pt") as sf:
                t = sf.get_tensor(key)
        except Exception as e:
            reraise_interrupt(e, before)        # Ctrl-C or SIGTERM mid-read: not a damaged file
            raise QuantcError(f"{f}: cannot read {key} ({e}); the file is truncated or corrupt") from None
        t = t.to(dtype) if t.is_floating_point() else t
        if check and t.is_floating_point() and not torch.isfinite(t).all():
            raise QuantcError(f"{f}: weight {key} contains NaN or Inf values; the checkpoint is corrupt")
        return t


def can_load_lazily(path: str, gguf_file: str | None) -> bool:
    p = Path(path)
    return not gguf_file and p.is_dir() and any(p.glob("*.safetensors"))


def load_lazy(path: str, trust_remote_code: bool = False, dtype=torch.float32):
    """The model with every decoder layer on the meta device; `materialize(model, i)` brings one in."""
    from transformers import AutoConfig, AutoModelForCausalLM
    folder = Path(path)
    src = WeightSource(folder)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise QuantcError(f"{path}: cannot read the model config: {e}") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.eval()
    model.config.use_cache = False
    model._quantc_source = src
    for key in src.index:          # NaN/Inf anywhere fails now, not hours later (one tensor at a time)
        src.get(key, check=True)
    layers = decoder_layers(model)
    in_layers = {id(p) for p in layers.parameters()}
    head = family_of(model).head + ".weight"
    for name, p in list(model.named_parameters()):
        if id(p) in in_layers:
            continue
        if name == head and getattr(config, "tie_word_embeddings", False):
            continue
        _set(model, name, src.get(name, dtype))
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    fam = family_of(model)
    scale = fam.embed_multiplier(config)
    if scale is not None:          # a buffer computed in __init__ (Gemma's embedding scale), not in the files
        model.get_submodule(fam.embed).register_buffer("embed_scale", torch.tensor(scale), persistent=False)
    for name, mod in list(model.named_modules()):   # buffers computed in __init__ (rotary tables)
        if any(b.is_meta for b in mod.buffers(recurse=False)) and not name.startswith(fam.layers + "."):
            with torch.device("cpu"):
                fresh = type(mod)(config=config)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, fresh)
    missing = [k for k in _layer_keys(model, 0) if k not in src.index]
    if missing:
        raise QuantcError(f"{path}: the safetensors files lack {missing[0]} (and {len(missing) - 1} more); "
                          "the weights do not match config.json")
    return model


def decoder_layers(model) -> nn.ModuleList:
    from .model import decoder_layers as layers    # model.py imports this module inside functions
    return layers(model)


def _set(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    mod = model.get_submodule(owner)
    old = mod._parameters.get(leaf)
    if old is not None and tuple(old.shape) != tuple(value.shape):
        raise QuantcError(f"weight {name} has shape {tuple(value.shape)}, config.json implies {tuple(old.shape)}")
    mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def _layer_keys(model, i: int) -> list[str]:
    return [family_of(model).prefix(i) + n for n, _ in decoder_layers(model)[i].named_parameters()]


def is_lazy(model) -> bool:
    return getattr(model, "_quantc_source", None) is not None


def materialize(model, i: int) -> None:
    """Read decoder layer i's weights from disk (no-op for an ordinary model or a loaded layer)."""
    if not is_lazy(model):
        return
    layer = decoder_layers(model)[i]
    if not any(p.is_meta for p in layer.parameters()):
        return
    for key in _layer_keys(model, i):
        _set(model, key, model._quantc_source.get(key))


def release(model, i: int) -> None:
    """Give decoder layer i's memory back (the weights stay readable from disk)."""
    if is_lazy(model):
        decoder_layers(model)[i].to("meta")
    trim_heap()


def release_all(model) -> None:
    if is_lazy(model):
        decoder_layers(model).to("meta")
        trim_heap()


def trim_heap() -> None:
    """Return freed heap memory to the OS (glibc). Without it, the layer-sized buffers that every
    layer allocates and frees fragment the heap and the resident size creeps up layer after layer."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def release_outside(model) -> None:
    """After the layer-0 inputs are captured the quantize sweep needs nothing outside the decoder
    layers: embeddings, final norm and lm_head go back to disk too (the exporter reads them again)."""
    if is_lazy(model):
        outside, path = [], family_of(model).layers.split(".")   # everything off the path to the layers
        for depth in range(len(path)):
            parent = model.get_submodule(".".join(path[:depth]))
            outside += [m for n, m in parent.named_children() if n != path[depth]]
        for mod in outside:
            mod.to("meta")


@contextlib.contextmanager
def head_loaded(model):
    """The final norm and lm_head, which release_outside sent back to disk, read again for the
    with-block (the compile's check at the head), then released: the modules get back the very
    parameters they had, so a tied lm_head stays tied to the embeddings. A tied lm_head reads the
    embeddings' tensor (its own key is not in the files). Nothing to do for an ordinary model."""
    if not is_lazy(model):
        yield
        return
    fam = family_of(model)
    src = model._quantc_source
    kept = []
    try:
        for path in (fam.norms.final, fam.head):
            mod = model.get_submodule(path)
            for leaf, p in list(mod._parameters.items()):
                if p is None or not p.is_meta:
                    continue
                key = f"{path}.{leaf}"
                read = key if key in src.index or path != fam.head else fam.embed + ".weight"
                kept.append((mod, leaf, p))
                mod._parameters[leaf] = nn.Parameter(src.get(read), requires_grad=False)
        yield
    finally:
        for mod, leaf, p in kept:
            mod._parameters[leaf] = p
        trim_heap()


def materialize_all(model) -> None:
    for i in range(len(decoder_layers(model))):
        materialize(model, i)


def tensor(model, key: str, state: dict | None = None) -> torch.Tensor:
    """A weight by name: from memory, or from disk when its layer is released (`state`: the model's
    state_dict, when the caller already has it)."""
    v = (state if state is not None else model.state_dict()).get(key)
    if v is not None and not v.is_meta:
        return v.detach()
    if is_lazy(model):
        return model._quantc_source.get(key)
    raise QuantcError(f"no tensor {key} in the model")
