"""Model families: what quantc knows about each supported architecture, in one table.

A family says where the decoder layers sit, which linears a layer has (in execution order), which of
them must share one precision (they read one input; vLLM loads some of them as one fused linear),
which names vLLM and the checkpoint fuse, which sub-modules the quantize sweep replays, which norms
sit where (for passes that fold or rotate around them), and the facts the ONNX graph is built from.
Every pass, exporter and the runtime ask this module; none spells a family's module names itself.

Adding a family is one `Family(...)` entry in FAMILIES plus tests (docs/ADDING_A_FAMILY.md).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import QuantcError


@dataclass(frozen=True)
class Norms:
    """The RMSNorms of a decoder layer by role (names inside the layer; None: the family has none).
    `attn_in`/`mlp_in` normalize the residual stream before attention / MLP; `attn_out`/`mlp_out` (Gemma's
    sandwich norms) normalize a block's output before it is added back; `q`/`k` normalize each head
    before RoPE. `final` is the model-level norm before the lm_head. Gemma scales by (1 + weight):
    `offset` 1.0; the others by weight: 0.0."""
    attn_in: str = "input_layernorm"
    mlp_in: str = "post_attention_layernorm"
    attn_out: str | None = None
    mlp_out: str | None = None
    q: str | None = None
    k: str | None = None
    final: str = "model.norm"
    offset: float = 0.0


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    # Linears of one decoder layer (names inside the layer) in execution order, grouped by the input
    # they read: a group shares one Hessian, and in `quant.units: shared` one option.
    groups: tuple[tuple[str, ...], ...]
    layers: str = "model.layers"          # the decoder layers' ModuleList
    embed: str = "model.embed_tokens"
    head: str = "lm_head"                 # the output projection (tied families share the embeddings' tensor)
    # vLLM's fused linears (its packed_modules_mapping): fused name -> the checkpoint linears it loads
    vllm_fused: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # linears fused in the source checkpoint itself: name -> the parts' roles, in row order (Phi-3's qkv_proj:
    # q, k, v). quantc quantizes them as one linear (one unit, one Hessian).
    checkpoint_fused: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # fused linears the GPTQ export writes as equal row blocks under these names (Phi-3's gate_up_proj as
    # gate_proj + up_proj: what GPTQModel's phi3 model builds, and what vLLM stacks back into gate_up_proj)
    export_split: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # the quantize sweep's replay (LayerRunner): the attention sub-module and its output linear, the MLP
    # sub-module, its first (input) linear and its output linear
    attention: str = "self_attn"
    attn_out: str = "self_attn.o_proj"
    mlp: str = "mlp"
    mlp_in: str = "mlp.gate_proj"
    mlp_out: str = "mlp.down_proj"
    norms: Norms = Norms()
    # layers differ in their attention (Gemma 3: sliding-window and global layers): the attribute (inside
    # the layer) naming a layer's kind, whose masks and RoPE tables the model passes it. None: one kind.
    layer_kind: str | None = None
    # the kinds whose attention sees only the last config.sliding_window keys (a query at i: keys j > i - window)
    windowed: tuple[str, ...] = ()
    # --- facts the ONNX graph is built from (quantc/export/onnx.py): the attention's q/k/v and the MLP's
    # gate/up linears as separate modules (a checkpoint may instead hold the checkpoint_fused linear)
    q_k_v: tuple[str, str, str] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    gate_up: tuple[str, str] = ("mlp.gate_proj", "mlp.up_proj")
    activation: str = "silu"              # silu(gate)·up, or gelu_tanh(gate)·up
    embed_scale: bool = False             # embeddings × sqrt(hidden_size) (Gemma)
    onnx: bool = True                     # the ONNX exporter writes this family's graph
    # llama.cpp's architecture name by model_type (quantc/export/gguf.py); a type left out: no GGUF export
    gguf: dict[str, str] = field(default_factory=dict)

    def linears(self) -> tuple[str, ...]:
        return tuple(n for g in self.groups for n in g)

    def parts(self, name: str) -> int:
        """How many linears the GPTQ export writes compiled module `name` as (its bytes count each one's
        g_idx, scales and zeros: Option.bytes_for)."""
        return len(self.exported(name))

    def vllm_in_block(self) -> tuple[str, ...] | None:
        """A decoder layer's linears under the names vLLM builds them with, where the GPTQ export writes
        other names (export_split: Phi-3's gate_up_proj as gate_proj + up_proj), else None. vLLM decides
        whether a linear is quantized by finding an entry of `modules_in_block_to_quantize` inside its
        name, and without that field it lists the quantized tensors' modules: for Phi-3 (whose packed
        mapping is gate_up_proj -> [gate_up_proj]) none of those is inside `mlp.gate_up_proj`, so the
        layer would be built unquantized and its GPTQ tensors fail to load."""
        return self.linears() if self.export_split else None

    def prefix(self, i: int) -> str:
        """Full-name prefix of decoder layer i's modules: model.layers.3."""
        return f"{self.layers}.{i}."

    def exported(self, name: str) -> tuple[str, ...]:
        """The checkpoint names the GPTQ export writes compiled module `name` (a full name) under."""
        m = re.match(re.escape(self.layers) + r"\.\d+\.(.+)$", name)
        if m is None or m.group(1) not in self.export_split:
            return (name,)
        base = name[: len(name) - len(m.group(1))]
        return tuple(base + part for part in self.export_split[m.group(1)])

    def embed_multiplier(self, config) -> float | None:
        """What the embeddings are multiplied by (Gemma: sqrt(hidden_size), a float32 scalar), or None."""
        return config.hidden_size ** 0.5 if self.embed_scale else None

    def rotation_facts(self) -> dict | None:
        """What a Hadamard rotation (quantc/rotate.py) folds, or None when it cannot: a family with
        sandwich norms or (1 + w) norms (Gemma) or linears fused in the checkpoint (Phi-3) would need
        more than folding the two pre-norms. Norm → the linears reading its output; the linears writing
        the residual; the value and output projections that R2 rotates per head."""
        n = self.norms
        if n.attn_out or n.mlp_out or n.offset or self.checkpoint_fused:
            return None
        return {"layers": self.layers + ".", "embed": self.embed + ".weight", "final_norm": n.final + ".weight",
                "head": self.head + ".weight",
                "norms": {n.attn_in: self.q_k_v, n.mlp_in: self.gate_up},
                "writers": (self.attn_out, self.mlp_out), "value": self.q_k_v[2], "output": self.attn_out}

    def fused_of(self) -> dict[str, tuple[tuple[str, ...], str]]:
        """Leaf name of a linear vLLM fuses -> (the fused linear's member leaves, the fused leaf)."""
        out = {}
        for fused, members in self.vllm_fused.items():
            leaves = tuple(m.rpartition(".")[2] for m in members)
            out.update({leaf: (leaves, fused.rpartition(".")[2]) for leaf in leaves})
        return out


_LLAMA_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                 ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
_LLAMA_FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama", "mistral", "qwen2"), _LLAMA_GROUPS, vllm_fused=_LLAMA_FUSED,
           gguf={"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}),
    Family("qwen3", ("qwen3",), _LLAMA_GROUPS, vllm_fused=_LLAMA_FUSED,
           norms=Norms(q="self_attn.q_norm", k="self_attn.k_norm"), gguf={"qwen3": "qwen3"}),
    # Gemma 3 text (Gemma3ForCausalLM): sandwich norms around both blocks, (1 + w) norms, q/k norms,
    # embeddings scaled by sqrt(hidden), GELU-tanh MLP, sliding-window and global attention layers.
    Family("gemma3", ("gemma3_text",), _LLAMA_GROUPS, vllm_fused=_LLAMA_FUSED,
           norms=Norms(attn_in="input_layernorm", attn_out="post_attention_layernorm",
                       mlp_in="pre_feedforward_layernorm", mlp_out="post_feedforward_layernorm",
                       q="self_attn.q_norm", k="self_attn.k_norm", offset=1.0),
           layer_kind="self_attn.layer_type", windowed=("sliding_attention",), activation="gelu_tanh",
           embed_scale=True),
    # Phi-3: q/k/v and gate/up are single linears in the checkpoint, and vLLM loads them as they are
    Family("phi3", ("phi3",), (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",),
                               ("mlp.down_proj",)),
           checkpoint_fused={"self_attn.qkv_proj": ("q", "k", "v"), "mlp.gate_up_proj": ("gate", "up")},
           export_split={"mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")},
           mlp_in="mlp.gate_up_proj"),
)

BY_TYPE: dict[str, Family] = {t: f for f in FAMILIES for t in f.model_types}
SUPPORTED_TYPES: tuple[str, ...] = tuple(BY_TYPE)
# vLLM's fused linears of every family, by member leaf: the serving check and the `dynamic` writer name
# both the members and the fused linear (no two families give one leaf different fused names)
FUSED_OF: dict[str, tuple[tuple[str, ...], str]] = {k: v for f in FAMILIES for k, v in f.fused_of().items()}


def rope_settings(config: dict) -> list[dict]:
    """The RoPE settings of a config (config.json as a dict): one dict, or one per layer kind where the
    kinds differ (Gemma 3), from `rope_parameters` (transformers 5) over `rope_scaling` (older files).
    Each names its kind by `rope_kind`."""
    params, scaling = config.get("rope_parameters") or {}, config.get("rope_scaling") or {}
    flat = {**scaling, **params}
    if "rope_type" in flat or "type" in flat or not any(isinstance(v, dict) for v in flat.values()):
        return [flat]
    return [v for v in flat.values() if isinstance(v, dict)]


def rope_kind(settings: dict) -> str:
    """A RoPE's kind ("default", "linear", "dynamic", "longrope", ...), from one `rope_settings` entry."""
    return settings.get("rope_type") or settings.get("type") or "default"


def check_supported(model_type: str | None, where: str) -> None:
    if model_type not in BY_TYPE:
        raise QuantcError(f"{where}: model_type {model_type!r} is not supported; quantc supports "
                          f"{', '.join(SUPPORTED_TYPES)}")


def family_for(model_type: str | None, where: str = "config.json") -> Family:
    check_supported(model_type, where)
    return BY_TYPE[model_type]


def family_of(model) -> Family:
    """The family of a loaded transformers model (by its config's model_type)."""
    return family_for(getattr(model.config, "model_type", None), type(model).__name__)
