"""quant.rotate: hadamard (quantc/rotate.py): Hadamard matrices, the rotated float model's logits, and
a compile whose artifact is a plain GPTQ checkpoint of the rotated model."""
import json

import pytest
import torch
from click.testing import CliRunner

import quantc
from quantc.cli import main
from quantc.errors import ConfigError, QuantcError
from quantc.rotate import RandomHadamard, hadamard, hadamard_factors, rotate_layer, rotate_model, rotation_for

from conftest import write_yaml

# the sizes quantc meets: tiny test models, head dims, SmolLM2 (576, 960), Qwen2.5 (896, 1536, 3584)
SIZES = (12, 16, 20, 28, 36, 48, 60, 64, 128, 576, 896, 960, 1536, 3584)


@pytest.mark.parametrize("n", SIZES)
def test_hadamard_matrices_are_orthogonal(n):
    h = hadamard(n)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    r = RandomHadamard(n, seed=3)
    m = r.matrix
    assert torch.allclose(m @ m.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    w = torch.randn(5, n, dtype=torch.float64)
    assert torch.allclose(r.right(w), w @ m, atol=1e-12)           # the Kronecker path is the matrix
    assert torch.allclose(r.left_t(w.T), m.T @ w.T, atol=1e-12)


def test_the_benchmark_models_sizes_factor_as_documented():
    assert hadamard_factors(576) == (36, 16)        # SmolLM2-135M: Paley II (q = 17) ⊗ Sylvester 16
    assert hadamard_factors(896) == (28, 32)        # Qwen2.5-0.5B: Paley II (q = 13) ⊗ Sylvester 32


@pytest.mark.parametrize("n", (100, 18, 6))
def test_unknown_sizes_are_refused_by_name(n):
    with pytest.raises(QuantcError, match=rf"order {n} .*quant.rotate: none"):
        hadamard(n)


def test_seeds_give_different_rotations():
    assert not torch.equal(RandomHadamard(48, 0).matrix, RandomHadamard(48, 1).matrix)
    assert torch.equal(RandomHadamard(48, 5).matrix, RandomHadamard(48, 5).matrix)


def build(kind: str, folder, tied: bool, tokenizer=None, hidden: int = 48, head_dim: int = 12):
    """A tiny model whose hidden size (48 = 12·4) and head_dim (12) are not powers of 2, GQA (4 q heads,
    2 kv heads), random norm weights (so folding them matters), biases where the family has them."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[kind]
    vocab = len(tokenizer) if tokenizer is not None else 100
    cfg = cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=128, tie_word_embeddings=tied,
              bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.1)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return model


CASES = [("llama", True), ("llama", False), ("qwen2", False), ("qwen2", True), ("qwen3", False)]


@pytest.mark.parametrize("kind,tied", CASES)
@pytest.mark.parametrize("lazy", [False, True])
def test_rotated_float_model_has_the_same_logits(tmp_path, kind, tied, lazy):
    from quantc.lazy import is_lazy, materialize_all
    from quantc.model import load_model
    ref = build(kind, tmp_path, tied)
    assert ref.config.tie_word_embeddings == tied
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(1))
    model = load_model(str(tmp_path), lazy=lazy)
    assert is_lazy(model) == lazy
    rot = rotate_model(model, seed=0)
    materialize_all(model)
    with torch.no_grad():
        want, got = ref(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), float((got - want).abs().max())
    # the weights did change: the residual is rotated, norms are folded (weight 1), the head is untied
    assert not torch.allclose(model.model.embed_tokens.weight, ref.model.embed_tokens.weight, atol=1e-3)
    assert torch.equal(model.model.norm.weight, torch.ones(48))
    assert torch.equal(model.model.layers[1].input_layernorm.weight, torch.ones(48))
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False and rot.tied == tied
    with pytest.raises(QuantcError, match="rotated already"):
        rotate_model(model, seed=0)


def test_rotate_layer_is_a_pure_function_of_the_layer(tmp_path):
    ref = build("qwen2", tmp_path, False)
    rot = rotation_for(ref.config, seed=0)
    tensors = {n: p.detach().clone() for n, p in ref.model.layers[0].named_parameters()}
    before = {n: t.clone() for n, t in tensors.items()}
    a, b = rotate_layer(tensors, rot), rotate_layer(tensors, rot)
    assert all(torch.equal(tensors[n], before[n]) for n in tensors)       # inputs untouched
    assert all(torch.equal(a[n], b[n]) for n in a)                         # same output each time
    # what the rotation does, tensor by tensor: readers W·diag(g)·R1, writers R1ᵀ·W (bias too), v/o per head
    r1 = rot.r1.matrix.float()
    g = before["input_layernorm.weight"]
    assert torch.allclose(a["self_attn.q_proj.weight"], (before["self_attn.q_proj.weight"] * g) @ r1, atol=1e-5)
    assert torch.equal(a["self_attn.q_proj.bias"], before["self_attn.q_proj.bias"])   # q/k outputs not rotated
    r2 = rot.r2.matrix.float()
    v = (before["self_attn.v_proj.weight"] * g) @ r1
    want_v = torch.cat([r2.T @ v[h * 12:(h + 1) * 12] for h in range(2)])
    assert torch.allclose(a["self_attn.v_proj.weight"], want_v, atol=1e-5)
    bv = before["self_attn.v_proj.bias"]
    assert torch.allclose(a["self_attn.v_proj.bias"], torch.cat([r2.T @ bv[h * 12:(h + 1) * 12] for h in range(2)]),
                          atol=1e-6)
    o = r1.T @ before["self_attn.o_proj.weight"]
    want_o = torch.cat([o[:, h * 12:(h + 1) * 12] @ r2 for h in range(4)], dim=1)
    assert torch.allclose(a["self_attn.o_proj.weight"], want_o, atol=1e-5)
    assert torch.allclose(a["mlp.down_proj.weight"], r1.T @ before["mlp.down_proj.weight"], atol=1e-5)


def test_a_model_family_without_facts_or_a_size_without_hadamard_is_refused(tmp_path):
    from types import SimpleNamespace
    from transformers import LlamaConfig
    cfg = LlamaConfig(hidden_size=100, num_attention_heads=5, head_dim=20)
    with pytest.raises(QuantcError, match=r"order 100 \(hidden_size\)"):
        rotation_for(cfg, 0)
    with pytest.raises(QuantcError, match="model_type 'gemma'"):
        rotation_for(SimpleNamespace(model_type="gemma", hidden_size=64, num_attention_heads=4), 0)


# ------------------------------------------------------------------ config

def test_config_rotate_keys(tmp_path, tiny_models):
    from quantc.config import parse_config
    base = {"model": str(tiny_models["llama"])}
    assert parse_config(base).rotate == "none"
    cfg = parse_config({**base, "quant": {"rotate": "hadamard", "rotate_seed": 7}})
    assert (cfg.rotate, cfg.rotate_seed) == ("hadamard", 7)
    assert cfg.to_dict()["rotate"] == "hadamard"
    with pytest.raises(ConfigError, match=r"quant.rotate.*'spin'.*allowed: none, hadamard"):
        parse_config({**base, "quant": {"rotate": "spin"}}, "b.yaml")
    with pytest.raises(ConfigError, match=r"quant.rotate_seed.*no effect"):
        parse_config({**base, "quant": {"rotate_seed": 1}}, "b.yaml")


def test_preflight_refuses_a_size_without_hadamard(tmp_path, tiny_tokenizer, calib_file):
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=40, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=10)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    y = write_yaml(tmp_path / "b.yaml", f"model: {tmp_path / 'm'}\nquant: {{rotate: hadamard}}\n"
                                        f"calibration: {{source: {calib_file}, samples: 4, seq_len: 32}}\n")
    r = CliRunner().invoke(main, ["-q", "compile", str(y), "-o", str(tmp_path / "out")])
    # 40 = 20·2 has one (Paley I, q = 19); head_dim 10 has none
    assert r.exit_code == 2 and "b.yaml: `quant.rotate`: no Hadamard matrix of order 10 (head_dim)" in r.output, r.output
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ the compile

def compile_cli(y, out):
    r = CliRunner().invoke(main, ["-q", "compile", str(y), "-o", str(out)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    return json.loads((out / "quantc.json").read_text())


def rotated_yaml(tmp_path, model, calib_file, name, quant="", rest=""):
    return write_yaml(tmp_path / f"{name}.yaml", f"""model: {model}
quant: {{bits: 4, group_size: 32{quant}}}
calibration: {{source: {calib_file}, samples: 8, seq_len: 64, batch_size: 4}}
{rest}""")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, tiny_tokenizer, calib_file):
    """A tiny tied llama (GQA, hidden 96 = 12·8: packing needs multiples of 32) compiled with and without
    rotation, and lazily or not."""
    tmp = tmp_path_factory.mktemp("rot")
    build("llama", tmp / "model", True, tiny_tokenizer, hidden=96, head_dim=32)
    out = {}
    rotated = ", rotate: hadamard, rotate_seed: 3"
    for name, quant, rest in (("rot", rotated, ""), ("plain", "", ""),
                              ("rot-eager", rotated, "resources: {lazy_load: false}\n")):
        y = rotated_yaml(tmp, tmp / "model", calib_file, name, quant, rest)
        out[name] = (tmp / name, compile_cli(y, tmp / name), y)
    return tmp, out


def test_rotated_artifact_loads_and_matches_the_fake_quantized_rotated_model(compiled):
    from quantc.calibration import calibration_tokens
    from quantc.config import load_config
    from quantc.model import Activations, capture_layer0_inputs, load_model, load_tokenizer
    from quantc.passes.quantize import quantize_gptq
    from quantc.pipeline import resolve_options
    tmp, runs = compiled
    folder, manifest, y = runs["rot"]
    cfg = load_config(y)
    # the same compile by hand, on the whole model in memory: rotate, then GPTQ in place (fake-quantized)
    model = load_model(cfg.model)
    rotate_model(model, cfg.rotate_seed)
    tokens = calibration_tokens(cfg.calibration, load_tokenizer(cfg.model))
    options, _ = resolve_options(model, cfg)
    hidden, kw = capture_layer0_inputs(model, tokens, cfg.calibration.batch_size)
    quantize_gptq(model, Activations(hidden, kw, cfg.calibration.batch_size), options, damp=cfg.damp,
                  qep_alpha=cfg.qep_alpha, progress=False)
    q = quantc.load(folder, dtype=torch.float32)
    ref = load_model(cfg.model)
    ids = tokens[:2, :48]
    with torch.no_grad():
        lq, lf, lr = q(input_ids=ids).logits, model(input_ids=ids).logits, ref(input_ids=ids).logits
    to_fake = float((lq - lf).norm() / lf.norm())
    to_float = float((lf - lr).norm() / lr.norm())
    assert to_float > 0.01                          # quantized: not the float model
    assert to_fake < 0.05 * to_float, (to_fake, to_float)   # the artifact is that fake-quantized model (16-bit rest)
    assert manifest["rotation"]["kind"] == "hadamard" and manifest["rotation"]["r1"] == "96 = 12×8"
    assert manifest["rotation"]["untied_lm_head_bytes"] == 96 * len(load_tokenizer(cfg.model)) * 2


def test_rotated_artifact_is_a_plain_checkpoint(compiled):
    """No online operation: the rotated artifact has the plain artifact's tensors and config (plus the
    untied lm_head), and loads into the same modules with no hooks."""
    from safetensors import safe_open
    tmp, runs = compiled
    rot, plain = runs["rot"][0], runs["plain"][0]
    keys = {}
    for name, f in (("rot", rot), ("plain", plain)):
        with safe_open(str(f / "model.safetensors"), framework="pt") as sf:
            keys[name] = set(sf.keys())
            if name == "rot":
                norm = sf.get_tensor("model.layers.0.input_layernorm.weight")
    assert keys["rot"] == keys["plain"] | {"lm_head.weight"}
    assert torch.equal(norm.float(), torch.ones(96))
    c_rot, c_plain = (json.loads((f / "config.json").read_text()) for f in (rot, plain))
    assert c_plain["tie_word_embeddings"] is True and c_rot["tie_word_embeddings"] is False
    c_rot.pop("tie_word_embeddings"), c_plain.pop("tie_word_embeddings")
    assert c_rot == c_plain
    a, b = quantc.load(rot), quantc.load(plain)
    assert [(n, type(m).__name__) for n, m in a.named_modules()] == [(n, type(m).__name__) for n, m in b.named_modules()]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in a.modules())
    assert a.lm_head.weight.data_ptr() != a.model.embed_tokens.weight.data_ptr()


def test_lazy_and_whole_model_rotation_give_the_same_artifact(compiled):
    tmp, runs = compiled
    a, b = runs["rot"][1], runs["rot-eager"][1]
    assert a["files"]["model.safetensors"] == b["files"]["model.safetensors"]


def test_budget_compile_with_rotation_and_the_wide_set(compiled, calib_file, tmp_path, monkeypatch):
    """Sweep 1 measures the rotated model (its own cache entry), the plan uses the wide set, and the
    artifact's bytes are the plan's."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("QUANTC_CACHE", str(cache))
    base, _ = compiled
    outs = {}
    for name, rotate in (("plain", ""), ("rot", "\n  rotate: hadamard")):
        y = write_yaml(tmp_path / f"{name}.yaml", f"""model: {base / 'model'}
candidates: wide
quant:
  act_order: false{rotate}
budget: {{avg_bits: 6}}
calibration: {{source: {calib_file}, samples: 8, seq_len: 64, batch_size: 4}}
plan: {{measure_samples: 4, alpha_samples: 2, alpha_seq_len: 32}}
""")
        outs[name] = compile_cli(y, tmp_path / name)
    assert len(list(cache.rglob("*.json"))) == 2                   # the rotation is part of the measurement key
    m = outs["rot"]
    assert m["rotation"]["kind"] == "hadamard" and outs["plain"]["rotation"] is None
    import yaml
    from benchmarks.bench_gptq import linear_bytes
    plans = {k: yaml.safe_load((tmp_path / k / "plan.yaml").read_text())["predicted"] for k in outs}
    # the budget pays for the lm_head the rotation unties from the tied embeddings (16-bit)
    head = m["rotation"]["untied_lm_head_bytes"]
    assert head > 0 and plans["rot"]["untied_head_bytes"] == head and plans["plain"]["untied_head_bytes"] == 0
    assert plans["rot"]["budget_bytes"] == plans["plain"]["budget_bytes"]
    assert m["totals"]["quantized_linear_bytes"] + head == plans["rot"]["bytes"] <= plans["rot"]["budget_bytes"]
    assert m["totals"]["quantized_linear_bytes"] == linear_bytes(tmp_path / "rot")
    assert outs["plain"]["totals"]["quantized_linear_bytes"] == plans["plain"]["bytes"] == linear_bytes(tmp_path / "plain")
    assert m["totals"]["avg_bits"] < outs["plain"]["totals"]["avg_bits"] <= 6     # fewer bytes left for the linears


def test_a_budget_the_untied_head_does_not_fit_is_refused_naming_the_rotation(compiled, calib_file, tmp_path):
    """A budget the plain model fits but the rotated one cannot (its untied lm_head counts) is refused
    before any work, naming the budget key, the head's bytes and the fix."""
    from quantc.config import parse_config
    from quantc.planning import check_budget, shape_units, size_bounds
    from quantc.preflight import skeleton
    from quantc.rotate import untied_head_bytes
    base, _ = compiled
    raw = {"model": str(base / "model"), "quant": {"bits": [2, 4], "group_size": 32, "rotate": "hadamard"}}
    cfg = parse_config(raw)
    sk = skeleton(cfg)
    units, head = shape_units(sk, cfg), untied_head_bytes(sk, cfg)
    plain = parse_config({**raw, "quant": {"bits": [2, 4], "group_size": 32}})
    assert untied_head_bytes(sk, plain) == 0
    assert head == sk.config.vocab_size * sk.config.hidden_size * 2
    lo = size_bounds(units, cfg)["min"]
    assert size_bounds(units, cfg, head)["min"] == lo + head
    check_budget(units, plain, lo)                                   # fits without the rotation
    y = write_yaml(tmp_path / "b.yaml", f"model: {base / 'model'}\nquant: {{bits: [2, 4], group_size: 32, "
                                        f"rotate: hadamard}}\nbudget: {{memory: {lo + head - 1}}}\n"
                                        f"calibration: {{source: {calib_file}, samples: 8, seq_len: 64}}\n")
    r = CliRunner().invoke(main, ["-q", "compile", str(y), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    assert "b.yaml: `budget.memory`: the budget of" in r.output and "infeasible" in r.output
    assert f"{head:,} bytes of it the lm_head that quant.rotate unties" in r.output
    assert "set quant.rotate: none (the lm_head it unties takes" in r.output
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError):
        check_budget(units, cfg, lo + head - 1, head=head)
    check_budget(units, cfg, lo + head, head=head)


def test_inspect_reports_the_rotation_and_the_untied_head(compiled):
    _, runs = compiled
    r = CliRunner().invoke(main, ["inspect", str(runs["rot"][0])])
    assert r.exit_code == 0, r.output
    assert "rotation: hadamard (seed 3, R1 96 = 12×8, R2 32)" in r.output and "untied lm_head" in r.output
    r = CliRunner().invoke(main, ["inspect", str(runs["plain"][0])])
    assert r.exit_code == 0 and "rotation" not in r.output


def test_verify_compares_the_rotated_artifact_with_the_unrotated_source(compiled):
    _, runs = compiled
    r = CliRunner().invoke(main, ["verify", "--strict", str(runs["rot"][0])])
    assert r.exit_code == 0, r.output
    assert "logits" in r.output


def test_rotated_wide_plan_loads_in_gptqmodel_and_onnxruntime(compiled, calib_file, tmp_path, monkeypatch):
    """A rotated plan over the wide set (asymmetric, g32/g64/g128, several bit widths) with its untied
    head is a checkpoint the other runtimes load as is: GPTQModel (torch backend, fp16) and ONNX
    Runtime (MatMulNBits) give quantc.load's logits. GPTQModel refuses a v1 checkpoint whose top-level
    `sym` is false unless it wrote it, so the top level takes a symmetric option whenever a module has
    one (here o_proj of layer 0, pinned; the plan gives most modules asymmetric options)."""
    gptqmodel = pytest.importorskip("gptqmodel", reason="gptqmodel==7.6.0 is not installed")
    import numpy as np
    from quantc.ort import OrtModel
    monkeypatch.setenv("QUANTC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", "2")
    base, _ = compiled
    y = write_yaml(tmp_path / "b.yaml", f"""model: {base / 'model'}
candidates: wide
serve: [onnx]
quant: {{rotate: hadamard, act_order: false}}
overrides: [{{match: 'layers\\.0\\.self_attn\\.o_proj', bits: 4, group_size: 32}}]
budget: {{avg_bits: 6}}
calibration: {{source: {calib_file}, samples: 8, seq_len: 64, batch_size: 4}}
plan: {{measure_samples: 4, alpha_samples: 2, alpha_seq_len: 32}}
export: {{targets: [gptq, onnx]}}
""")
    out = tmp_path / "out"
    m = compile_cli(y, out)
    assert m["rotation"]["untied_lm_head_bytes"] > 0
    opts = {(o["bits"], o["group_size"], o["sym"]) for o in m["modules"].values()}
    assert len(opts) > 1                                              # a mixed plan, not one option
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc["sym"] is True and sum(not o["sym"] for o in m["modules"].values()) > len(m["modules"]) // 2
    q = quantc.load(out, dtype=torch.float32)
    ids = torch.randint(0, q.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lq = q(input_ids=ids).logits
        g = gptqmodel.GPTQModel.load(str(out), backend=gptqmodel.BACKEND.TORCH, device="cpu", dtype=torch.float16)
        lg = g.model(input_ids=ids).logits.float()
    assert float((lg - lq).norm() / lq.norm()) < 0.01                  # fp16 against fp32: rounding only
    lo, _ = OrtModel(out, providers=["CPUExecutionProvider"]).forward(ids.numpy())
    assert np.linalg.norm(lo - lq.numpy()) / np.linalg.norm(lq.numpy()) < 1e-4
