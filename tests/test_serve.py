"""Serving targets (`serve:`) as plan constraints, and a `dynamic` field that vLLM and GPTQModel read
the same way for every module (replayed with tests/vllm_replay.py)."""
import os
import random

import pytest
import yaml
from click.testing import CliRunner

from quantc.cli import main
from quantc.config import load_config, parse_config
from quantc.errors import ConfigError, QuantcError
from quantc.export.gptq import _fields, quantization_config
from quantc.options import Option
from quantc.pipeline import compile_model
from quantc.serve import RUNTIMES, check

from conftest import write_yaml
from vllm_replay import replay_gptqmodel, replay_vllm

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
D = Option(4, 128, act_order=True, static_groups=True)           # the default (most modules)
E8 = Option(8, 128, act_order=True, static_groups=True)
E8G64 = Option(8, 64, act_order=True, static_groups=True)
A4 = Option(4, 128, act_order=True, static_groups=False)         # differs from D only in desc_act
LOW = Option(2, 32, sym=False)                                   # not servable by vLLM
SKIP = None


def _names(layer: int) -> dict[str, str]:
    p = f"model.layers.{layer}."
    return {**{s: f"{p}self_attn.{s}" for s in ATTN}, **{s: f"{p}mlp.{s}" for s in MLP}}


def mixed_plan(vllm_only: bool, layers: int = 24, seed: int = 0):
    """Module options of a mixed plan with the hard cases: o_proj with the same non-default option as
    q/k/v, down with gate/up, whole sub-modules and single units kept in 16-bit; then random layers."""
    fixed = [
        {"qkv": E8, "o": E8, "gu": D, "down": D},           # o with q/k/v
        {"qkv": D, "o": D, "gu": E8G64, "down": E8G64},     # down with gate/up
        {"qkv": E8, "o": D, "gu": D, "down": E8},           # q/k/v alone, down alone
        {"qkv": SKIP, "o": SKIP, "gu": SKIP, "down": E8},   # whole attention and gate/up skipped
        {"qkv": E8, "o": E8, "gu": E8, "down": E8},         # the whole layer at 8 bits
        {"qkv": D, "o": E8, "gu": E8G64, "down": D},
        {"qkv": A4, "o": A4, "gu": D, "down": SKIP},        # desc_act differs only; down skipped
        {"qkv": D, "o": D, "gu": D, "down": D},
    ]
    pool = [D, D, D, E8, E8G64, A4, SKIP] + ([] if vllm_only else [LOW])
    rng = random.Random(seed)
    options, skipped = {}, []
    for i in range(layers):
        u = fixed[i] if i < len(fixed) else {k: rng.choice(pool) for k in ("qkv", "o", "gu", "down")}
        n = _names(i)
        for unit, members in (("qkv", ("q_proj", "k_proj", "v_proj")), ("o", ("o_proj",)),
                              ("gu", ("gate_proj", "up_proj")), ("down", ("down_proj",))):
            for m in members:
                if u[unit] is None:
                    skipped.append(n[m])
                else:
                    options[n[m]] = u[unit]
    return options, skipped


@pytest.mark.parametrize("vllm_only", [True, False], ids=["vllm-servable", "with-2bit-asym"])
def test_dynamic_replayed_by_vllm_and_gptqmodel_rules(vllm_only):
    options, skipped = mixed_plan(vllm_only)
    qc = quantization_config(options, skipped, 0.01, True)
    assert (qc["bits"], qc["group_size"], qc["desc_act"]) == (4, 128, False)
    expected = {**{n: _fields(o) for n, o in options.items()}, **{n: None for n in skipped}}
    got = replay_vllm(qc, expected, marlin=vllm_only)
    # every linear vLLM builds was asked for and answered: 4 per layer (qkv, o, gate_up, down)
    assert len(got) == 4 * 24 and "model.layers.0.self_attn.qkv_proj" in got
    assert got["model.layers.0.self_attn.qkv_proj"]["bits"] == 8 == got["model.layers.0.self_attn.o_proj"]["bits"]
    mlp1 = "model.layers.1.mlp."
    assert got[mlp1 + "gate_up_proj"]["group_size"] == 64 == got[mlp1 + "down_proj"]["group_size"]
    assert got["model.layers.3.self_attn.qkv_proj"] is None and got["model.layers.3.mlp.gate_up_proj"] is None
    assert got["model.layers.6.self_attn.qkv_proj"]["desc_act"] is True
    if vllm_only:
        assert not check({**options, **{n: None for n in skipped}}, ["vllm"])
    pytest.importorskip("gptqmodel", reason="gptqmodel==7.6.0 is not installed (pip install -e '.[gptq]')")
    replay_gptqmodel(qc, expected)


def test_replay_catches_a_pattern_without_the_fused_name():
    """The replay is not vacuous: the pattern quantc used to write for o_proj with q/k/v fails it."""
    options, skipped = mixed_plan(True, layers=8)
    qc = quantization_config(options, skipped, 0.01, True)
    expected = {**{n: _fields(o) for n, o in options.items()}, **{n: None for n in skipped}}
    old = {k.replace("|o_proj|qkv_proj)", "|o_proj)"): v for k, v in qc["dynamic"].items()}
    assert old != qc["dynamic"]
    with pytest.raises(AssertionError, match="qkv_proj"):
        replay_vllm({**qc, "dynamic": old}, expected)


# ----------------------------------------------------------------------------- the YAML

def _yaml(tmp_path, model, text):
    return write_yaml(tmp_path / "budget.yaml", f"model: {model}\n{text}")


REFUSED = [
    ("serve: [vllm]\nquant: {bits: [2, 4]}\n", "`quant.bits`", "2-bit sym, group 128"),
    ("serve: vllm\nquant: {sym: false}\n", "`quant.sym`", "4-bit asym"),
    ("serve: [vllm]\nquant: {group_size: 256}\n", "`quant.group_size`", "group 256"),
    ("serve: [vllm]\ncandidates: [{bits: 4}, {bits: 3, group_size: 64}]\n", "`candidates[1]`", "3-bit sym, group 64"),
    ("serve: [vllm]\noverrides: [{match: 'layers\\.0\\.', bits: 8}, {match: mlp, bits: 2}]\n",
     "`overrides[1]`", "2-bit"),
    ("serve: [vllm]\nquant: {units: linear}\n", "`quant.units`", "fused"),
    ("serve: [onnx]\nquant: {bits: [3, 4]}\n", "`quant.bits`", "3-bit"),
    ("serve: [onnx, vllm]\nquant: {bits: [4], sym: false}\n", "`quant.sym`", "4-bit asym"),
    ("serve: [gguf]\n", "`quant.group_size`", "4-bit sym, group 128"),
    ("serve: [tensorrt]\n", "`serve`", "'tensorrt' is not a known serving target; allowed: vllm, onnx, gguf"),
    ("serve: {vllm: true}\n", "`serve`", "expected list or str"),
]


@pytest.mark.parametrize("text,key,option", REFUSED)
def test_serve_refuses_what_a_target_cannot_run(tmp_path, tiny_models, text, key, option):
    p = _yaml(tmp_path, tiny_models["llama"], text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: {key}: ") and option in msg, msg
    if key != "`serve`":
        target = "onnx" if "onnx" in text and "3-bit" in option else "gguf" if "gguf" in text else "vllm"
        assert f"cannot be served by {target}" in msg or "fused" in msg, msg
    r = CliRunner().invoke(main, ["compile", str(p), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and "error:" in r.output and not (tmp_path / "out").exists()


def test_serve_accepts_what_targets_run_and_nothing_changes_without_it(tmp_path, tiny_models):
    m = tiny_models["llama"]
    cfg = load_config(_yaml(tmp_path, m, "serve: [vllm]\nquant: {bits: [4, 8], group_size: [32, 128]}\n"
                                         "overrides: [{match: 'layers\\.0\\.mlp', skip: true}]\n"))
    assert cfg.serve == ["vllm"] and len(cfg.candidates) == 4
    cfg = load_config(_yaml(tmp_path, m, "serve: [onnx]\nquant: {bits: [2, 4, 8], sym: false, group_size: 96}\n"))
    assert cfg.serve == ["onnx"] and {o.bits for o in cfg.candidates} == {2, 4, 8}
    cfg = load_config(_yaml(tmp_path, m, "quant: {bits: [2, 3, 4, 8], sym: false, units: linear}\n"))
    assert cfg.serve == [] and len(cfg.candidates) == 4            # no serve: as before
    assert cfg.to_dict()["serve"] == []


def test_runtime_table_is_what_the_docs_say():
    assert RUNTIMES["vllm"].kinds == ((4, True), (8, True)) and RUNTIMES["vllm"].fused
    assert 3 not in {b for b, _ in RUNTIMES["onnx"].kinds}
    assert RUNTIMES["gguf"].kinds == ((4, True), (4, False), (8, True)) and RUNTIMES["gguf"].group_sizes == (32,)


# ----------------------------------------------------------------------------- modules, plan files, allocator

def _raw(model, calib, **extra):
    return {"model": str(model), "quant": {"bits": [4, 8], "group_size": 32},
            "calibration": {"source": str(calib), "samples": 4, "seq_len": 32}, "serve": ["vllm"], **extra}


@pytest.mark.parametrize("extra,module,option", [
    ({"overrides": [{"match": r"layers\.1\.self_attn\.q_proj", "bits": 4}]},     # the default is 8-bit
     "model.layers.1.self_attn.k_proj", "8-bit sym, group 32"),
    ({"keep_fp16": ["lm_head", r"layers\.0\.mlp\.up_proj"]}, "model.layers.0.mlp.up_proj", "16-bit"),
])
def test_split_fused_unit_refused_before_any_work(tmp_path, tiny_models, calib_file, monkeypatch, extra, module,
                                                  option):
    import quantc.calibration as calibration
    monkeypatch.setattr(calibration, "calibration_tokens", lambda *a, **k: pytest.fail("calibrated"))
    cfg = parse_config(_raw(tiny_models["llama"], calib_file, **extra), "b.yaml")
    with pytest.raises(ConfigError) as e:
        compile_model(cfg, tmp_path / "out", progress=False)
    msg = str(e.value)
    assert msg.startswith("b.yaml: `serve`: ") and module in msg and option in msg and "vllm" in msg, msg
    assert "fused" in msg and not (tmp_path / "out").exists()


def test_plan_file_refused_before_the_model_loads(tmp_path, tiny_models, calib_file, monkeypatch):
    import quantc.model as model
    monkeypatch.setattr(model, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"quantc_plan": 1, "units": {
        "0.q+k+v": {"modules": [f"model.layers.0.self_attn.{s}_proj" for s in "qkv"], "bits": 4, "group_size": 32},
        "0.o": {"modules": ["model.layers.0.self_attn.o_proj"], "bits": 2, "group_size": 32, "sym": False}}}))
    cfg = parse_config(_raw(tiny_models["llama"], calib_file), "b.yaml")
    with pytest.raises(ConfigError) as e:
        compile_model(cfg, tmp_path / "out", plan_file=str(plan), progress=False)
    msg = str(e.value)
    assert msg.startswith(f"{plan}: `units.0.o`: ") and "2-bit asym, group 32" in msg and "vllm" in msg, msg
    # a linear-units plan that splits q/k/v is refused too, naming the unit
    plan.write_text(yaml.safe_dump({"units": {
        "0.q": {"modules": ["model.layers.0.self_attn.q_proj"], "bits": 8, "group_size": 32},
        "0.k": {"modules": ["model.layers.0.self_attn.k_proj"], "bits": 4, "group_size": 32}}}, sort_keys=False))
    with pytest.raises(ConfigError, match=r"`units.0.k`: model.layers.0.self_attn.k_proj .*fused"):
        compile_model(cfg, tmp_path / "out", plan_file=str(plan), progress=False)


def test_allocator_offers_only_servable_options(tmp_path, tiny_models, calib_file, monkeypatch):
    from quantc.calibration import calibration_tokens
    from quantc.model import load_model, load_tokenizer
    from quantc.planning import get_measurements, solve
    monkeypatch.setenv("QUANTC_CACHE", str(tmp_path / "cache"))
    raw = {"model": str(tiny_models["llama"]), "quant": {"bits": [2, 4, 8], "group_size": 32},
           "budget": {"avg_bits": 5.5}, "calibration": {"source": str(calib_file), "samples": 6, "seq_len": 32},
           "plan": {"measure_samples": 4, "alpha_samples": 2, "alpha_seq_len": 32, "direct_bits": 0}}
    cfg = parse_config(raw, "b.yaml")
    model = load_model(cfg.model)
    ms, _ = get_measurements(cfg, model, calibration_tokens(cfg.calibration, load_tokenizer(cfg.model), model),
                             progress=False)
    weights = sum(u["weights"] for u in ms.units.values())
    cfg.serve = ["vllm"]            # a Config built in Python skips the YAML check: the allocator still filters
    served = solve(ms, cfg, int(5.5 * weights / 8))
    assert {o.bits for o in served.choices.values()} <= {4, 8}
    assert not check({n: served.choices[k] for k, ns in served.unit_names.items() for n in ns}, ["vllm"])
    all4 = served.predicted["min_bytes"]                            # the smallest servable plan: all 4-bit
    with pytest.raises(QuantcError, match="infeasible"):
        solve(ms, cfg, all4 - 1)
    cfg.serve = []
    free = solve(ms, cfg, all4 - 1)                                 # without serve, 2-bit fits there
    assert 2 in {o.bits for o in free.choices.values()}


def test_plan_command_refuses_a_split_fused_unit(tmp_path, tiny_models, calib_file, monkeypatch):
    import quantc.calibration as calibration
    monkeypatch.setattr(calibration, "calibration_tokens", lambda *a, **k: pytest.fail("calibrated"))
    y = _yaml(tmp_path, tiny_models["qwen3"], f"""serve: [vllm]
budget: {{avg_bits: 6}}
quant: {{bits: [4, 8], group_size: 32}}
overrides: [{{match: 'layers\\.0\\.mlp\\.gate_proj', bits: 4}}]
calibration: {{source: {calib_file}, samples: 4, seq_len: 32}}
""")
    r = CliRunner().invoke(main, ["plan", str(y), "-o", str(tmp_path / "p")])
    assert r.exit_code == 2, r.output
    assert "model.layers.0.mlp.up_proj (8-bit sym, group 32) cannot be served by vllm" in r.output


def test_the_fused_name_is_written_only_for_an_entry_holding_all_its_members():
    """units: linear can give q/k/v (or gate/up) different options. vLLM asks once with the fused name
    and builds every member with the answer, so an entry for q alone must not name qkv_proj (k/v
    would be built at q's width); an entry that holds all members names it."""
    n = _names(0)
    options = {n["q_proj"]: E8, n["k_proj"]: D, n["v_proj"]: D, n["o_proj"]: D,
               n["gate_proj"]: E8, n["up_proj"]: E8, n["down_proj"]: D}
    dyn = quantization_config(options, [], 0.01, True)["dynamic"]
    assert list(dyn) == [r"+:^model\.layers\.0\.self_attn\.q_proj$",
                         r"+:^model\.layers\.0\.mlp\.(gate_proj|up_proj|gate_up_proj)$"]
    options[n["up_proj"]] = D
    dyn = quantization_config(options, [n["down_proj"]], 0.01, True)["dynamic"]
    assert not any("qkv_proj" in k or "gate_up_proj" in k for k in dyn), dyn
    assert r"-:^model\.layers\.0\.mlp\.down_proj$" in dyn
