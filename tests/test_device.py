"""resources.device / resources.compute_dtype: the placement paths, tested on the CPU (a GPU run uses
the same code with another torch.device)."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import quantc
from quantc.cli import main
from quantc.config import parse_config
from quantc.errors import ConfigError
from quantc.pipeline import compile_model

from conftest import write_yaml


def raw(model, calib, **res):
    return {"model": str(model), "quant": {"bits": [2, 4], "group_size": 32},
            "calibration": {"source": str(calib), "samples": 8, "seq_len": 64, "batch_size": 4},
            "resources": res}


def logits(folder, ids):
    with torch.no_grad():
        return quantc.load(folder)(input_ids=ids).logits


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_forwards_give_a_close_artifact(tmp_path, tiny_models, calib_file, dtype):
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    from transformers import AutoModelForCausalLM
    with torch.no_grad():
        f = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"])(input_ids=ids).logits

    def error(name, qep, **res):
        r = raw(tiny_models["qwen2"], calib_file, device="cpu", **res)
        r["quant"]["qep_alpha"] = qep
        m = compile_model(parse_config(r), tmp_path / name, progress=False)
        assert m["config"]["resources"]["compute_dtype"] == res.get("compute_dtype", "float32")
        a = logits(tmp_path / name, ids)
        assert a.dtype == torch.float32
        return float((a - f).norm() / f.norm())

    err_ref, err_low = error("fp32", 0.0), error(dtype, 0.0, compute_dtype=dtype)
    assert err_low < 1.1 * err_ref                        # Hessians and solves stay float32: as good a fit
    # with error propagation (the default) the two streams' difference carries the forwards' rounding
    # too, so its gain shrinks in low precision, and whether any is left depends on the CPU's low-precision
    # kernels: in bfloat16, 0.261 against plain 0.273 on an AVX2 CPU, 0.275 against 0.273 on one with
    # native AVX-512 bf16 (fp32: 0.229). What must hold on any CPU: QEP does not make the fit worse beyond
    # that rounding, and in float32 it helps (test_gptq::test_qep_target_reduces_propagated_error)
    assert error(f"{dtype}-qep", 0.5, compute_dtype=dtype) < 1.05 * err_low


def test_budgeted_compile_in_bfloat16_plans_and_restores_layers(tmp_path, tiny_models, calib_file, monkeypatch):
    monkeypatch.setenv("QUANTC_CACHE", str(tmp_path / "cache"))
    r = raw(tiny_models["llama"], calib_file, device="cpu", compute_dtype="bfloat16", lazy_load=False)
    r["budget"] = {"avg_bits": 3.2}
    r["plan"] = {"measure_samples": 4, "alpha_samples": 2, "alpha_seq_len": 32}
    m = compile_model(parse_config(r), tmp_path / "out", progress=False)
    assert {o["bits"] for o in m["modules"].values()} == {2, 4}


def test_unavailable_device_is_a_clear_error(tmp_path, tiny_models, calib_file):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    y = write_yaml(tmp_path / "b.yaml", f"model: {tiny_models['llama']}\nresources: {{device: 'cuda:0'}}\n"
                                        f"calibration: {{source: {calib_file}, samples: 4, seq_len: 32}}\n")
    r = CliRunner().invoke(main, ["compile", str(y), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert "resources.device" in r.output and "no CUDA" in r.output and "device: cpu" in r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("section, key, value", [
    ("resources", "device", "gpu"), ("resources", "device", "cuda:x"), ("resources", "compute_dtype", "int8"),
    ("plan", "predictor", "magic"), ("plan", "probes", 0)])
def test_bad_placement_and_predictor_keys(section, key, value):
    with pytest.raises(ConfigError, match=f"{section}.{key}"):
        parse_config({"model": "org/model", section: {key: value}}, "b.yaml")


@pytest.mark.parametrize("qep", [0.0, 0.5])
def test_activations_go_to_the_gpu_only_when_every_stream_fits(tiny_models, calib_file, monkeypatch, qep):
    """On a GPU, the calibration activations stay on the device only when every stream sweep 2 holds
    fits in half the free memory: x̂ and (QEP) x in/out, the cached attention/MLP inputs and QEP's
    reference input of every group. Counting the in/out streams alone put them on a device that then
    ran out of memory."""
    from transformers import AutoConfig
    from types import SimpleNamespace
    from quantc import pipeline
    cfg = parse_config({**raw(str(tiny_models["llama"]), calib_file), "quant": {"qep_alpha": qep}}, "t")
    mc = AutoConfig.from_pretrained(tiny_models["llama"])
    model = SimpleNamespace(config=mc)
    monkeypatch.setattr(pipeline, "resolve_device", lambda spec: torch.device("cuda", 0))
    inout = cfg.calibration.samples * cfg.calibration.seq_len * mc.hidden_size * 4 * (4 if qep else 2)
    for free, fits in ((2.2 * inout, False), (20 * inout, True)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev, free=free: (int(free), int(4 * free)))
        assert pipeline.placement(cfg, model).acts_on_device is fits, (free, fits)


def test_ranks_agree_on_where_the_activations_live(tiny_models, calib_file, monkeypatch):
    """Under torchrun every rank must keep its activations in the same place (their collectives meet
    in one backend): a rank whose GPU has room follows a rank whose GPU has none."""
    from transformers import AutoConfig
    from types import SimpleNamespace
    from quantc import distributed, pipeline
    cfg = parse_config(raw(str(tiny_models["llama"]), calib_file), "t")
    model = SimpleNamespace(config=AutoConfig.from_pretrained(tiny_models["llama"]))
    monkeypatch.setattr(pipeline, "resolve_device", lambda spec: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev: (2**40, 2**41))      # this rank: room
    monkeypatch.setattr(distributed, "join", lambda device: distributed.World(0, 2, 0))
    others = {"full": 1, "room": 0}
    for other, fits in others.items():        # the other rank's vote, added by the all-reduce
        monkeypatch.setattr(distributed.World, "all_reduce", lambda self, t, n=fits: t.add_(n))
        assert pipeline.placement(cfg, model).acts_on_device is (other == "room")


def test_self_calibration_samples_on_the_gpu_only_when_the_model_fits(tiny_models, monkeypatch, caplog):
    """calibration.source: self samples on a GPU compile's device when the whole model, the KV cache
    and the logits fit in its free memory, else on the CPU with a warning that names the fix (the CUDA
    memory query is stubbed: no GPU here)."""
    from transformers import AutoModelForCausalLM
    from quantc.calibration import data
    from quantc.config import Calibration
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    cal = Calibration(source="self", samples=4, seq_len=32)
    cuda = torch.device("cuda")
    assert data.sampling_device(model, torch.device("cpu"), cal).type == "cpu"
    assert data.sampling_device(model, None, cal).type == "cpu"
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (weights + (2 << 30), 80 << 30))
    assert data.sampling_device(model, cuda, cal) == cuda
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (weights, 80 << 30))     # no room for the rest
    with caplog.at_level("WARNING", logger="quantc"):
        assert data.sampling_device(model, cuda, cal).type == "cpu"
    assert "sampling on the CPU" in caplog.text and "calibration.source" in caplog.text


def test_self_calibration_is_sampled_where_the_compile_runs_and_once(tmp_path, tiny_models, monkeypatch):
    """The compile hands its device to the sampling (here the CPU, the only device): the tokens are
    those of sampling the model directly, with the model back on the CPU afterwards. They are kept
    beside the measurement cache: a run again (a resume, whose keys hash the tokens) gets the same
    tokens without sampling, whichever device sampled them; another seed samples anew."""
    from quantc.calibration import data
    monkeypatch.setenv("QUANTC_CACHE", str(tmp_path / "cache"))
    seen = []
    real = data.sampling_device
    monkeypatch.setattr(data, "sampling_device", lambda m, d, c: seen.append(d) or real(m, d, c))
    r = {"model": str(tiny_models["llama"]), "quant": {"bits": 4, "group_size": 32, "qep_alpha": 0.0},
         "calibration": {"source": "self", "samples": 2, "seq_len": 16, "batch_size": 2},
         "resources": {"device": "cpu"}}
    from quantc.pipeline import calibrate
    from quantc.distributed import SOLO
    from quantc.model import load_model, load_tokenizer
    cfg = parse_config(r)
    model = load_model(cfg.model)
    tokens = calibrate(cfg, load_tokenizer(cfg.model), model, SOLO)
    assert seen == [torch.device("cpu")]
    from transformers import AutoModelForCausalLM
    again = data.sample_from_model(AutoModelForCausalLM.from_pretrained(tiny_models["llama"]), 2, 16, cfg.calibration.seed)
    assert torch.equal(tokens, again)
    assert all(p.device.type in ("cpu", "meta") for p in model.parameters())
    assert len(list((tmp_path / "cache" / "calibration").glob("self-*.pt"))) == 1

    def no_sampling(*a, **k):
        raise AssertionError("sampled again")
    monkeypatch.setattr(data, "sample_from_model", no_sampling)
    assert torch.equal(calibrate(cfg, load_tokenizer(cfg.model), model, SOLO), tokens)
    cfg.calibration.seed += 1
    with pytest.raises(AssertionError, match="sampled again"):
        calibrate(cfg, load_tokenizer(cfg.model), model, SOLO)
