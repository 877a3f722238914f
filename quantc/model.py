"""Model access: load a Hugging Face causal LM, find its decoder layers, linears and units, and
stream calibration activations through it one decoder layer at a time."""
from __future__ import annotations

import contextlib
import hashlib
import json
import weakref
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .distributed import SOLO, World
from .errors import QuantcError
from .family import SUPPORTED_TYPES, check_supported, family_of  # noqa: F401  (re-exported)

log = logging.getLogger("quantc")


class StopForward(Exception):
    """Raised from a hook to end a forward pass once the inputs we need are captured."""


@dataclass(frozen=True)
class Unit:
    """Linears that receive one option together (q/k/v, gate/up, o, down, or single linears)."""
    layer: int
    names: tuple[str, ...]        # full module names, e.g. model.layers.3.self_attn.q_proj

    @property
    def key(self) -> str:
        short = "+".join(n.rsplit(".", 1)[-1].replace("_proj", "") for n in self.names)
        return f"{self.layer}.{short}"


def read_model_type(path: str) -> str | None:
    cfg = Path(path) / "config.json"
    if cfg.is_file():
        try:
            return json.loads(cfg.read_text()).get("model_type")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise QuantcError(f"{cfg}: not valid JSON ({e})") from None
    return None


# What a compile reads of a hub repository besides the weights: config, index and tokenizer files
HUB_SMALL_FILES = ["*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
SAFETENSORS_INDEX = "model.safetensors.index.json"


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder: those its index names where it has one (a repository
    may ship other formats' files beside them, such as Mistral's consolidated.safetensors), else every
    *.safetensors."""
    index = folder / SAFETENSORS_INDEX
    if not index.is_file():
        return sorted(folder.glob("*.safetensors"))
    names = _indexed_files(index)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise QuantcError(f"{index} names {', '.join(missing[:3])}, which {'is' if len(missing) == 1 else 'are'} not in "
                          f"{folder}; copy the whole model folder")
    return [folder / n for n in names]


def _indexed_files(index: Path) -> list[str]:
    """The weight files a safetensors index names."""
    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise QuantcError(f"{index}: not a safetensors index (no weight_map of tensor → file: {e})") from None


def fetch_model(path: str, revision: str | None = None, trust_remote_code: bool = False,
                allow_pickle: bool = False) -> str:
    """The local folder of `path`: a local folder as it is; a hub id's files in the Hugging Face cache,
    downloaded once and read from there after, offline too (HF_HUB_OFFLINE=1). Only what a compile
    reads: the config, index and tokenizer files, then the weight files the index names (or
    model.safetensors; pickled weights only where there are no safetensors and the YAML opts in; the
    model's own code only with trust_remote_code). Every later step reads that folder, so a hub model
    gets what a local one gets: layers streamed one at a time and the memory check first."""
    if Path(path).is_dir():
        return path

    def get(patterns: list[str]) -> Path:
        from huggingface_hub import snapshot_download
        try:
            return Path(snapshot_download(path, revision=revision, allow_patterns=patterns))
        except Exception as e:     # network, authentication, unknown repository or revision: one clear line
            msg = str(e).splitlines()[0] if str(e) else ""
            raise QuantcError(f"{path}: cannot fetch the model from the Hugging Face hub ({type(e).__name__}: "
                              f"{msg}); check the name and model.revision, log in (hf auth login) for a gated "
                              "model, or give a local folder") from None

    folder = get(HUB_SMALL_FILES + (["*.py"] if trust_remote_code else []))
    index = folder / SAFETENSORS_INDEX
    names = _indexed_files(index) if index.is_file() else ["model.safetensors"]
    folder = get(names)
    if not index.is_file() and not (folder / "model.safetensors").is_file():
        folder = get(["*.safetensors"])                 # a single file under another name
        if not any(folder.glob("*.safetensors")) and allow_pickle:
            folder = get([f"*{s}" for s in PICKLE_SUFFIXES])
    missing = [n for n in names if index.is_file() and not (folder / n).is_file()]
    if missing:
        raise QuantcError(f"{path}: the Hugging Face cache ({folder}) lacks {', '.join(missing[:3])}: an interrupted "
                          "or offline download (HF_HUB_OFFLINE); run once with network access")
    return str(folder)


def source_identity(path: str, gguf_file: str | None, revision: str | None, model) -> str:
    """What tells the weights a run reads from others', for the keys of the measurement cache and the
    resume point: the model's config, the GGUF file and revision asked for and the hub commit loaded
    (a hub name's weights move with its revision; config.to_dict() leaves the commit out), and each
    weight file's size and mtime in a local folder (files replaced in place)."""
    h = hashlib.sha256()
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    h.update(f"{gguf_file}:{revision}:{getattr(model.config, '_commit_hash', None)}".encode())
    src = Path(path)
    if src.is_dir():
        for f in sorted(src.iterdir()):
            if f.suffix in (".safetensors", ".bin", ".gguf"):
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    else:
        h.update(path.encode())
    return h.hexdigest()


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_weight_files(path: str, gguf_file: str | None = None, allow_pickle: bool = False) -> None:
    """A local model folder must hold safetensors (or the named GGUF file). Pickled weights (*.bin,
    *.pt) are refused unless the YAML opts in: unpickling a file can run code."""
    folder = Path(path)
    if not folder.is_dir() or gguf_file or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES and f.is_file())
    if not pickles:
        ggufs = sorted(f.name for f in folder.glob("*.gguf"))
        hint = f"; for the GGUF file, set model.gguf_file: {ggufs[0]}" if ggufs else ""
        raise QuantcError(f"{path}: no weight files (*.safetensors) in the model folder{hint}")
    if not allow_pickle:
        raise QuantcError(
            f"{path}: the weights are pickled ({', '.join(pickles[:3])}) and quantc does not unpickle by default "
            "(loading a pickle can run code); convert them to safetensors once, e.g. python -c \"from transformers "
            f"import AutoModelForCausalLM as M; M.from_pretrained('{path}').save_pretrained('{path}-safetensors')\" "
            "(and copy the tokenizer files), or, if you trust the file, opt in with `model: {path: ..., "
            "allow_pickle: true}` (torch's restricted weights-only unpickler)")


def _load_error(path: str, e: Exception) -> QuantcError:
    """One line for a failed from_pretrained, never passing on torch's "weights_only=False" advice."""
    text = str(e)
    if "Weights only load failed" in text or type(e).__name__ == "UnpicklingError":
        detail = next((ln.strip().rstrip(".") for ln in text.splitlines() if "GLOBAL" in ln or "Unsupported" in ln),
                      type(e).__name__)
        return QuantcError(f"{path}: refused the pickled weights: they hold more than tensors ({detail}), and "
                           "loading them could run code; quantc will not load them. Get safetensors weights from "
                           "a source you trust")
    msg = text.splitlines()[0] if text else type(e).__name__
    damaged = any(w in f"{type(e).__name__} {text}".lower()
                  for w in ("safetensor", "incomplete", "truncat", "eof", "unexpected end", "invalid load key",
                            "zip archive", "corrupt", "header"))
    hint = "; the weight files look truncated or corrupt" if damaged else ""
    return QuantcError(f"{path}: cannot load the model ({type(e).__name__}: {msg}){hint}")


def load_model(path: str, gguf_file: str | None = None, trust_remote_code: bool = False,
               revision: str | None = None, dtype=torch.float32, lazy: bool = False, allow_pickle: bool = False):
    """Load a causal LM (local folder or hub id) in float32 on the CPU, in eval mode. With `lazy` (and a
    local safetensors folder) the decoder layers stay on disk until `lazy.materialize` reads them.
    Pickled weights only with `allow_pickle` (and then through torch's weights-only unpickler)."""
    from transformers import AutoModelForCausalLM

    check_supported(read_model_type(path) or _remote_type(path, trust_remote_code), path)
    check_weight_files(path, gguf_file, allow_pickle)
    from .lazy import can_load_lazily, load_lazy
    if lazy and can_load_lazily(path, gguf_file):
        return load_lazy(path, trust_remote_code, dtype)
    kw = dict(dtype=dtype, trust_remote_code=trust_remote_code, revision=revision)
    if gguf_file:
        kw["gguf_file"] = gguf_file
    elif not allow_pickle:
        kw["use_safetensors"] = True          # hub ids too: never fetch and unpickle a .bin
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
    except Exception as e:  # OSError, SafetensorError (truncated file), ValueError...: one clear line
        raise _load_error(path, e) from None
    model.eval()
    model.config.use_cache = False
    check_finite(model, path)
    return model


def load_tokenizer(path: str, gguf_file: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    kw = {"gguf_file": gguf_file} if gguf_file and not (Path(path) / "tokenizer.json").is_file() else {}
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kw)
    except (OSError, ValueError) as e:
        raise QuantcError(f"{path}: cannot load the tokenizer: {e}") from None


def _remote_type(path: str, trust_remote_code: bool) -> str | None:
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).model_type
    except (OSError, ValueError) as e:
        raise QuantcError(f"{path}: cannot read the model config: {e}") from None


def check_finite(model: nn.Module, where: str) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise QuantcError(f"{where}: weight {name} contains NaN or Inf values; the checkpoint is corrupt")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    path = family_of(model).layers
    try:
        layers = model.get_submodule(path)
    except AttributeError:
        layers = None
    if not isinstance(layers, nn.ModuleList):
        raise QuantcError(f"{type(model).__name__}: no decoder layers found at {path}")
    return layers


def layer_prefix(model: nn.Module, i: int) -> str:
    """Full-name prefix of decoder layer i's modules (model.layers.3.)."""
    return family_of(model).prefix(i)


def final_norm(model: nn.Module) -> nn.Module:
    """The norm between the last decoder layer and the lm_head."""
    return model.get_submodule(family_of(model).norms.final)


def output_head(model: nn.Module) -> nn.Linear:
    """The lm_head: the projection from the final norm's output to the logits."""
    return model.get_submodule(family_of(model).head)


def linear_names(model: nn.Module) -> list[str]:
    """Full names of every decoder linear, in execution order (model.layers.3.self_attn.q_proj, ...)."""
    fam = family_of(model)
    return [fam.prefix(i) + n for i, layer in enumerate(decoder_layers(model)) for n in layer_linears(layer)]


def layer_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """Linears of one decoder layer, by their name inside the layer (self_attn.q_proj, ...)."""
    return {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}


def units(model: nn.Module, mode: str = "shared") -> list[Unit]:
    """All units of the decoder, in execution order."""
    out = []
    fam = family_of(model)
    for i, layer in enumerate(decoder_layers(model)):
        names = list(layer_linears(layer))
        prefix = fam.prefix(i)
        if mode == "shared":
            done = set()
            for group in fam.groups:
                members = tuple(n for n in group if n in names)
                if members:
                    out.append(Unit(i, tuple(prefix + n for n in members)))
                    done.update(members)
            rest = [n for n in names if n not in done]
        else:
            rest = names
        out.extend(Unit(i, (prefix + n,)) for n in rest)
    return out


@dataclass(frozen=True)
class Placement:
    """Where layer forwards, Hessians and GPTQ solves run (`resources.device`), and the dtype of the
    layer forwards (`resources.compute_dtype`; Hessians and solves stay float32). Calibration
    activations stay on the device when `acts_on_device`, else in host memory, batch by batch.
    `world`: this process's rank in a distributed run (SOLO in one process)."""
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    acts_on_device: bool = True
    world: World = SOLO

    @property
    def is_default(self) -> bool:
        return self.device.type == "cpu" and self.dtype == torch.float32


CPU = Placement()
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: str, where: str = "resources.device") -> torch.device:
    """`auto` (a GPU when torch sees one), `cpu`, `cuda` or `cuda:N`; a clear error when absent."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise QuantcError(f"{where}: {spec!r} asked for, but this torch build sees no CUDA GPU "
                              f"(torch {torch.__version__}); use device: cpu or install a CUDA build of torch")
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise QuantcError(f"{where}: {spec!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        return dev
    raise QuantcError(f"{where}: unknown device {spec!r}; use auto, cpu, cuda or cuda:N")


@contextlib.contextmanager
def decoder_layer(model: nn.Module, i: int, place: Placement = CPU):
    """Decoder layer i for the with-block: read from disk for lazy models, and on the compute device in
    the compute dtype; afterwards its source tensors are back (CPU, float32) and, for lazy models,
    the layer is released. The one place that loads and releases layers."""
    from .lazy import materialize, release
    materialize(model, i)
    layer = decoder_layers(model)[i]
    source = None
    if not place.is_default:       # the source tensors stay as they are (readers take them, not the copies)
        source = {n: t.data for n, t in [*layer.named_parameters(), *layer.named_buffers()]}
        layer.to(device=place.device, dtype=place.dtype)
        _SOURCES[layer] = source
    try:
        yield layer
    finally:
        if source is not None:
            _SOURCES.pop(layer, None)
            for n, t in [*layer.named_parameters(), *layer.named_buffers()]:
                t.data = source[n]
        release(model, i)


_SOURCES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def source_weight(layer: nn.Module, name: str) -> torch.Tensor:
    """The float32 weight of linear `name` (e.g. self_attn.q_proj) of a layer inside `decoder_layer`, on
    the compute device: the source values, not the compute-dtype copy the forwards use."""
    w = layer.get_submodule(name).weight
    src = _SOURCES.get(layer)
    if src is None:
        return w.data.float()
    return src[f"{name}.weight"].to(w.device, torch.float32)


def keep_in_fp16(name: str, patterns: list[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


# Key of a layer's keyword arguments when the family's layers differ in kind (Gemma 3's sliding-window
# and global layers get different masks and RoPE tables): (kind attribute, {kind: kwargs}).
KINDS = "_quantc_kinds"


def capture_layer0_inputs(model: nn.Module, tokens: torch.Tensor, batch_size: int):
    """Run the embedding and everything before the first decoder layer; return the layer-0
    hidden states [n, seq, hidden] and the keyword arguments (position embeddings, masks) of
    each batch. Stops every forward at the first decoder layer (no other layer runs). For a family
    whose layers differ in kind, each batch's kwargs hold every kind's (`KINDS`), and `run_layer` gives
    a layer its own."""
    if tokens.shape[0] == 0:        # a distributed rank with no batch: it still joins every collective
        dtype = model.get_input_embeddings().weight.dtype
        return torch.empty(0, tokens.shape[1], model.config.hidden_size, dtype=dtype), []
    fam = family_of(model)
    if fam.layer_kind is not None:
        return _capture_by_kind(model, tokens, batch_size, fam.layer_kind)
    layers = decoder_layers(model)
    captured: list = []

    def hook(_mod, args, kwargs):
        hs = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        captured.append((hs.detach(), kwargs))
        raise StopForward

    h = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for b in range(0, tokens.shape[0], batch_size):
                try:
                    model(input_ids=tokens[b:b + batch_size], use_cache=False)
                except StopForward:
                    pass
    finally:
        h.remove()
    hidden = torch.cat([c[0] for c in captured])
    return hidden, [c[1] for c in captured]


def _capture_by_kind(model: nn.Module, tokens: torch.Tensor, batch_size: int, kind_attr: str):
    """As capture_layer0_inputs, for layers of several kinds: the layers up to the first of the last
    kind pass their input through unchanged (nothing is computed), each recording its kwargs."""
    from operator import attrgetter
    layers = decoder_layers(model)
    firsts: dict[str, int] = {}
    for i, layer in enumerate(layers):
        firsts.setdefault(attrgetter(kind_attr)(layer), i)
    last = max(firsts.values())
    hidden, out = [], []

    def recorder(i: int):
        def forward(*args, **kwargs):
            hs = args[0] if args else kwargs.pop("hidden_states")
            kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if i == 0:
                hidden.append(hs.detach())
                out.append({})
            kind = attrgetter(kind_attr)(layers[i])
            out[-1].setdefault(kind, kwargs)
            if i == last:
                raise StopForward
            return hs
        return forward

    for i in range(last + 1):
        layers[i].forward = recorder(i)
    try:
        with torch.no_grad():
            for b in range(0, tokens.shape[0], batch_size):
                try:
                    model(input_ids=tokens[b:b + batch_size], use_cache=False)
                except StopForward:
                    pass
    finally:
        for i in range(last + 1):
            del layers[i].forward
    return torch.cat(hidden), [{KINDS: (kind_attr, by_kind)} for by_kind in out]


def layer_kwargs(layer: nn.Module, kwargs: dict) -> dict:
    """The keyword arguments of `layer` out of a batch's kwargs (its kind's, when kinds differ)."""
    kinds = kwargs.get(KINDS)
    if kinds is None:
        return kwargs
    from operator import attrgetter
    attr, by_kind = kinds
    return by_kind[attrgetter(attr)(layer)]


def run_layer(layer: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(x, **layer_kwargs(layer, kwargs))
    return out[0] if isinstance(out, tuple) else out


def offloaded_empty(like: torch.Tensor, folder: Path) -> torch.Tensor:
    """An uninitialised tensor shaped like `like`, backed by a file in `folder` instead of anonymous
    memory: the kernel can write its pages out and drop them under memory pressure. The file is
    unlinked at once (the mapping keeps it alive), so nothing is left behind after a crash."""
    import uuid
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"acts-{uuid.uuid4().hex}.bin"
    t = torch.from_file(str(path), shared=True, size=like.numel(), dtype=like.dtype)
    path.unlink()
    return t.view(like.shape)


def _to(kwargs: dict, place: Placement) -> dict:
    """A layer's keyword arguments on the compute device (floating tensors in the compute dtype)."""
    def move(v):
        if isinstance(v, torch.Tensor):
            return v.to(place.device, place.dtype if v.is_floating_point() else v.dtype)
        if isinstance(v, tuple):
            return tuple(move(t) for t in v)
        if isinstance(v, dict):         # KINDS: every kind's kwargs
            return {k: move(t) for k, t in v.items()}
        return v
    return {k: move(v) for k, v in kwargs.items()}


class Activations:
    """Hidden states entering one decoder layer, kept in batches with their keyword arguments
    (in memory, or in unlinked files under `offload` when the compile is asked to offload them)."""

    def __init__(self, hidden: torch.Tensor, kwargs: list[dict], batch_size: int, offload: Path | None = None,
                 place: Placement = CPU):
        self.batch_size, self.offload, self.place = batch_size, offload, place
        if not place.is_default:     # stored in the compute dtype, on the device while they fit
            hidden = hidden.to(place.device if place.acts_on_device and offload is None else "cpu", place.dtype)
            kwargs = [_to(kw, place) for kw in kwargs]
        self.hidden, self.kwargs = hidden, kwargs
        if offload is not None and hidden.untyped_storage().filename is None:   # move into a file now
            t = offloaded_empty(hidden, offload)
            t.copy_(hidden)
            self.hidden = t

    def release(self) -> None:
        """Drop the hidden states (their memory, or an offloaded file's pages, go with the last
        reference): for inputs handed over to a sweep that has moved past them."""
        self.hidden = None

    def empty_like(self) -> torch.Tensor:
        return offloaded_empty(self.hidden, self.offload) if self.offload else torch.empty_like(self.hidden)

    def like(self, hidden: torch.Tensor) -> "Activations":
        """Other hidden states with the same batches, kwargs, placement and offload setting."""
        return Activations(hidden, self.kwargs, self.batch_size, self.offload, self.place)

    def batches(self):
        """(hidden states, kwargs) per batch, on the compute device."""
        dev = self.place.device
        for j, b in enumerate(range(0, self.hidden.shape[0], self.batch_size)):
            yield self.hidden[b:b + self.batch_size].to(dev, non_blocking=True), self.kwargs[j]

    @torch.no_grad()
    def through(self, layer: nn.Module) -> "Activations":
        """The outputs of `layer` on these inputs, i.e. the next layer's inputs."""
        out = self.empty_like()
        for j, (x, kw) in enumerate(self.batches()):
            b = j * self.batch_size
            out[b:b + x.shape[0]] = run_layer(layer, x, kw)     # back to where `out` lives
        return self.like(out)
