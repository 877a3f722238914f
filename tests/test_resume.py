"""A compile killed with SIGKILL mid-way resumes from its last finished layer to an identical artifact."""
import json
import os
import subprocess
import sys

import pytest

from conftest import build_tiny, write_yaml


@pytest.mark.parametrize("qep", [0.0, 0.5])
def test_sigkill_then_resume_is_bit_identical(tmp_path, tiny_tokenizer, calib_file, qep):
    model = build_tiny("llama", tmp_path / "m4", tiny_tokenizer, layers=4, seed=3)
    y = write_yaml(tmp_path / "b.yaml", f"""model: {model}
quant: {{bits: 3, group_size: 32, qep_alpha: {qep}}}
calibration: {{source: {calib_file}, samples: 8, seq_len: 64}}
""")
    cmd = [sys.executable, "-m", "quantc.cli", "-q", "compile", str(y)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run(cmd + ["-o", str(tmp_path / "a")], check=True, env=env, capture_output=True)

    r = subprocess.run(cmd + ["-o", str(tmp_path / "b")], env={**env, "QUANTC_FAULT_AFTER_LAYER": "1"},
                       capture_output=True, text=True)
    assert r.returncode == -9                                  # killed, no cleanup ran
    state = json.loads((tmp_path / ".b.partial" / "resume" / "state.json").read_text())
    assert state["next_layer"] == 2
    assert not (tmp_path / "b").exists()                       # nothing half-written in place

    r = subprocess.run(cmd + ["-o", str(tmp_path / "b")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming after decoder layer 1" in r.stderr
    for f in ("model.safetensors", "config.json", "quantize_config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert not (tmp_path / ".b.partial").exists()
    checks = [json.loads((tmp_path / d / "quantc.json").read_text())["check"] for d in "ab"]
    assert checks[0]["kl"] > 0 and checks[0] == checks[1]      # the held-out streams resumed where they were


@pytest.mark.parametrize("second", ["{bits: 2, group_size: 32}",
                                    # GPTQ's block changes the codes (the order of its lazy updates)
                                    "{bits: 4, group_size: 32, block_size: 32}"])
def test_changed_config_does_not_resume(tmp_path, tiny_tokenizer, calib_file, second):
    """A compile killed after layer 0, then run again with other settings into the same output: it
    starts over, saying why, instead of joining its layers to the first one's."""
    model = build_tiny("llama", tmp_path / "m3", tiny_tokenizer, layers=3, seed=4)
    base = f"model: {model}\ncalibration: {{source: {calib_file}, samples: 4, seq_len: 64}}\n"
    cmd = [sys.executable, "-m", "quantc.cli", "-q", "compile"]
    y1 = write_yaml(tmp_path / "b1.yaml", base + "quant: {bits: 4, group_size: 32}\n")
    r = subprocess.run(cmd + [str(y1), "-o", str(tmp_path / "o")], capture_output=True, text=True,
                       env={**os.environ, "QUANTC_FAULT_AFTER_LAYER": "0"})
    assert r.returncode == -9
    y2 = write_yaml(tmp_path / "b2.yaml", base + f"quant: {second}\n")
    r = subprocess.run(cmd + [str(y2), "-o", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 0 and "resuming" not in r.stderr and "another compile" in r.stderr, r.stderr[-2000:]
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["quantization_config"]["bits"] == int(second.split()[1].rstrip(","))


def _killed_after(cmd, y, out, layer):
    r = subprocess.run(cmd + [str(y), "-o", str(out)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONWARNINGS": "ignore", "QUANTC_FAULT_AFTER_LAYER": str(layer)})
    assert r.returncode == -9, r.stderr[-2000:]


def test_a_run_that_does_not_resume_leaves_no_resume_point_over_its_own_shards(tmp_path, tiny_tokenizer,
                                                                                calib_file):
    """A GPTQ compile killed after layer 1, then an RTN compile into the same output killed after layer
    0 (RTN keeps no resume point, and wrote its layer 0 over the GPTQ one): the GPTQ command run again
    starts over, to the artifact of an uninterrupted run, instead of resuming with RTN's layer 0."""
    model = build_tiny("llama", tmp_path / "m4", tiny_tokenizer, layers=4, seed=3)
    base = f"model: {model}\ncalibration: {{source: {calib_file}, samples: 8, seq_len: 64}}\n"
    gptq = write_yaml(tmp_path / "g.yaml", base + "quant: {bits: 3, group_size: 32}\n")
    rtn = write_yaml(tmp_path / "r.yaml", f"model: {model}\nquant: {{bits: 3, group_size: 32, method: rtn}}\n")
    cmd = [sys.executable, "-m", "quantc.cli", "-q", "compile"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run(cmd + [str(gptq), "-o", str(tmp_path / "a")], check=True, env=env, capture_output=True)
    _killed_after(cmd, gptq, tmp_path / "b", 1)
    _killed_after(cmd, rtn, tmp_path / "b", 0)
    r = subprocess.run(cmd + [str(gptq), "-o", str(tmp_path / "b")], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "resuming" not in r.stderr, r.stderr[-2000:]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_a_damaged_resume_point_starts_over(tmp_path, tiny_tokenizer, calib_file):
    """A resume point whose activations file was cut short (a copied folder, a file system that
    ignored fsync) is discarded with a warning, and the run starts over to the same artifact."""
    model = build_tiny("llama", tmp_path / "m4", tiny_tokenizer, layers=4, seed=3)
    y = write_yaml(tmp_path / "g.yaml", f"model: {model}\nquant: {{bits: 3, group_size: 32}}\n"
                                        f"calibration: {{source: {calib_file}, samples: 8, seq_len: 64}}\n")
    cmd = [sys.executable, "-m", "quantc.cli", "-q", "compile"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run(cmd + [str(y), "-o", str(tmp_path / "a")], check=True, env=env, capture_output=True)
    _killed_after(cmd, y, tmp_path / "b", 1)
    (acts,) = (tmp_path / ".b.partial" / "resume").glob("acts-*.safetensors")
    acts.write_bytes(acts.read_bytes()[: acts.stat().st_size // 2])
    r = subprocess.run(cmd + [str(y), "-o", str(tmp_path / "b")], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "cannot be read" in r.stderr and "resuming" not in r.stderr, r.stderr[-2000:]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_replaced_weights_do_not_resume(tmp_path, tiny_tokenizer, calib_file):
    """The same YAML over weights replaced in place (a re-download, another export of the model) is
    another compile: resuming would join the old weights' first layers to the new weights' rest."""
    model = build_tiny("llama", tmp_path / "m3", tiny_tokenizer, layers=3, seed=4)
    y = write_yaml(tmp_path / "b.yaml", f"model: {model}\nquant: {{bits: 4, group_size: 32}}\n"
                                        f"calibration: {{source: {calib_file}, samples: 4, seq_len: 64}}\n")
    cmd = [sys.executable, "-m", "quantc.cli", "-q", "compile", str(y), "-o", str(tmp_path / "o")]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "QUANTC_FAULT_AFTER_LAYER": "0"})
    assert r.returncode == -9
    build_tiny("llama", tmp_path / "m3", tiny_tokenizer, layers=3, seed=5)      # new weights, same files
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0 and "resuming" not in r.stderr, r.stderr[-2000:]


def test_a_death_between_the_resume_files_resumes_consistently(tmp_path, monkeypatch):
    """Layer 1's outputs written and the process killed before the state names them: the resume point
    is still layer 0's, with layer 0's outputs (a single activations file replaced in place would pair
    the old state with the new activations, and the rerun would quantize layer 1 on its own outputs)."""
    import torch
    from quantc import resume
    ck = resume.Checkpoint(tmp_path, "k")
    ck.dir.mkdir()
    first = torch.randn(2, 3, 4)
    ck.save_layer(0, {"w": torch.zeros(1)})            # as the sweep does: the shard, then the state
    ck.save_state(0, first, None)
    ck.save_layer(1, {"w": torch.ones(1)})
    write = resume._atomic

    def killed_before_the_state(fn, path):
        if path.name == "state.json":
            raise KeyboardInterrupt
        write(fn, path)
    monkeypatch.setattr(resume, "_atomic", killed_before_the_state)
    with pytest.raises(KeyboardInterrupt):
        ck.save_state(1, torch.randn(2, 3, 4), None)
    monkeypatch.undo()
    nxt, x_hat, x_ref, check = ck.load()
    assert nxt == 1 and torch.equal(x_hat, first) and x_ref is None and check is None
    ck.save_layer(1, {"w": torch.ones(1)})
    ck.save_state(1, x_hat + 1, None)                   # the next point replaces it, and only one file stays
    assert ck.load()[0] == 2 and len(list(ck.dir.glob("acts-*.safetensors"))) == 1


def test_big_models_are_written_as_shards_with_an_index(tmp_path, tiny_models, calib_file, monkeypatch):
    """Above MAX_SHARD_BYTES the exporter writes whole layers per shard plus an index, as transformers
    does; the tensors and quantc.load's logits equal the single-file artifact's."""
    import torch
    from safetensors.torch import load_file

    import quantc
    import quantc.export.gptq as eg
    from quantc.config import parse_config
    from quantc.pipeline import compile_model
    import safetensors.torch
    import quantc.tensorfile
    from safetensors.torch import save_file
    raw = {"model": str(tiny_models["qwen2"]), "quant": {"bits": 4, "group_size": 32},
           "calibration": {"source": str(calib_file), "samples": 4, "seq_len": 32}}

    def no_whole_shard(*a, **k):
        raise AssertionError("the export loaded a whole layer shard")
    monkeypatch.setattr(safetensors.torch, "load_file", no_whole_shard)   # it copies tensor by tensor instead,
    monkeypatch.setattr(quantc.tensorfile, "COPY_CHUNK", 1000)             # in chunks smaller than a tensor
    one = compile_model(parse_config(raw), tmp_path / "one", progress=False)
    monkeypatch.setattr(eg, "MAX_SHARD_BYTES", 40_000)
    many = compile_model(parse_config(raw), tmp_path / "many", progress=False)
    monkeypatch.undo()
    for f in [tmp_path / "one" / "model.safetensors", *(tmp_path / "many").glob("model-*.safetensors")]:
        save_file(load_file(str(f)), str(tmp_path / "again.safetensors"), metadata={"format": "pt"})
        assert f.read_bytes() == (tmp_path / "again.safetensors").read_bytes(), f     # safetensors' own bytes
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and not (tmp_path / "many" / "model.safetensors").exists()
    assert set(many["files"]) >= set(shards) | {"model.safetensors.index.json"}
    merged = {}
    for s in shards:
        merged.update(load_file(str(tmp_path / "many" / s)))
    ref = load_file(str(tmp_path / "one" / "model.safetensors"))
    assert merged.keys() == ref.keys() == index["weight_map"].keys()
    assert all(torch.equal(merged[k], ref[k]) for k in ref)
    assert one["totals"] == many["totals"]
    ids = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(quantc.load(tmp_path / "one")(input_ids=ids).logits,
                           quantc.load(tmp_path / "many")(input_ids=ids).logits)


def test_second_compile_into_the_same_output_stops_at_once(tmp_path, tiny_models):
    """One writer per output: while a run holds `.o.partial/`, another into the same -o exits 2 at once,
    naming the holder, and leaves the holder's files (its resume point) alone."""
    from quantc.staging import cleans_up_output, prepare_output
    y = write_yaml(tmp_path / "b.yaml", f"model: {tiny_models['llama']}\nquant: {{method: rtn, group_size: 32}}\n")
    out = tmp_path / "o"

    @cleans_up_output
    def while_another_run_writes():         # this test process plays the first compile
        tmp = prepare_output(out, force=False)
        (tmp / "resume").mkdir()
        (tmp / "resume" / "layer-0.safetensors").write_bytes(b"x")
        r = subprocess.run([sys.executable, "-m", "quantc.cli", "-q", "compile", str(y), "-o", str(out)],
                           capture_output=True, text=True)
        assert (tmp / "resume" / "layer-0.safetensors").read_bytes() == b"x"
        return r

    r = while_another_run_writes()
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert f"is being written by quantc process {os.getpid()}" in lines[0] and "choose another -o" in lines[0]
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()   # and nothing is left


def test_two_compiles_at_once_into_one_output(tmp_path, tiny_models, calib_file):
    """Started together: one writes the output, the other stops with one line (locked, or already there)."""
    y = write_yaml(tmp_path / "b.yaml", f"model: {tiny_models['llama']}\nquant: {{bits: 4, group_size: 32}}\n"
                                        f"calibration: {{source: {calib_file}, samples: 4, seq_len: 64}}\n")
    cmd = [sys.executable, "-m", "quantc.cli", "-q", "compile", str(y), "-o", str(tmp_path / "o")]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    err = next(e for code, e in results if code == 2)
    assert "Traceback" not in err and ("is being written by quantc process" in err or "already exists" in err), err
    from quantc.verify import verify
    assert all(ok for name, ok, _ in verify(tmp_path / "o", logits=False))
    assert not (tmp_path / ".o.partial").exists()


def test_ctrl_c_says_where_the_resume_point_is(tmp_path, tiny_tokenizer, calib_file, monkeypatch):
    from click.testing import CliRunner
    from quantc import resume
    from quantc.cli import main
    model = build_tiny("llama", tmp_path / "m3", tiny_tokenizer, layers=3, seed=5)
    y = write_yaml(tmp_path / "b.yaml", f"model: {model}\nquant: {{bits: 4, group_size: 32}}\n"
                                        f"calibration: {{source: {calib_file}, samples: 4, seq_len: 64}}\n")
    save = resume.Checkpoint.save_state

    def save_then_ctrl_c(self, i, *a):
        save(self, i, *a)
        if i == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(resume.Checkpoint, "save_state", save_then_ctrl_c)
    r = CliRunner().invoke(main, ["-q", "compile", str(y), "-o", str(tmp_path / "o")])
    assert r.exit_code == 130, r.output
    assert "Aborted!" not in r.output and "Traceback" not in r.output
    partial = tmp_path / ".o.partial"
    assert (f"error: interrupted; the resume point (decoder layers 0-1 done) is kept in {partial}: "
            "run the same command to continue") in r.output
    assert sorted(p.name for p in partial.iterdir()) == ["resume"]      # no lock file, no half-written export
    monkeypatch.undo()
    r = CliRunner().invoke(main, ["-q", "compile", str(y), "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert not partial.exists() and (tmp_path / "o" / "model.safetensors").is_file()
    assert ".lock" not in json.loads((tmp_path / "o" / "quantc.json").read_text())["files"]


def test_a_signal_during_a_weight_read_is_an_interrupt_not_a_damaged_file(tiny_models, monkeypatch):
    """A signal can land while safetensors runs Python code for a read; the library then raises its own
    error. The lazy reader reports that as the interrupt (exit 130, the resume point named), not as a
    truncated file (exit 2), whether the library chains the KeyboardInterrupt or not."""
    import safetensors
    from quantc import errors
    from quantc.errors import QuantcError
    from quantc.lazy import WeightSource
    src = WeightSource(tiny_models["llama"])
    key = next(iter(src.index))
    real = safetensors.safe_open

    def chained(*a, **k):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise TypeError("could not determine the shape of object type 'torch.storage.UntypedStorage'")

    def flagged(*a, **k):
        errors.note_interrupt()            # what the CLI's handler does, before the library's own error
        raise RuntimeError("broken read")

    for fake in (chained, flagged):
        monkeypatch.setattr(safetensors, "safe_open", fake)
        with pytest.raises(KeyboardInterrupt):
            src.get(key)
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("bad file")))
    with pytest.raises(QuantcError, match="truncated or corrupt"):             # a real read error stays one
        src.get(key)
    monkeypatch.setattr(safetensors, "safe_open", real)
    assert src.get(key) is not None


def test_sigterm_ends_like_ctrl_c(tmp_path, tiny_tokenizer, calib_file):
    """`kill PID` mid-compile: the resume point is kept and named, the lock goes, exit 130; the same
    command then finishes the artifact."""
    import signal
    import time
    model = build_tiny("llama", tmp_path / "m6", tiny_tokenizer, layers=6, seed=6)
    y = write_yaml(tmp_path / "b.yaml", f"model: {model}\nquant: {{bits: 4, group_size: 32}}\n"
                                        f"calibration: {{source: {calib_file}, samples: 8, seq_len: 64}}\n")
    cmd = [sys.executable, "-m", "quantc.cli", "-q", "compile", str(y), "-o", str(tmp_path / "o")]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = tmp_path / ".o.partial" / "resume" / "state.json"
    deadline = time.time() + 120
    while not state.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    if p.returncode == 0:
        pytest.skip("the compile finished before the signal")
    assert p.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: interrupted; the resume point (decoder layer") and "run the same command" in last
    assert not (tmp_path / ".o.partial" / ".lock").exists()
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0 and "resuming after decoder layer" in r.stderr, r.stderr[-2000:]


def _measurement(cache):
    """The cached measurement, less its seconds (an interrupted run counts only its own)."""
    files = list((cache / "measurements").glob("*.json"))
    assert len(files) == 1, files
    ms = json.loads(files[0].read_text())
    ms["meta"].pop("seconds")
    return ms


def _measured_budget(tmp_path, model, calib_file, candidates: str, plan: str = "", extra: str = ""):
    """A budgeted config of a tiny model whose measurement takes seconds (`plan`: more plan keys)."""
    return write_yaml(tmp_path / "b.yaml", f"""model: {model}
quant: {{group_size: 32}}
candidates: [{candidates}]
budget: {{avg_bits: 3.5}}
plan: {{{plan}measure_samples: 5, alpha_samples: 2, alpha_seq_len: 32, probes: 2}}
calibration: {{source: {calib_file}, samples: 7, seq_len: 48, batch_size: 2}}
{extra}""")


@pytest.mark.parametrize("predictor", ["fisher", "exact"])
def test_a_measurement_killed_mid_sweep_resumes_to_the_same_measurement(tmp_path, tiny_tokenizer, calib_file,
                                                                          predictor):
    """Sweep 1 saves each finished layer beside the measurement cache: `quantc plan` killed after
    layer 1 (of 4), then run again, continues after it, and the measurement and the plan equal an
    uninterrupted run's. The resume state goes once the cache entry is written."""
    model = build_tiny("llama", tmp_path / "m4", tiny_tokenizer, layers=4, seed=3)
    y = _measured_budget(tmp_path, model, calib_file, "{bits: 2, sym: false}, {bits: 3}, {bits: 4}, "
                         "{bits: 4, sym: false}, {bits: 8}", f"predictor: {predictor}, ")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    plan = [sys.executable, "-m", "quantc", "-q", "plan", str(y), "-o"]
    r = subprocess.run(plan + [str(tmp_path / "p1")], env={**env, "QUANTC_CACHE": str(tmp_path / "c1")},
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    env2 = {**env, "QUANTC_CACHE": str(tmp_path / "c2")}
    r = subprocess.run(plan + [str(tmp_path / "p2")], env={**env2, "QUANTC_FAULT_AFTER_MEASURED_LAYER": "1"},
                       capture_output=True, text=True)
    assert r.returncode == -9
    partial = list((tmp_path / "c2" / "measurements").glob("partial-*"))
    assert len(partial) == 1 and sorted(f.name for f in partial[0].iterdir()) == ["layer-0.pt", "layer-1.pt", "state.pt"]
    assert not list((tmp_path / "c2" / "measurements").glob("*.json"))
    r = subprocess.run([sys.executable, "-m", "quantc", "plan", str(y), "-o", str(tmp_path / "p2")], env=env2,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "measurement: resuming after decoder layer 1" in r.stderr
    one, two = _measurement(tmp_path / "c2"), _measurement(tmp_path / "c1")
    assert one == two
    if predictor == "fisher":      # 4-bit asym is predicted from its anchor: the sample's solved errors are restored
        assert any("err_solved" in o for u in one["units"].values() for o in u["options"].values())
    assert (tmp_path / "p1" / "plan.yaml").read_text() == (tmp_path / "p2" / "plan.yaml").read_text()
    assert not list((tmp_path / "c2" / "measurements").glob("partial-*"))


def _offloaded_measurement(tmp_path, tiny_tokenizer, calib_file, candidates):
    """A budget with offload_activations over a 4-layer model whose measurement (cache c2) was killed
    after its last layer."""
    model = build_tiny("llama", tmp_path / "m4", tiny_tokenizer, layers=4, seed=3)
    y = _measured_budget(tmp_path, model, calib_file, candidates, extra="resources: {offload_activations: true}\n")
    _plan_killed_after(y, tmp_path / "c2", 3)
    return y


def _plan_killed_after(y, cache, layer: int) -> None:
    r = subprocess.run([sys.executable, "-m", "quantc", "-q", "plan", str(y), "-o", str(cache) + "-plan"],
                       env={**os.environ, "PYTHONWARNINGS": "ignore", "QUANTC_CACHE": str(cache),
                            "QUANTC_FAULT_AFTER_MEASURED_LAYER": str(layer)}, capture_output=True, text=True)
    assert r.returncode == -9, r.stderr[-2000:]


def test_a_resumed_measurement_keeps_offloaded_streams_in_files(tmp_path, tiny_tokenizer, calib_file, monkeypatch,
                                                                 caplog):
    """With resources.offload_activations, what a resumed measurement restores (every finished layer's
    held-out input, which the fisher backward sweep reads, and the perturbed streams) goes back into
    files, as in a measurement that was never stopped, and the measurement is the same. Stopped after
    the last layer: the head compares the restored streams themselves. The finished layers are handed
    over one at a time: when the next layer file is read, only the record being restored is still in
    memory, so no process loads every finished layer at once (at 8B width and 32 layers, 0.5 GiB of
    held-out inputs, and as much again pickled for the other ranks)."""
    import weakref
    from pathlib import Path

    import torch

    import quantc.passes.measure as qmeasure
    from quantc.config import load_config
    from quantc.pipeline import plan_only
    y = _offloaded_measurement(tmp_path, tiny_tokenizer, calib_file, "{bits: 2, sym: false}, {bits: 3}, {bits: 4}, {bits: 8}")
    seen = {}
    real_fisher, real_compared = qmeasure._fisher_diagonal, qmeasure._compared

    def fisher(model, head, held_in, *a, **k):
        seen["held_in"] = [h.untyped_storage().filename for h in held_in]
        return real_fisher(model, head, held_in, *a, **k)

    def compared(head, xh, streams, *a, **k):
        seen["streams"] = [v.untyped_storage().filename for v in streams.values()]
        return real_compared(head, xh, streams, *a, **k)
    monkeypatch.setattr(qmeasure, "_fisher_diagonal", fisher)
    monkeypatch.setattr(qmeasure, "_compared", compared)
    real_load, loaded, most = torch.load, [], []

    def load(f, *a, **k):
        obj = real_load(f, *a, **k)
        if Path(f).name.startswith("layer-"):
            most.append(sum(ref() is not None for ref in loaded))   # earlier layers' copies still alive
            loaded.append(weakref.ref(obj["held_in"]))
        return obj
    monkeypatch.setattr(torch, "load", load)
    ms = {}
    for cache in ("c2", "c1"):                    # resumed, then uninterrupted
        monkeypatch.setenv("QUANTC_CACHE", str(tmp_path / cache))
        caplog.clear()
        _, m, cached, _ = plan_only(load_config(y), progress=False, offload=tmp_path / f"offload-{cache}")
        assert not cached
        assert ("resuming after decoder layer 3" in caplog.text) == (cache == "c2")
        assert len(most) == 8 and max(most) <= 1, most    # 4 files checked, then 4 restored in turn
        ms[cache] = m.units
        assert len(seen["held_in"]) == 4 and all(f and "offload" in f for f in seen["held_in"]), (cache, seen)
        assert seen["streams"] and all(f and "offload" in f for f in seen["streams"]), (cache, seen)
    assert ms["c1"] == ms["c2"]


def test_a_layer_file_lost_during_a_resume_stops_the_run_with_one_clear_error(tmp_path, tiny_tokenizer,
                                                                              calib_file, monkeypatch):
    """The finished layers are read one at a time after the resume point was checked: a layer file
    removed in between (another run of the measurement finished and cleared it) stops every rank
    together with one error that says to run again, not a crash in one process and a hang in the others."""
    from quantc.config import load_config
    from quantc.errors import QuantcError
    from quantc.pipeline import plan_only
    from quantc.resume import MeasurePoint
    model = build_tiny("llama", tmp_path / "m", tiny_tokenizer, layers=3, seed=3)
    y = _measured_budget(tmp_path, model, calib_file, "{bits: 2, sym: false}, {bits: 4}")
    _plan_killed_after(y, tmp_path / "c", 1)
    real_check = MeasurePoint._layers_readable

    def check_then_lose(self, n):
        ok = real_check(self, n)
        (self.dir / "layer-1.pt").unlink()
        return ok
    monkeypatch.setattr(MeasurePoint, "_layers_readable", check_then_lose)
    monkeypatch.setenv("QUANTC_CACHE", str(tmp_path / "c"))
    with pytest.raises(QuantcError, match=r"layer-1\.pt: the measurement's resume point changed .* Run the same "
                                           r"command again"):
        plan_only(load_config(y), progress=False)


def test_a_new_measurement_names_the_resume_points_of_other_settings(tmp_path, tiny_tokenizer, calib_file,
                                                                      monkeypatch, caplog):
    """A measurement stopped, then started with other settings, leaves its resume point in the cache
    (the first settings may come back). The next measurement says how much they take and names them
    for deletion; its own point (here from a run stopped before) is not among them, and the folders
    are left as they are."""
    from quantc.config import load_config
    from quantc.pipeline import plan_only
    model = build_tiny("llama", tmp_path / "m", tiny_tokenizer, layers=2, seed=3)
    y = _measured_budget(tmp_path, model, calib_file, "{bits: 2, sym: false}, {bits: 4}")
    cache = tmp_path / "cache"
    monkeypatch.setenv("QUANTC_CACHE", str(cache))
    r = subprocess.run([sys.executable, "-m", "quantc", "-q", "plan", str(y), "-o", str(tmp_path / "p")],
                       env={**os.environ, "QUANTC_FAULT_AFTER_MEASURED_LAYER": "0"}, capture_output=True, text=True)
    assert r.returncode == -9
    own = list((cache / "measurements").glob("partial-*"))
    assert len(own) == 1
    old = cache / "measurements" / "partial-0123456789abcdef0123"
    old.mkdir(parents=True)
    (old / "state.pt").write_bytes(b"x" * (3 << 20))
    with caplog.at_level("WARNING", logger="quantc"):
        plan_only(load_config(y), progress=False)
    assert "1 resume point(s) of measurements with other settings take 3 MiB" in caplog.text
    note = next(r.getMessage() for r in caplog.records if "resume point(s)" in r.getMessage())
    assert note.endswith(f"rm -r {old}") and old.is_dir()        # its own (resumed, then cleared) is not named
    caplog.clear()
    (cache / "measurements" / "partial-0123456789abcdef0123" / "state.pt").unlink()
    old.rmdir()
    monkeypatch.setenv("QUANTC_CACHE", str(tmp_path / "cache2"))      # nothing else in the cache: no note
    with caplog.at_level("WARNING", logger="quantc"):
        plan_only(load_config(y), progress=False)
    assert "resume point" not in caplog.text
