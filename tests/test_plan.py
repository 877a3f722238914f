"""Measurement, allocation and plan files on a tiny model; the real-model numbers are in benchmarks/."""
import json

import pytest
import yaml
from click.testing import CliRunner

import quantc
from quantc.cli import main

from conftest import write_yaml


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def yaml_for(tmp_path, model, calib, budget="avg_bits: 4.5", extra=""):
    return write_yaml(tmp_path / "b.yaml", f"""model: {model}
budget: {{{budget}}}
quant: {{bits: [2, 4, 8], group_size: 32}}
calibration: {{source: {calib}, samples: 10, seq_len: 64}}
plan: {{measure_samples: 6, alpha_samples: 2, alpha_seq_len: 32}}
{extra}""")


def run(*args):
    r = CliRunner().invoke(main, list(map(str, args)))
    return r


def test_plan_then_replan_from_cache(tmp_path, tiny_models, calib_file, cache):
    y = yaml_for(tmp_path, tiny_models["llama"], calib_file)
    r = run("plan", y, "-o", tmp_path / "p1")
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "measured" in r.output
    for f in ("plan.yaml", "report.md", "bits_per_layer.png", "importance.png", "quality_vs_size.png"):
        assert (tmp_path / "p1" / f).is_file(), f
    plan = yaml.safe_load((tmp_path / "p1" / "plan.yaml").read_text())
    assert len(plan["units"]) == 2 * 4                       # q/k/v, o, gate/up, down per layer
    weights = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128)
    assert plan["predicted"]["bytes"] <= 4.5 * weights / 8
    assert len(list(cache.rglob("*.json"))) == 1
    r2 = run("plan", y, "-o", tmp_path / "p2", "--avg-bits", "3.5")
    assert r2.exit_code == 0 and "cached" in r2.output, r2.output
    plan2 = yaml.safe_load((tmp_path / "p2" / "plan.yaml").read_text())
    assert plan2["predicted"]["bytes"] < plan["predicted"]["bytes"]
    assert plan2["predicted"]["delta_kl"] >= plan["predicted"]["delta_kl"]
    ms = json.loads(next(cache.rglob("*.json")).read_text())
    u = ms["units"]["0.q+k+v"]
    errs = [u["options"][k]["err"] for k in sorted(u["options"], key=lambda k: int(k[0]))]
    assert errs[0] > errs[1] > errs[2] > 0                   # 2-bit worse than 4-bit worse than 8-bit
    assert ms["meta"]["predictor"] == "fisher"               # the default: every option predicted
    assert all(o["dkl"] >= 0 and o["fisher"] > 0 for v in ms["units"].values() for o in v["options"].values())
    assert set(ms["meta"]["calibration"]) == set(u["options"])   # a scale factor per option
    assert not any("uniform_measured" in c for c in ms["meta"]["calibration"].values())   # no check by default
    assert {"block_influence", "outlier_share", "lieq_kl", "effective_rank", "topk_energy_gain"} <= set(ms["layers"][0])


def _yaml(path, model, calib, quant, budget="avg_bits: 6"):
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_yaml(path, f"""model: {model}
budget: {{{budget}}}
quant: {quant}
calibration: {{source: {calib}, samples: 10, seq_len: 64}}
plan: {{measure_samples: 6, alpha_samples: 2, alpha_seq_len: 32}}
""")


def test_narrower_candidates_replan_from_a_wider_measurement(tmp_path, tiny_models, calib_file, cache, monkeypatch):
    model = tiny_models["llama"]
    wide = _yaml(tmp_path / "wide.yaml", model, calib_file, "{bits: [2, 4, 8], group_size: 32}", "avg_bits: 4.5")
    assert run("plan", wide, "-o", tmp_path / "p1").exit_code == 0
    sub = _yaml(tmp_path / "sub.yaml", model, calib_file, "{bits: [4, 8], group_size: 32}")
    r = run("plan", sub, "-o", tmp_path / "p2")
    assert r.exit_code == 0 and "cached" in r.output, r.output
    assert len(list(cache.rglob("*.json"))) == 1                 # nothing measured again
    plan = yaml.safe_load((tmp_path / "p2" / "plan.yaml").read_text())
    assert {u["bits"] for u in plan["units"].values()} <= {4, 8}
    # the same numbers as measuring the narrower set on its own (to GPTQ's float rounding)
    monkeypatch.setenv("QUANTC_CACHE", str(tmp_path / "alone"))
    assert run("plan", sub, "-o", tmp_path / "p3").exit_code == 0
    alone = json.loads(next((tmp_path / "alone").rglob("*.json")).read_text())
    monkeypatch.setenv("QUANTC_CACHE", str(cache))
    wider = json.loads(next(cache.rglob("*.json")).read_text())
    for k, u in alone["units"].items():
        assert set(u["options"]) == {"4b-g32-sym-ao-sg-mse", "8b-g32-sym-ao-sg-mse"}
        for o, v in u["options"].items():
            assert v["bytes"] == wider["units"][k]["options"][o]["bytes"]
            assert v["dkl"] == pytest.approx(wider["units"][k]["options"][o]["dkl"], rel=1e-3, abs=1e-9)
    p3 = yaml.safe_load((tmp_path / "p3" / "plan.yaml").read_text())
    assert {k: u["bits"] for k, u in p3["units"].items()} == {k: u["bits"] for k, u in plan["units"].items()}


def test_an_option_with_another_anchor_is_measured_again(tmp_path, tiny_models, calib_file, cache):
    model = tiny_models["llama"]
    # g32 is predicted from its anchor g64 here; measured alone, it is its own anchor (solved)
    both = _yaml(tmp_path / "both.yaml", model, calib_file, "{bits: [4], group_size: [32, 64]}", "avg_bits: 4.9")
    r = run("plan", both, "-o", tmp_path / "p1")
    assert r.exit_code == 0, r.output
    g32 = _yaml(tmp_path / "g32.yaml", model, calib_file, "{bits: [4, 8], group_size: 32}")
    r = run("plan", g32, "-o", tmp_path / "p2")
    assert r.exit_code == 0 and "measured" in r.output, r.output
    assert len(list(cache.rglob("*.json"))) == 2
    g64 = _yaml(tmp_path / "g64.yaml", model, calib_file, "{bits: [4], group_size: 64}", "avg_bits: 4.9")
    r = run("plan", g64, "-o", tmp_path / "p3")
    assert r.exit_code == 0 and "cached" in r.output, r.output        # the anchor itself: same numbers


def test_compile_with_budget_and_edited_plan(tmp_path, tiny_models, calib_file, cache):
    y = yaml_for(tmp_path, tiny_models["qwen2"], calib_file, "memory: 48KiB")
    r = run("-q", "compile", y, "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output + repr(r.exception)
    m = json.loads((tmp_path / "out" / "quantc.json").read_text())
    assert m["totals"]["quantized_linear_bytes"] <= 48 * 1024
    assert len({o["bits"] for o in m["modules"].values()}) > 1       # a real mix
    plan = yaml.safe_load((tmp_path / "out" / "plan.yaml").read_text())
    for k, u in plan["units"].items():                    # q/k/v share one option (vLLM fusing)
        assert len({m["modules"][n]["bits"] for n in u["modules"]}) == 1
    plan["units"]["1.down"]["bits"] = 8
    (tmp_path / "edited.yaml").write_text(yaml.safe_dump(plan))
    r = run("-q", "compile", y, "-o", tmp_path / "out2", "--plan", tmp_path / "edited.yaml")
    assert r.exit_code == 0, r.output
    q = quantc.load(tmp_path / "out2")
    assert q.model.layers[1].mlp.down_proj.bits == 8


def test_plan_errors(tmp_path, tiny_models, calib_file, cache):
    y = yaml_for(tmp_path, tiny_models["llama"], calib_file, "memory: 1KiB")
    r = run("plan", y, "-o", tmp_path / "p")
    assert r.exit_code == 2 and "infeasible" in r.output and "smallest achievable size" in r.output
    bad = tmp_path / "bad_plan.yaml"
    bad.write_text(yaml.safe_dump({"units": {"7.q+k+v": {"bits": 4, "group_size": 32}}}))
    y2 = yaml_for(tmp_path, tiny_models["llama"], calib_file)
    r = run("compile", y2, "-o", tmp_path / "o", "--plan", bad)
    assert r.exit_code == 2 and "does not match the model" in r.output


def test_edited_plan_files_that_would_be_misread(tmp_path, tiny_models, calib_file, cache):
    """Edits quantc cannot honour are refused, naming the unit and the key: no unit at all, a group size
    a llama.cpp type fixes, modules moved between units, and a plan made with other units."""
    y = yaml_for(tmp_path, tiny_models["llama"], calib_file)
    r = run("-q", "plan", y, "-o", tmp_path / "p")
    assert r.exit_code == 0, r.output
    good = yaml.safe_load((tmp_path / "p" / "plan.yaml").read_text())
    y2 = yaml_for(tmp_path, tiny_models["llama"], calib_file, "", "")       # no budget: the plan decides

    def refused(edit, *fragments):
        plan = json.loads(json.dumps(good))
        edit(plan)
        f = tmp_path / "edited.yaml"
        f.write_text(yaml.safe_dump(plan))
        r = run("compile", y2, "-o", tmp_path / "o", "--plan", f)
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        for frag in fragments:
            assert frag in r.output, (frag, r.output)
        assert not (tmp_path / "o").exists()

    refused(lambda p: p.update(units={}), "`units`: empty")
    refused(lambda p: p["units"]["0.down"].update(modules=["model.layers.0.mlp.up_proj"]),
            "`units.0.down.modules`: lists ['model.layers.0.mlp.up_proj']", "cannot move between units")
    refused(lambda p: p["meta"].update(units_mode="linear"), "`meta.units_mode`: the plan was made with quant.units: "
            "linear")


def test_editing_bits_of_a_llama_cpp_unit_gives_the_new_type(tmp_path, tiny_models, calib_file, cache, caplog):
    """A plan on llama.cpp's K grid is written without the fields the type fixes, so an edit of `bits`
    alone gives the new type's groups; an older file's stale group size is named and ignored."""
    import logging
    from quantc.config import load_config
    from quantc.planning import read_plan_options
    y = yaml_for(tmp_path, tiny_models["llama"], calib_file, "avg_bits: 7.0")
    y.write_text(y.read_text().replace("quant: {bits: [2, 4, 8], group_size: 32}", "quant: {bits: [4, 6], grid: k}"))
    r = run("-q", "plan", y, "-o", tmp_path / "p")
    assert r.exit_code == 0, r.output
    plan = yaml.safe_load((tmp_path / "p" / "plan.yaml").read_text())
    unit = next(iter(plan["units"]))
    assert plan["units"][unit]["grid"] == "k" and "group_size" not in plan["units"][unit]
    cfg = load_config(y)
    plan["units"][unit]["bits"] = 4 if plan["units"][unit]["bits"] == 6 else 6
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(plan))
    choices, _, _ = read_plan_options(tmp_path / "e.yaml", cfg)
    from quantc.options import Option
    new = plan["units"][unit]["bits"]
    assert choices[unit].bits == new and choices[unit].group_size == Option(new, grid="k").group_size != 128
    plan["units"][unit].update(bits=4, group_size=64)
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(plan))
    with caplog.at_level(logging.WARNING, logger="quantc"):
        choices, _, _ = read_plan_options(tmp_path / "e.yaml", cfg)
    assert choices[unit].group_size == 32 and f"units.{unit}: q4_k fixes group_size to 32; the file's group_size: 64 " \
        "ignored" in caplog.text


def test_qep_changes_the_fit(tmp_path, tiny_models, calib_file):
    from quantc.config import parse_config
    from quantc.pipeline import compile_model
    import torch
    out = {}
    for alpha in (0.0, 1.0):
        raw = {"model": str(tiny_models["llama"]), "quant": {"bits": 3, "group_size": 32, "qep_alpha": alpha},
               "calibration": {"source": str(calib_file), "samples": 8, "seq_len": 64}}
        compile_model(parse_config(raw), tmp_path / f"q{alpha}", progress=False)
        out[alpha] = quantc.load(tmp_path / f"q{alpha}").model.layers[1].mlp.down_proj.weight
    assert not torch.equal(out[0.0], out[1.0])


def test_moving_the_held_out_boundary_measures_again(tmp_path, tiny_models, calib_file, cache):
    """6 Hessian + 4 held-out sequences and 8 + 2 are the same 10 rows in the same order: the second
    is another measurement (other Hessians, another held-out slice), not the first one's cache."""
    def cfg(name, measure, alpha):
        return write_yaml(tmp_path / name, f"""model: {tiny_models["llama"]}
budget: {{avg_bits: 4.5}}
quant: {{bits: [2, 4, 8], group_size: 32}}
calibration: {{source: {calib_file}, samples: 10, seq_len: 64}}
plan: {{measure_samples: {measure}, alpha_samples: {alpha}, alpha_seq_len: 64}}
""")
    r = run("plan", cfg("a.yaml", 6, 4), "-o", tmp_path / "p1")
    assert r.exit_code == 0 and "measured" in r.output, r.output
    r = run("plan", cfg("b.yaml", 8, 2), "-o", tmp_path / "p2")
    assert r.exit_code == 0 and "measured" in r.output, r.output
    assert len(list(cache.rglob("*.json"))) == 2


@pytest.mark.parametrize("samples, said", [
    (3, "plan.alpha_samples (4)"),         # the held-out rows are every row, the Hessians' too
    (8, "Hessians use 4 sequences"),       # the held-out slice is taken first: the Hessians get 4 of 6
])
def test_a_calibration_short_of_the_measurement_is_named(tmp_path, tiny_models, calib_file, cache, caplog,
                                                         samples, said):
    y = write_yaml(tmp_path / "short.yaml", f"""model: {tiny_models["llama"]}
budget: {{avg_bits: 6}}
quant: {{bits: [4, 8], group_size: 32}}
calibration: {{source: {calib_file}, samples: {samples}, seq_len: 64}}
plan: {{measure_samples: 6, alpha_samples: 4, alpha_seq_len: 32}}
""")
    with caplog.at_level("WARNING", logger="quantc"):
        r = run("plan", y, "-o", tmp_path / "p")
    assert r.exit_code == 0, r.output
    assert "short.yaml" in caplog.text and said in caplog.text and "calibration.samples to 10" in caplog.text, caplog.text


def test_a_qep_discount_is_another_measurement(tmp_path, tiny_models, calib_file, cache):
    """plan.qep_discount weights the Fisher form by what QEP leaves: another measurement; quant.qep_alpha
    alone leaves the measurement (and its cache entry) as it was."""
    text = yaml_for(tmp_path, tiny_models["llama"], calib_file).read_text()
    variants = {"plain": text,
                "no-qep": text.replace("group_size: 32}", "group_size: 32, qep_alpha: 0}"),
                "discount": text.replace("alpha_seq_len: 32}", "alpha_seq_len: 32, qep_discount: 1}")}
    said = {}
    for name, t in variants.items():
        r = run("plan", write_yaml(tmp_path / f"{name}.yaml", t), "-o", tmp_path / name)
        assert r.exit_code == 0, r.output
        said[name] = "cached" if "cached" in r.output else "measured"
    assert said == {"plain": "measured", "no-qep": "cached", "discount": "measured"}
    betas = [json.loads(p.read_text())["meta"].get("qep_beta") for p in cache.rglob("*.json")]
    assert sorted(betas, key=str) == [0.5, None]                       # 1 − α (0.5, the default) · ρ (1)
    assert "gradient into every linear × 0.5" in (tmp_path / "discount" / "report.md").read_text()
    assert "QEP leaves" not in (tmp_path / "plain" / "report.md").read_text()


def test_the_seed_is_part_of_the_measurement_key(tiny_models):
    """The fisher probes' labels (and the exact predictor's noise) are drawn from calibration.seed, so two
    seeds are two measurements even where the source gives both the same tokens (documents of exactly
    seq_len tokens, a text of one window)."""
    import torch
    from quantc.config import parse_config
    from quantc.planning import measurement_key
    from quantc.preflight import skeleton
    raw = {"model": str(tiny_models["llama"]), "budget": {"avg_bits": 4.5}, "quant": {"bits": [2, 4, 8], "group_size": 32}}
    tokens = torch.randint(3, 100, (6, 32), generator=torch.Generator().manual_seed(0))
    keys = set()
    for seed in (0, 1, 2):
        cfg = parse_config({**raw, "calibration": {"seed": seed}})
        keys.add(measurement_key(cfg, tokens[:4], tokens[4:], skeleton(cfg)))
    assert len(keys) == 3


def test_benchmark_jobs_are_keyed_by_what_they_measure():
    """bench_mixed keys a predictor label's jobs by its settings that differ from quantc's defaults:
    the bare label and the default written out share jobs, any other slice or discount has its own."""
    from benchmarks.bench_mixed import job_label
    from quantc.config import PlanSettings
    d = PlanSettings()
    assert job_label(f"fisher-h{d.alpha_samples}") == job_label("fisher") == job_label("fisher-qd0")
    other = d.alpha_samples // 4
    assert job_label(f"fisher-h{other}") == f"fisher-h{other}"
    assert job_label(f"fisher-h{d.alpha_samples}-qd0.4") == job_label("fisher-qd0.4") != job_label("fisher")
    assert job_label("exact") == "exact"
