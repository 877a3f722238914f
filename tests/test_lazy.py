"""Bounded memory: lazy loading reads one decoder layer at a time and gives the same artifact."""
import hashlib

import pytest
import torch

import quantc.lazy as lazy
from quantc.config import parse_config
from quantc.pipeline import compile_model, memory_estimate


def raw(model, calib, lazy_load, **quant):
    return {"model": str(model), "quant": {"bits": 3, "group_size": 32, **quant},
            "resources": {"lazy_load": lazy_load},
            "calibration": {"source": str(calib), "samples": 8, "seq_len": 64, "batch_size": 4}}


def digest(folder):
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_lazy_compile_is_identical_and_holds_one_layer(tmp_path, tiny_models, calib_file, monkeypatch):
    live, peak = set(), [0]
    real_m, real_r = lazy.materialize, lazy.release

    def materialize(model, i):
        real_m(model, i)
        if lazy.is_lazy(model):
            live.add(i)
            peak[0] = max(peak[0], len(live))
            assert not any(p.is_meta for p in model.model.layers[i].parameters())

    def release(model, i):
        real_r(model, i)
        live.discard(i)
        if lazy.is_lazy(model):
            assert all(p.is_meta for p in model.model.layers[i].parameters())

    monkeypatch.setattr(lazy, "materialize", materialize)   # model.decoder_layer: the one loader
    monkeypatch.setattr(lazy, "release", release)
    for method, extra in (("gptq", {"qep_alpha": 0.5}), ("rtn", {})):
        outs = {}
        for lz in (True, False):
            outs[lz] = tmp_path / f"{method}-{lz}"
            compile_model(parse_config(raw(tiny_models["qwen2"], calib_file, lz, method=method, **extra), "t"),
                          outs[lz], progress=False)
        assert digest(outs[True]) == digest(outs[False])
    assert peak[0] == 1


def test_lazy_model_keeps_layers_on_disk(tiny_models):
    m = lazy.load_lazy(str(tiny_models["llama"]))
    assert all(p.is_meta for p in m.model.layers.parameters())
    assert not m.model.embed_tokens.weight.is_meta and m.lm_head.weight is m.model.embed_tokens.weight
    lazy.materialize(m, 1)
    from safetensors.torch import load_file
    sd = load_file(str(tiny_models["llama"] / "model.safetensors"))
    assert torch.equal(m.model.layers[1].mlp.up_proj.weight, sd["model.layers.1.mlp.up_proj.weight"])
    assert all(p.is_meta for p in m.model.layers[0].parameters())
    lazy.release(m, 1)
    assert all(p.is_meta for p in m.model.layers[1].parameters())


def test_memory_estimate_counts_one_layer_when_lazy(tiny_models, calib_file):
    est = {lz: memory_estimate(parse_config(raw(tiny_models["llama"], calib_file, lz), "t"))["weights"]
           for lz in (True, False)}
    assert est[True] < est[False]


def test_offloaded_activations_give_the_same_artifact(tmp_path, tiny_models, calib_file, monkeypatch):
    import quantc.model as qm
    made = []
    real = qm.offloaded_empty

    def spy(like, folder):
        t = real(like, folder)
        made.append(t.untyped_storage().filename)
        return t

    monkeypatch.setattr(qm, "offloaded_empty", spy)
    outs = {}
    for off in (True, False):
        r = raw(tiny_models["mistral"], calib_file, True, qep_alpha=0.5)
        r["resources"]["offload_activations"] = off
        outs[off] = tmp_path / f"out-{off}"
        cfg = parse_config(r, "t")
        compile_model(cfg, outs[off], progress=False)
    assert digest(outs[True]) == digest(outs[False])
    assert len(made) > 4 and all("offload" in f for f in made)          # x̂, x and outputs lived in files
    assert not (outs[True] / "offload").exists() and not any((tmp_path).glob(".out-True.partial"))
    est = {off: memory_estimate(parse_config({**raw(tiny_models["mistral"], calib_file, True),
                                              "resources": {"offload_activations": off}}, "t"))["activations"]
           for off in (True, False)}
    assert est[True] < est[False]


def test_offloaded_activations_cover_the_measurement(tmp_path, tiny_models, calib_file, monkeypatch):
    """With offload_activations a budgeted compile's sweep 1 keeps its hidden states in files too: the
    calibration and held-out streams, and every layer's held-out input that the fisher backward sweep
    reads back. The measurement and the artifact are the same as in memory, the estimate is lower, and
    the files' folder is gone at the end."""
    import weakref
    import quantc.passes.measure as qmeasure
    import quantc.planning as qplanning
    seen, layer0 = {}, []
    real, real_capture = qmeasure._fisher_diagonal, qplanning.capture_layer0_inputs

    def capture(*a, **k):
        hidden, kw = real_capture(*a, **k)
        layer0.append(weakref.ref(hidden))
        return hidden, kw

    def spy(model, head, held_in, final, *a, **k):
        seen.setdefault("held_in", []).append([h.untyped_storage().filename for h in held_in])
        seen.setdefault("layer0", []).append([r() is None for r in layer0])   # after the forward sweep
        layer0.clear()
        return real(model, head, held_in, final, *a, **k)

    monkeypatch.setattr(qmeasure, "_fisher_diagonal", spy)
    monkeypatch.setattr(qplanning, "capture_layer0_inputs", capture)
    outs, plans = {}, {}
    for off in (True, False):
        monkeypatch.setenv("QUANTC_CACHE", str(tmp_path / f"cache-{off}"))      # each run measures
        r = raw(tiny_models["llama"], calib_file, True, qep_alpha=0.0)
        r.update(budget={"avg_bits": 6.5}, quant={**r["quant"], "bits": [4, 8]},
                 plan={"measure_samples": 6, "alpha_samples": 2, "alpha_seq_len": 32, "probes": 2})
        r["resources"]["offload_activations"] = off
        outs[off] = tmp_path / f"out-{off}"
        compile_model(parse_config(r, "t"), outs[off], progress=False)
        plans[off] = (outs[off] / "plan.yaml").read_text()
    offloaded, in_memory = seen["held_in"]
    assert offloaded and all(f and "offload" in f for f in offloaded)        # every layer's, in a file
    assert not any(in_memory)
    # the captured layer-0 inputs were let go: offloaded, both (their copies are in files); in memory, the
    # calibration's (the held-out ones are the backward sweep's held_in[0])
    assert seen["layer0"] == [[True, True], [True, False]]
    assert plans[True] == plans[False] and digest(outs[True]) == digest(outs[False])
    est = {off: memory_estimate(parse_config({**r, "resources": {"offload_activations": off}}, "t"))["measurement"]
           for off in (True, False)}
    assert est[True] < est[False]


@pytest.mark.parametrize("qep,off", [(0.0, False), (0.5, False), (0.5, True)])
def test_the_first_layers_inputs_are_freed_after_it(tmp_path, tiny_models, calib_file, monkeypatch, qep, off):
    """Sweep 2 holds its live streams only: the layer-0 inputs the pipeline captured (and, offloaded,
    their RAM copy) are gone once layer 0 is done, not referenced until the end of the sweep."""
    import gc
    import weakref
    from quantc import pipeline
    from quantc.passes import quantize
    captured, alive = [], {}
    real_capture, real_sweep = pipeline.capture_layer0_inputs, quantize.quantize_gptq

    def capture(*a, **k):
        hidden, kw = real_capture(*a, **k)
        captured.append(weakref.ref(hidden))
        return hidden, kw

    def sweep(model, acts, *a, on_layer=None, **k):
        file_copy = weakref.ref(acts.hidden)

        def spy(i, *r):
            gc.collect()
            alive[i] = (captured[0]() is not None, file_copy() is not None)
            on_layer(i, *r)
        return real_sweep(model, acts, *a, on_layer=spy, **k)

    monkeypatch.setattr(pipeline, "capture_layer0_inputs", capture)
    monkeypatch.setattr(quantize, "quantize_gptq", sweep)
    r = {"model": str(tiny_models["llama"]), "quant": {"bits": 4, "group_size": 32, "qep_alpha": qep},
         "calibration": {"source": str(calib_file), "samples": 8, "seq_len": 32, "batch_size": 4},
         "resources": {"offload_activations": off}}
    compile_model(parse_config(r, "t"), tmp_path / "out", progress=False)
    assert alive and all(not any(v) for v in alive.values()), alive


def test_a_hub_model_streams_from_its_cached_folder_like_a_local_one(tmp_path, tiny_models, calib_file):
    """A hub id is read from its Hugging Face cache folder (offline here: a cache laid out as the hub
    client writes it), so its layers load one at a time and the memory check runs, as for a local
    folder: the same artifact, and the manifest keeps the id. An id the cache lacks is one clear line."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from conftest import write_yaml
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--quantc-test--tiny"
    shutil.copytree(tiny_models["llama"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "QUANTC_CACHE": str(tmp_path / "qcache")}
    rest = f"calibration: {{source: {calib_file}, samples: 8, seq_len: 64, batch_size: 4}}\nquant: {{bits: 3, group_size: 32}}\n"
    runs = {}
    for name, model in (("hub", "quantc-test/tiny"), ("local", str(tiny_models["llama"]))):
        y = write_yaml(tmp_path / f"{name}.yaml", f"model: {model}\n{rest}")
        runs[name] = subprocess.run([sys.executable, "-m", "quantc", "-v", "compile", str(y), "-o", str(tmp_path / f"out-{name}")],
                                    capture_output=True, text=True, env=env, timeout=600)
        assert runs[name].returncode == 0, runs[name].stderr[-3000:]
    for name in ("hub", "local"):
        assert "lazy loading: decoder layers are read from" in runs[name].stderr
        assert "expected peak memory" in runs[name].stderr
    assert digest(tmp_path / "out-hub") == digest(tmp_path / "out-local")
    source = json.loads((tmp_path / "out-hub" / "quantc.json").read_text())["source"]
    assert source["hub"] == "quantc-test/tiny" and source["model"].endswith(commit) and source["commit"] == commit

    y = write_yaml(tmp_path / "absent.yaml", f"model: quantc-test/absent\n{rest}")
    r = subprocess.run([sys.executable, "-m", "quantc", "compile", str(y), "-o", str(tmp_path / "absent")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout
    assert "quantc-test/absent: cannot read the model config" in r.stderr + r.stdout     # preflight: before any download
    assert not (tmp_path / "absent").exists()


def test_a_hub_fetch_reads_only_the_indexed_weights(tmp_path, tiny_models, monkeypatch):
    """The download takes the config, index and tokenizer files, then the files the index names: not a
    repository's other weights (Mistral's consolidated.safetensors, pickles beside safetensors) nor
    its code without trust_remote_code. A cache that lacks an indexed file is one clear line."""
    import fnmatch
    import json
    import shutil
    import huggingface_hub
    from quantc.errors import QuantcError
    from quantc.model import fetch_model, weight_files
    from safetensors.torch import load_file, save_file
    repo = tmp_path / "repo"
    shutil.copytree(tiny_models["llama"], repo)
    t = load_file(str(repo / "model.safetensors"))
    (repo / "model.safetensors").unlink()
    keys = sorted(t)
    half = len(keys) // 2
    for n, part in (("model-00001-of-00002.safetensors", keys[:half]), ("model-00002-of-00002.safetensors", keys[half:])):
        save_file({k: t[k] for k in part}, str(repo / n), metadata={"format": "pt"})
    (repo / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, k in enumerate(keys)}}))
    save_file({"whole": torch.zeros(3)}, str(repo / "consolidated.safetensors"))
    (repo / "pytorch_model.bin").write_bytes(b"pickle")
    (repo / "modeling_custom.py").write_text("raise SystemExit")
    asked, cache = [], tmp_path / "cache"

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        asked.append(list(allow_patterns))
        cache.mkdir(exist_ok=True)
        for f in repo.iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, cache / f.name)
        return str(cache)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    folder = fetch_model("org/model", allow_pickle=True)
    assert folder == str(cache)
    assert sorted(f.name for f in cache.iterdir() if f.suffix in (".safetensors", ".bin", ".py")) == \
        ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert len(asked) == 2
    # a local folder with the extra file reads the indexed ones only: the lazy loader and the estimate
    assert [f.name for f in weight_files(repo)] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert "whole" not in lazy.WeightSource(repo).index
    from quantc.memory import _param_count
    assert _param_count(repo) == sum(v.numel() for v in t.values())

    (cache / "model-00002-of-00002.safetensors").unlink()         # offline with a partial cache
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, revision=None, allow_patterns=None, **kw: str(cache))
    with pytest.raises(QuantcError, match="cache .* lacks model-00002-of-00002.safetensors: an interrupted or offline"):
        fetch_model("org/model")

    def unreachable(repo_id, **kw):
        raise OSError("connection refused\nmore")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(QuantcError, match=r"org/model: cannot fetch the model from the Hugging Face hub \(OSError: "
                                          r"connection refused\); check the name and model.revision"):
        fetch_model("org/model")
