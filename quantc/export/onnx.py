"""ONNX export: a decoder graph for ONNX Runtime, built node by node from a checkpoint folder (quantc's
GPTQ artifact, any GPTQ v1 checkpoint, or an unquantized HF folder), from the facts its family declares
(quantc/family.py: norms and their places, fused linears, activation, embedding scale, layer kinds).

Every GPTQ-packed linear becomes one `com.microsoft::MatMulNBits` node carrying the checkpoint's own
integers, scales and zero points (nothing is re-quantized):
- 2-, 4- and 8-bit weights are stored natively; 3-bit weights sit in a 4-bit container, each code
  shifted by 8 − its zero point so that the default zero point serves (exact; only the storage grows,
  and no zero-point input: the same kernel path as symmetric 4-bit);
- block size = group size, or the largest power of two of 16…256 that divides it (scales repeat);
- act-order (a g_idx that is not i // group_size) is undone by reordering K at export and gathering
  the activations in the same order, never through MatMulNBits' g_idx (wrong with packed zeros);
- zero points are packed uint8, and left out when they all equal ONNX Runtime's default 2^(bits-1).
Unquantized linears are plain MatMul on float32 weights, so the same builder gives the fp32 baseline.

One graph serves prefill and decode, in ONNX Runtime GenAI's layout: inputs `input_ids`,
`attention_mask`, `position_ids` and `past_key_values.{i}.key/value` [batch, kv_heads, past, head_dim]
(past = 0 for a prefill), outputs `logits` and `present.{i}.key/value`. Attention is written with
standard ops (GQA by broadcasting, no copy of K/V per head), so any CPU or GPU provider runs it.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import QuantcError
from ..family import BY_TYPE, FAMILIES, rope_kind, rope_settings
from ..staging import cleans_up_output, finalize_output, prepare_output
from ..packing import unpack_cols, unpack_rows

log = logging.getLogger("quantc")

SUPPORTED = tuple(t for f in FAMILIES if f.onnx for t in f.model_types)
OPSET = 21
NEG = float(np.finfo(np.float32).min)


class GraphBuilder:
    """Nodes and initializers of one graph; every op returns its output name(s)."""

    def __init__(self):
        self.nodes, self.inits, self.count = [], [], 0

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", name: str | None = None,
           **attrs):
        from onnx import helper
        self.count += 1
        base = name or f"{op_type.lower()}_{self.count}"
        outs = [f"{base}_out{k}" if n_out > 1 else base for k in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"n_{base}", domain=domain or None, **attrs))
        return outs if n_out > 1 else outs[0]

    def const(self, name: str, value) -> str:
        from onnx import numpy_helper
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def ints(self, name: str, values) -> str:
        return self.const(name, np.asarray(values, dtype=np.int64))


# ----------------------------------------------------------------------------- GPTQ → MatMulNBits

def _pack_low_first(v: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis of small integers into bytes, lowest bits first (ONNX Runtime's order)."""
    per = 8 // bits
    pad = (-v.shape[-1]) % per
    if pad:
        v = np.concatenate([v, np.zeros(v.shape[:-1] + (pad,), v.dtype)], -1)
    v = v.astype(np.uint8).reshape(v.shape[:-1] + (-1, per))
    out = np.zeros(v.shape[:-1], np.uint8)
    for j in range(per):
        out |= v[..., j] << (bits * j)
    return out


MAX_BLOCK = 256     # ONNX Runtime's MatMulNBits kernels handle blocks of 16…256: it refuses a 2-bit node
#                     with a wider block at load, and MLAS's fast paths stop at 256


def block_size_for(group_size: int) -> int:
    """MatMulNBits needs a power-of-two block of 16…256: the largest one dividing the group size (a
    wider group is several blocks with the same scale and zero point)."""
    b = 1
    while group_size % (b * 2) == 0 and b * 2 <= min(group_size, MAX_BLOCK):
        b *= 2
    if b < 16:
        raise QuantcError(f"group size {group_size} has no power-of-two block ≥ 16 dividing it; "
                          "ONNX Runtime's MatMulNBits cannot represent it")
    return b


def matmulnbits_tensors(qweight, qzeros, scales, g_idx, bits: int, group_size: int, widen_2bit: bool = False) -> dict:
    """GPTQ v1 tensors → MatMulNBits inputs: B [N, k_blocks, blob] uint8, scales [N, k_blocks] f32,
    zero_points packed uint8 (or None), the K permutation for act-order (or None), attributes."""
    K, N = qweight.shape[0] * 32 // bits, qweight.shape[1]
    q = unpack_rows(qweight, bits).numpy()                    # [K, N]
    zeros = (unpack_cols(qzeros, bits) + 1).numpy()           # [G, N], v1 stores zero - 1
    g = g_idx.long().numpy()
    G = scales.shape[0]
    gs = K if group_size <= 0 else group_size                  # the last group may be partial (K % gs)
    perm = None
    if not np.array_equal(g, np.arange(K) // gs):             # act-order: make groups contiguous
        perm = np.argsort(g, kind="stable")
        g = g[perm]
        q = q[perm]
        if not np.array_equal(g, np.arange(K) // gs):
            raise QuantcError(f"g_idx does not split K={K} into groups of {gs}; cannot reorder for MatMulNBits")
    block = block_size_for(gs)
    cbits = 4 if bits == 3 or (bits == 2 and widen_2bit) else bits   # 3-bit (and, asked, 2-bit) in 4-bit
    if cbits != bits:
        # shift every code by 8 - zero: (q - z)·s = (q - z + 8 - 8)·s, and q - z + 8 lies in [1, 14], so
        # the container's default zero point 8 serves every group: no zero-point input, the fast path
        q = q - zeros[g] + 8
        zeros = np.full_like(zeros, 8)
    k_blocks = -(-K // block)
    qt = q.T                                                  # [N, K]
    if k_blocks * block != K:
        qt = np.concatenate([qt, np.zeros((N, k_blocks * block - K), qt.dtype)], 1)
    B = _pack_low_first(qt.reshape(N, k_blocks, block), cbits)
    grp = np.minimum(np.arange(k_blocks) * block // gs, G - 1)
    s = scales.float().numpy()[grp].T.astype(np.float32)      # [N, k_blocks], fp16 values exactly
    z = zeros[grp].T                                          # [N, k_blocks]
    zp = None if np.all(z == 2 ** (cbits - 1)) else _pack_low_first(z, cbits).reshape(-1)
    return {"B": B, "scales": np.ascontiguousarray(s), "zero_points": zp, "perm": perm,
            "attrs": {"K": K, "N": N, "bits": cbits, "block_size": block}, "container": cbits != bits}


# ----------------------------------------------------------------------------- the graph

def static_rope_limit(config: dict) -> int | None:
    """The longest sequence for which fixed cos/sin tables equal transformers' rotary embedding, or
    None when they do at any length. transformers recomputes `dynamic` (NTK) frequencies once a call's
    positions pass the original context, and `longrope` switches from its short to its long factors
    there, for every position of that call (modeling_rope_utils.dynamic_rope_update): a table built
    for longer sequences would rotate a short prompt by the long factors."""
    limits = []
    for s in rope_settings(config):
        kind = rope_kind(s)
        if "dynamic" in kind:
            limits.append(int(config["max_position_embeddings"]))
        elif kind == "longrope":
            limits.append(int(s.get("original_max_position_embeddings")
                              or config.get("original_max_position_embeddings")
                              or config["max_position_embeddings"]))
    return min(limits) if limits else None


class _Export:
    def __init__(self, folder: Path, accuracy_level: int = 0, max_length: int | None = None, widen_2bit: bool = False):
        from transformers import AutoConfig
        self.folder = folder
        cfg = json.loads((folder / "config.json").read_text())
        self.model_type = cfg.get("model_type")
        if self.model_type not in SUPPORTED:
            raise QuantcError(f"{folder}/config.json: model_type {self.model_type!r} is not supported by the ONNX "
                              f"exporter; supported: {', '.join(SUPPORTED)}")
        self.fam = BY_TYPE[self.model_type]
        self.qc = cfg.get("quantization_config") or {}
        cfg.pop("quantization_config", None)
        self.config = AutoConfig.for_model(**cfg)
        c = self.config
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads or c.num_attention_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // self.heads
        self.layers = c.num_hidden_layers
        self.max_length = int(max_length or min(getattr(c, "max_position_embeddings", 4096), 8192))
        exact = static_rope_limit(c.to_dict())
        if exact is not None and self.max_length > exact:
            if max_length:
                raise QuantcError(f"{folder}/config.json: its RoPE changes its frequencies with the sequence length "
                                  f"past {exact} tokens, and the ONNX graph holds fixed cos/sin tables, which match "
                                  f"the model up to {exact} only: pass --max-length {exact} or less")
            log.info("ONNX: max_length %d (the RoPE's frequencies change with the length past it)", exact)
            self.max_length = exact
        if getattr(c, "attn_logit_softcapping", None):
            raise QuantcError(f"{folder}/config.json: attn_logit_softcapping is set; the ONNX exporter does not "
                              "write attention soft-capping")
        self.accuracy_level, self.widen_2bit = accuracy_level, widen_2bit
        from ..runtime import read_tensors
        self.t = read_tensors(folder)
        blocks = sorted(k for k in self.t if k.endswith(".qblocks"))
        if blocks:          # options on a llama.cpp grid (grid: k / ggml): MatMulNBits has no such blocks
            raise QuantcError(f"{folder}: {blocks[0].removesuffix('.qblocks')} (and {len(blocks) - 1} more) hold "
                              "llama.cpp blocks (grid: k / ggml), which ONNX Runtime cannot run; export them with "
                              "`quantc export gguf`, or compile with GPTQ options (grid: gptq) for ONNX")
        self.g = GraphBuilder()
        self.perms: dict[bytes, str] = {}
        self.splits: dict[str, str] = {}
        self.report = {"matmulnbits": {}, "matmul": [], "container_4bit": []}

    def tensor(self, name: str) -> np.ndarray:
        if name not in self.t:
            raise QuantcError(f"{self.folder}: tensor {name} is missing from the checkpoint")
        return self.t[name].float().numpy()

    # --- building blocks
    def linear(self, x: str, name: str) -> str:
        g, t = self.g, self.t
        if f"{name}.qweight" in t:
            from ..runtime import module_option
            opt = module_option(name, self.qc)
            if opt is None:
                raise QuantcError(f"{self.folder}: {name} has packed weights but `dynamic` excludes it")
            m = matmulnbits_tensors(t[f"{name}.qweight"], t[f"{name}.qzeros"], t[f"{name}.scales"],
                                    t[f"{name}.g_idx"], int(opt["bits"]), int(opt["group_size"]), self.widen_2bit)
            if m["perm"] is not None:       # act-order: gather the activations in the reordered K
                key = m["perm"].tobytes()
                if key not in self.perms:
                    self.perms[key] = g.const(f"{name}.perm", m["perm"].astype(np.int64))
                x = g.op("Gather", [x, self.perms[key]], axis=-1)
            inputs = [x, g.const(f"{name}.B", m["B"]), g.const(f"{name}.scales", m["scales"])]
            if m["zero_points"] is not None:
                inputs.append(g.const(f"{name}.zero_points", m["zero_points"]))
            y = g.op("MatMulNBits", inputs, domain="com.microsoft", name=name.replace(".", "_"),
                     accuracy_level=self.accuracy_level, **m["attrs"])
            self.report["matmulnbits"][name] = {"bits": int(opt["bits"]), **m["attrs"], "act_order": m["perm"] is not None}
            if m["container"]:
                self.report["container_4bit"].append(name)
        else:
            w = self.tensor(f"{name}.weight")
            y = g.op("MatMul", [x, g.const(f"{name}.weight_t", w.T.astype(np.float32))], name=name.replace(".", "_"))
            self.report["matmul"].append(name)
        if f"{name}.bias" in t:
            y = g.op("Add", [y, g.const(f"{name}.bias", self.tensor(f"{name}.bias"))])
        return y

    def rmsnorm(self, x: str, weight: str) -> str:
        """RMSNorm scaled by weight (+ the family's offset: Gemma's 1 + w, added in float32 as Gemma does)."""
        g = self.g
        var = g.op("ReduceMean", [g.op("Mul", [x, x]), self.axis_last], keepdims=1)
        inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [var, self.eps])])])
        w = self.tensor(weight)
        if self.fam.norms.offset:
            w = np.float32(self.fam.norms.offset) + w.astype(np.float32)
        return g.op("Mul", [g.op("Mul", [x, inv]), g.const(weight, w)])

    def has(self, name: str) -> bool:
        return f"{name}.weight" in self.t or f"{name}.qweight" in self.t

    def linears(self, x: str, p: str, fused: str, parts: tuple[str, ...], sizes: list[int], then=None) -> list[str]:
        """The outputs of linears `parts` (inside layer prefix p), or, when the checkpoint holds them as
        the one linear `fused` (Phi-3's qkv_proj, an unsplit gate_up_proj), its output split by `sizes`;
        each passed through `then[k]` when given."""
        then = then or [lambda y: y] * len(parts)
        if fused and self.has(p + fused):
            key = f"split_{'_'.join(map(str, sizes))}"
            if key not in self.splits:
                self.splits[key] = self.g.ints(key, sizes)
            ys = self.g.op("Split", [self.linear(x, p + fused), self.splits[key]], n_out=len(sizes), axis=-1)
            return [f(y) for f, y in zip(then, ys)]
        return [f(self.linear(x, p + n)) for f, n in zip(then, parts)]

    def rope(self, x: str, cos: str, sin: str) -> str:
        """x·cos + rotate_half(x)·sin on [B, heads, S, D]."""
        g = self.g
        x1, x2 = g.op("Split", [x, self.halves], n_out=2, axis=-1)
        rot = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
        return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rot, sin])])

    def rope_tables(self, kind: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """cos/sin for positions 0..max_length-1 from transformers' own rotary module (rope scaling
        included; of layer kind `kind` where kinds differ), so the graph matches the PyTorch model exactly."""
        import importlib
        module = self.config.__class__.__module__.rsplit(".", 1)[0] + ".modeling_" + \
            self.config.__class__.__module__.rsplit(".configuration_", 1)[1]
        mod = importlib.import_module(module)
        cls = next(getattr(mod, n) for n in dir(mod) if n.endswith("RotaryEmbedding"))
        rot = cls(config=self.config)
        pos = torch.arange(self.max_length)[None]
        args = () if kind is None else (kind,)
        cos, sin = rot(torch.zeros(1, dtype=torch.float32), pos, *args)
        if cos.shape[-1] != self.head_dim:
            raise QuantcError(f"{self.folder}/config.json: partial rotary embeddings ({cos.shape[-1]} of "
                              f"{self.head_dim} dims); the ONNX exporter rotates whole heads only")
        return cos[0].float().numpy(), sin[0].float().numpy()

    def layer_kinds(self) -> list[str | None]:
        """Each layer's kind (Gemma 3: sliding_attention / full_attention), None where the family has one."""
        if self.fam.layer_kind is None:
            return [None] * self.layers
        return list(self.config.layer_types[: self.layers])

    def build(self, with_past: bool = True):
        from onnx import TensorProto, helper
        g, c = self.g, self.config
        H, nH, kvH, D = c.hidden_size, self.heads, self.kv_heads, self.head_dim
        rep = nH // kvH
        self.axis_last = g.ints("axis_last", [-1])
        self.halves = g.ints("rope_halves", [D // 2, D // 2])
        self.eps = g.const("rms_eps", np.array(c.rms_norm_eps, np.float32))
        ids, mask, pos = "input_ids", "attention_mask", "position_ids"
        inputs = [helper.make_tensor_value_info(ids, TensorProto.INT64, ["batch", "seq"]),
                  helper.make_tensor_value_info(mask, TensorProto.INT64, ["batch", "total"]),
                  helper.make_tensor_value_info(pos, TensorProto.INT64, ["batch", "seq"])]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", c.vocab_size])]

        kinds = self.layer_kinds()
        unsq1 = g.ints("axis_1", [1])
        ropes = {}
        for kind in dict.fromkeys(kinds):
            cos_t, sin_t = self.rope_tables(kind)
            sfx = "" if kind is None else f"_{kind}"
            ropes[kind] = tuple(g.op("Unsqueeze", [g.op("Gather", [g.const(f"rope_{n}{sfx}", t), pos]), unsq1])
                                for n, t in (("cos", cos_t), ("sin", sin_t)))                  # [B,1,S,D]

        fam = self.fam
        embed_name = f"{fam.embed}.weight"
        embed = g.const(embed_name, self.tensor(embed_name))
        h = g.op("Gather", [embed, ids])                                                     # [B,S,H]
        scale_embed = fam.embed_multiplier(c)
        if scale_embed is not None:      # Gemma: × sqrt(hidden), a float32 scalar as the model holds it
            h = g.op("Mul", [h, g.const("embed_scale", np.array(scale_embed, np.float32))])

        # additive mask [B,1,1,S,T]: key j visible to query i (at position past+i) if j ≤ past+i and unpadded
        shape_ids = g.op("Shape", [ids])
        one = g.ints("one", 1)
        seq = g.op("Gather", [shape_ids, one])
        total = g.op("Gather", [g.op("Shape", [mask]), one])
        past_len = g.op("Sub", [total, seq])
        q_pos = g.op("Range", [past_len, total, one])
        k_pos = g.op("Range", [g.ints("zero", 0), total, one])
        causal = g.op("LessOrEqual", [g.op("Unsqueeze", [k_pos, g.ints("axis_0", [0])]),
                                      g.op("Unsqueeze", [q_pos, unsq1])])                    # [S,T]
        pad = g.op("Cast", [g.op("Unsqueeze", [mask, g.ints("axes_123", [1, 2, 3])])], to=TensorProto.BOOL)
        allowed = g.op("And", [causal, pad])                                                 # [B,1,1,S,T]
        zero_f, neg = g.const("zero_f", np.array(0, np.float32)), g.const("neg", np.array(NEG, np.float32))
        biases = {}
        for kind in dict.fromkeys(kinds):
            if kind in self.fam.windowed:     # and key j within the window of query i: i - j < sliding_window
                dist = g.op("Sub", [g.op("Unsqueeze", [q_pos, unsq1]),
                                    g.op("Unsqueeze", [k_pos, g.ints("axis_0b", [0])])])           # [S,T]
                near = g.op("Less", [dist, g.ints("window", c.sliding_window)])
                biases[kind] = g.op("Where", [g.op("And", [allowed, near]), zero_f, neg])
            else:
                biases[kind] = g.op("Where", [allowed, zero_f, neg])

        scale = g.const("attn_scale", np.array(getattr(c, "query_pre_attn_scalar", None) or D, np.float32) ** -0.5)
        shape_q = g.ints("shape_q", [0, 0, nH, D])
        shape_kv = g.ints("shape_kv", [0, 0, kvH, D])
        shape_g = g.ints("shape_group", [0, kvH, rep, -1, D])          # [B,kvH,rep,S,D]
        # attention's output, o_proj's input: heads × head_dim wide, which is not hidden on Qwen3, Gemma 3
        # and any model with an explicit head_dim
        shape_h = g.ints("shape_attn_out", [0, 0, nH * D])
        shape_o = g.ints("shape_heads", [0, nH, -1, D])
        unsq2 = g.ints("axis_2", [2])
        nm = fam.norms
        qkv_fused = next((n for n, roles in fam.checkpoint_fused.items() if roles == ("q", "k", "v")), "")
        gu_fused = next((n for n, roles in fam.checkpoint_fused.items() if roles == ("gate", "up")), "")
        for i, kind in enumerate(kinds):
            p = fam.prefix(i)
            cos, sin = ropes[kind]
            bias = biases[kind]
            x = self.rmsnorm(h, p + nm.attn_in + ".weight")
            heads = [lambda y: g.op("Reshape", [y, shape_q])] + [lambda y: g.op("Reshape", [y, shape_kv])] * 2
            q, k, v = self.linears(x, p, qkv_fused, fam.q_k_v, [nH * D, kvH * D, kvH * D], heads)
            if nm.q and f"{p}{nm.q}.weight" in self.t:            # Qwen3, Gemma 3: RMSNorm per head before RoPE
                q = self.rmsnorm(q, f"{p}{nm.q}.weight")
                k = self.rmsnorm(k, f"{p}{nm.k}.weight")
            q = self.rope(g.op("Transpose", [q], perm=[0, 2, 1, 3]), cos, sin)           # [B,nH,S,D]
            k = self.rope(g.op("Transpose", [k], perm=[0, 2, 1, 3]), cos, sin)           # [B,kvH,S,D]
            v = g.op("Transpose", [v], perm=[0, 2, 1, 3])
            if with_past:
                names = (f"past_key_values.{i}.key", f"past_key_values.{i}.value")
                for n in names:
                    inputs.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", kvH, "past", D]))
                k = g.op("Concat", [names[0], k], axis=2, name=f"present.{i}.key")
                v = g.op("Concat", [names[1], v], axis=2, name=f"present.{i}.value")
                for n in (k, v):
                    outputs.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", kvH, "total", D]))
            # GQA without copies: queries grouped per KV head, K/V broadcast over the group
            qg = g.op("Reshape", [q, shape_g])
            kg, vg = g.op("Unsqueeze", [k, unsq2]), g.op("Unsqueeze", [v, unsq2])            # [B,kvH,1,T,D]
            scores = g.op("MatMul", [g.op("Mul", [qg, scale]), g.op("Transpose", [kg], perm=[0, 1, 2, 4, 3])])
            probs = g.op("Softmax", [g.op("Add", [scores, bias])], axis=-1)
            o = g.op("Reshape", [g.op("MatMul", [probs, vg]), shape_o])                      # [B,nH,S,D]
            o = g.op("Reshape", [g.op("Transpose", [o], perm=[0, 2, 1, 3]), shape_h])
            o = self.linear(o, p + fam.attn_out)
            if nm.attn_out:                                        # Gemma's sandwich norm
                o = self.rmsnorm(o, p + nm.attn_out + ".weight")
            h = g.op("Add", [h, o])
            x = self.rmsnorm(h, p + nm.mlp_in + ".weight")
            gate, up = self.linears(x, p, gu_fused, fam.gate_up, [c.intermediate_size] * 2)
            if fam.activation == "gelu_tanh":
                act = g.op("Gelu", [gate], approximate="tanh")
            else:
                act = g.op("Mul", [gate, g.op("Sigmoid", [gate])])                             # SiLU
            y = self.linear(g.op("Mul", [act, up]), p + fam.mlp_out)
            if nm.mlp_out:
                y = self.rmsnorm(y, p + nm.mlp_out + ".weight")
            h = g.op("Add", [h, y])
        h = self.rmsnorm(h, nm.final + ".weight")
        head = self.fam.head
        if head + ".weight" in self.t or head + ".qweight" in self.t:
            logits = self.linear(h, head)
        else:  # tied: Gemm with transB reuses the embedding matrix instead of storing its transpose
            flat = g.op("Reshape", [h, g.ints("shape_2d", [-1, H])])
            logits2d = g.op("Gemm", [flat, embed], transB=1)
            logits = g.op("Reshape", [logits2d, g.op("Concat", [g.op("Shape", [ids]), g.ints("vocab", [c.vocab_size])], axis=0)])
        cap = getattr(c, "final_logit_softcapping", None)
        if cap:                                  # logits = cap · tanh(logits / cap)
            capc = g.const("logit_cap", np.array(cap, np.float32))
            logits = g.op("Mul", [g.op("Tanh", [g.op("Div", [logits, capc])]), capc])
        g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="n_logits"))
        graph = helper.make_graph(g.nodes, "quantc", inputs, outputs, g.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                       helper.make_opsetid("com.microsoft", 1)],
                                 producer_name="quantc")


def _genai_config(e: _Export, tok_folder: Path) -> dict:
    """ONNX Runtime GenAI's genai_config.json for this graph (decoder with past/present)."""
    c = e.config
    gen = {}
    gp = tok_folder / "generation_config.json"
    if gp.is_file():
        gen = json.loads(gp.read_text())
    eos = gen.get("eos_token_id", c.eos_token_id)
    return {"model": {
        "bos_token_id": gen.get("bos_token_id", c.bos_token_id), "context_length": e.max_length,
        "decoder": {"session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                    "filename": "model.onnx", "head_size": e.head_dim, "hidden_size": c.hidden_size,
                    "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                               "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                               "past_value_names": "past_key_values.%d.value"},
                    "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                                "present_value_names": "present.%d.value"},
                    "num_attention_heads": e.heads, "num_hidden_layers": e.layers,
                    "num_key_value_heads": e.kv_heads},
        "eos_token_id": eos, "pad_token_id": gen.get("pad_token_id", c.pad_token_id if c.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)),
        "type": e.model_type, "vocab_size": c.vocab_size},
        "search": {"do_sample": False, "early_stopping": True, "max_length": e.max_length, "min_length": 0,
                   "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": False,
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0}}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "config.json")


@cleans_up_output
def export_onnx(src: str | Path, out: str | Path, *, accuracy_level: int = 0, max_length: int | None = None,
                force: bool = False, widen_2bit: bool = False) -> dict:
    """Write `out/` (model.onnx + model.onnx.data, genai_config.json, tokenizer files, onnx_export.json)
    from the checkpoint folder `src`; atomically (a temporary folder renamed into place)."""
    try:
        import onnx
    except ImportError:
        raise QuantcError("ONNX export needs the `onnx` package: pip install 'quantc[onnx]'") from None
    src, out = Path(src), Path(out)
    if not (src / "config.json").is_file():
        raise QuantcError(f"{src}: no config.json; pass a folder written by `quantc compile` (or an HF model folder)")
    tmp = prepare_output(out, force, marker="onnx_export.json")   # checked and locked before the build
    e = _Export(src, accuracy_level, max_length, widen_2bit)
    model = e.build()
    onnx.save_model(model, str(tmp / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copy(src / f, tmp / f)
    (tmp / "genai_config.json").write_text(json.dumps(_genai_config(e, src), indent=2))
    info = {"source": str(src), "opset": OPSET, "accuracy_level": accuracy_level, "max_length": e.max_length,
            "num_hidden_layers": e.layers, "num_key_value_heads": e.kv_heads, "head_dim": e.head_dim,
            "vocab_size": e.config.vocab_size,
            "matmulnbits": e.report["matmulnbits"], "matmul": e.report["matmul"],
            "container_4bit": e.report["container_4bit"],
            "widen_2bit": widen_2bit,
            "notes": ["3-bit layers (and 2-bit ones with widen_2bit) are stored in a 4-bit MatMulNBits container "
                      "(exact values, 4-bit storage)"] if e.report["container_4bit"] else []}
    (tmp / "onnx_export.json").write_text(json.dumps(info, indent=2))
    finalize_output(tmp, out)
    n3 = len(e.report["container_4bit"])
    log.info("ONNX: %d MatMulNBits, %d MatMul%s → %s", len(e.report["matmulnbits"]), len(e.report["matmul"]),
             f", {n3} 3-bit linears in a 4-bit container" if n3 else "", out)
    return info
