"""quantc's runtime: load a GPTQ-format checkpoint (quantc's or another tool's, `dynamic`
included) as a transformers model whose quantized linears are QuantLinear modules."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from . import ggml
from .errors import QuantcError
from .kernels import HAVE_TRITON, gptq_matmul
from .packing import dequantize_gptq


class _Packed(nn.Module):
    """What the packed linears share: a dense weight dequantized on demand (kept when `cache` is set),
    and moves and casts that keep the format. `.to(dtype)` / `.half()` / `.to(device)` (nn.Module._apply)
    cast the compute dtype and the bias but not the packed tensors: a float buffer the format stores
    in its own dtype (GPTQ v1's float16 scales, FORMAT_FLOATS) only changes device, since a cast to
    bfloat16 would round every scale. The kept dense weight is dropped, to be dequantized again where
    and as the module now is (before, it stayed on the old device and dtype and the forward failed)."""
    FORMAT_FLOATS: tuple[str, ...] = ()

    @property
    def weight(self) -> torch.Tensor:
        if self._weight is not None:
            return self._weight
        w = self.dequantize()
        if self.cache:
            self._weight = w
        return w

    def _load_from_state_dict(self, *args, **kwargs):
        self._weight = None          # new packed tensors: drop the kept dense weight
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        probe = fn(torch.zeros((), dtype=self.dtype))       # what the move or cast does to a compute-dtype float
        # the format's floats only move, even under a cast to the dtype the module already has (a model
        # loaded in bfloat16 and then given .to("cuda", torch.bfloat16) would round its scales)
        keep = {id(self._buffers[n]) for n in self.FORMAT_FLOATS if self._buffers.get(n) is not None}
        super()._apply(lambda t: t.to(probe.device) if id(t) in keep else fn(t), recurse)
        if probe.is_floating_point():
            self.dtype = probe.dtype
        self._weight = None
        return self


class QuantLinear(_Packed):
    """A linear layer stored in GPTQ v1 format. On the CPU it dequantizes in torch (once, cached,
    when `cache` is set); on CUDA a fused kernel can take over without changing the format."""
    FORMAT_FLOATS = ("scales",)

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool,
                 dtype=torch.float32, cache: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = in_features if group_size <= 0 else group_size
        groups = -(-in_features // self.group_size)
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, out_features * bits // 32, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.arange(in_features, dtype=torch.int32) // self.group_size)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.dtype, self.cache = dtype, cache
        self._weight: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        return dequantize_gptq(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.dtype)

    kernel = "auto"   # "auto": Triton on CUDA tensors, torch dequantize elsewhere; or "torch" / "triton"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_triton = self.kernel == "triton" or (self.kernel == "auto" and x.is_cuda and HAVE_TRITON)
        if use_triton:
            y = gptq_matmul(x, self.qweight, self.qzeros, self.scales, self.g_idx, self.bits)
            return y + self.bias.to(y.dtype) if self.bias is not None else y
        return nn.functional.linear(x.to(self.dtype), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"


class RowBlocks(nn.Module):
    """A linear the checkpoint stores as equal row blocks under other names (Phi-3's gate_up_proj written
    as gate_proj + up_proj, as GPTQModel and vLLM read it): the blocks' outputs, concatenated. The
    blocks are modules of the parent (their own state-dict names); this one holds no tensors."""

    def __init__(self, owner: nn.Module, parts: list[str]):
        super().__init__()
        object.__setattr__(self, "owner", owner)    # not registered: the blocks are the owner's modules
        self.parts = parts                          # looked up at each call: they may be replaced by QuantLinear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.owner.get_submodule(p)(x) for p in self.parts], dim=-1)


def _split_linears(model: nn.Module, tensors: dict) -> None:
    """Give the model the row-block modules its checkpoint holds instead of a fused linear (the family's
    `export_split`); checkpoints that hold the fused linear itself load as they are."""
    from .family import BY_TYPE
    fam = BY_TYPE.get(getattr(model.config, "model_type", None))
    if fam is None or not fam.export_split:
        return
    for i in range(len(model.get_submodule(fam.layers))):
        for fused, parts in fam.export_split.items():
            names = fam.exported(fam.prefix(i) + fused)
            if not any(f"{n}.{k}" in tensors for n in names for k in ("weight", "qweight", "qblocks")):
                continue
            old = model.get_submodule(fam.prefix(i) + fused)
            rows = old.out_features // len(parts)
            for n in names:
                parent, _, leaf = n.rpartition(".")
                setattr(model.get_submodule(parent), leaf, nn.Linear(old.in_features, rows, bias=old.bias is not None,
                                                                     device=old.weight.device, dtype=old.weight.dtype))
            layer = model.get_submodule(fam.prefix(i)[:-1])
            parent, _, leaf = fused.rpartition(".")
            setattr(layer.get_submodule(parent), leaf, RowBlocks(layer, list(parts)))


def module_option(name: str, qc: dict) -> dict | None:
    """bits/group_size/sym/desc_act (and quantc's `grid`) of module `name` under quantization_config
    (None = not quantized), with GPTQModel's `dynamic` semantics: first matching pattern wins; "-:"
    skips the module. `grid` is never inherited: an entry without it is a GPTQ-grid module."""
    base = {k: qc.get(k) for k in ("bits", "group_size", "sym", "desc_act")}
    for pattern, override in (qc.get("dynamic") or {}).items():
        if pattern.startswith("-:"):
            if re.match(pattern[2:], name):
                return None
        elif re.match(pattern.removeprefix("+:"), name):
            return {**base, "grid": "gptq", **override}
    return {**base, "grid": qc.get("grid", "gptq")}


class GGMLLinear(_Packed):
    """A linear stored as llama.cpp blocks (an option on a llama.cpp grid: ggml.py), dequantized in
    torch to the values llama.cpp's (and gguf-py's) dequantization gives; cached when `cache` is set."""

    def __init__(self, in_features: int, out_features: int, qtype: str, bias: bool, dtype=torch.float32,
                 cache: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.qtype = in_features, out_features, qtype
        t = ggml.TYPES[qtype]
        self.register_buffer("qblocks", torch.zeros(out_features, in_features // t.block, t.size, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.dtype, self.cache = dtype, cache
        self._weight: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        return ggml.dequantize_blocks(ggml.TYPES[self.qtype], self.qblocks).to(self.qblocks.device, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.to(self.dtype), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, type={self.qtype}"


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's weight files (those its index names, where it has one: a stray
    .safetensors beside them is not read). A tensor in two files is an error, not the last file's."""
    from .model import weight_files
    files = weight_files(folder)
    if not files:
        raise QuantcError(f"{folder}: no .safetensors file; is this a compiled checkpoint?")
    out, where = {}, {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    if k in where:
                        raise QuantcError(f"{folder}: tensor {k} is in both {where[k]} and {f.name}; remove the "
                                          "file that does not belong to the checkpoint")
                    out[k], where[k] = sf.get_tensor(k), f.name
        except QuantcError:
            raise
        except Exception as e:  # truncated or corrupt file: name it
            raise QuantcError(f"{f}: cannot read safetensors ({e}); the file is truncated or corrupt") from None
    return out


def load(path: str | Path, dtype: torch.dtype = torch.float32, cache: bool = True):
    """Load a GPTQ-format checkpoint folder as a transformers causal LM (eval mode) whose quantized
    linears are QuantLinear."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise QuantcError(f"{folder}: no config.json; pass the folder that `quantc compile` wrote")
    config = AutoConfig.from_pretrained(folder)
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        raise QuantcError(f"{folder}/config.json: no quantization_config; not a quantized checkpoint")
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") != "gptq" or qc.get("checkpoint_format", "gptq") not in ("gptq", None):
        raise QuantcError(f"{folder}: quant_method {qc.get('quant_method')!r} / checkpoint_format "
                          f"{qc.get('checkpoint_format')!r}; quantc reads GPTQ v1 ('gptq') checkpoints")
    del config.quantization_config
    config.use_cache = True
    tensors = read_tensors(folder)

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _split_linears(model, tensors)
    quantized = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    for name in sorted(k[: -len(".qblocks")] for k in tensors if k.endswith(".qblocks")):
        parent, _, leaf = name.rpartition(".")
        old = model.get_submodule(name)
        opt = module_option(name, qc)
        if opt is None or opt["grid"] == "gptq":
            raise QuantcError(f"{folder}: {name} holds llama.cpp blocks but its config entry names no llama.cpp grid")
        t = ggml.type_for(opt["grid"], int(opt["bits"]), bool(opt["sym"]), old.in_features, name)
        setattr(model.get_submodule(parent), leaf,
                GGMLLinear(old.in_features, old.out_features, t.name, old.bias is not None, dtype=dtype, cache=cache))
    for name in quantized:
        parent, _, leaf = name.rpartition(".")
        old = model.get_submodule(name)
        opt = module_option(name, qc)
        if opt is None:
            raise QuantcError(f"{folder}: {name} has packed weights but `dynamic` excludes it")
        ql = QuantLinear(old.in_features, old.out_features, int(opt["bits"]), int(opt["group_size"]),
                         old.bias is not None, dtype=dtype, cache=cache)
        setattr(model.get_submodule(parent), leaf, ql)
    state = {k: (v.to(dtype) if v.is_floating_point() and not k.endswith(".scales") else v)
             for k, v in tensors.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        detail = str(e).split("\n\t", 1)[-1].splitlines()[0]
        raise QuantcError(f"{folder}: checkpoint does not match its config ({detail}); run `quantc verify`") from None
    tied = getattr(config, "tie_word_embeddings", False)
    from .family import BY_TYPE       # a checkpoint of a family quantc does not compile: transformers' name
    head = getattr(BY_TYPE.get(getattr(config, "model_type", None)), "head", "lm_head") + ".weight"
    missing = [k for k in missing if not (tied and k == head)]
    if missing or unexpected:
        raise QuantcError(f"{folder}: checkpoint does not match its config (missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]})")
    if tied:
        model.tie_weights()
    model.eval()
    return model
