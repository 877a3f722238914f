"""torchrun with 2 gloo processes: the artifact (plan included) is bit-identical to one process's; a
rank that dies stops the run with a clear message, and the same command resumes to the same bits."""
import json
import re
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import build_tiny, write_yaml
from quantc.distributed import SOLO, World

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None and sys.platform != "linux",
                                reason="needs torch.distributed.run")

SAME_THREADS = {"OMP_NUM_THREADS": "1"}     # torchrun gives each rank 1 thread: one process gets the same


def _env(**extra):
    return {**os.environ, "PYTHONWARNINGS": "ignore", **SAME_THREADS, **extra}


def _torchrun(n, args, port, **env):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
                           "--master-port", str(port), "-m", "quantc", "-q", *args],
                          capture_output=True, text=True, env=_env(**env), timeout=600)


def _budget(tmp_path, tiny_tokenizer, calib_file, qep, predictor="fisher"):
    model = build_tiny("llama", tmp_path / "m", tiny_tokenizer, layers=3, seed=7)
    # fisher without QEP also carries the uniform plans' streams (over the ranks, and in the resume state)
    check = ", check_uniform: true" if predictor == "fisher" and qep == 0.0 else ""
    return write_yaml(tmp_path / "b.yaml", f"""model: {model}
quant: {{group_size: 32, qep_alpha: {qep}}}
candidates: [{{bits: 2, sym: false}}, {{bits: 3}}, {{bits: 4}}, {{bits: 8}}]
budget: {{avg_bits: 3.5}}
plan: {{measure_samples: 5, alpha_samples: 2, alpha_seq_len: 32, probes: 3, predictor: {predictor}{check}}}
calibration: {{source: {calib_file}, samples: 7, seq_len: 48, batch_size: 2}}
""")


def _diagnostics(ms):
    """The layer diagnostics, with the spectra rounded: their Gram matrices are all-reduced in a
    distributed run, so those two report-only numbers differ from one process's in the last digits
    (passes/measure.py _diagnostics); the rest is exact."""
    return [{k: round(v, 9) if k in ("effective_rank", "topk_energy_gain") else v for k, v in layer.items()}
            for layer in ms["layers"]]


def _same_artifact(a, b):
    for f in ("model.safetensors", "config.json", "quantize_config.json", "plan.yaml"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


@pytest.mark.parametrize("qep,predictor", [(0.0, "fisher"), (0.5, "fisher"), (0.0, "exact")])
def test_two_gloo_processes_give_the_bits_of_one(tmp_path, tiny_tokenizer, calib_file, qep, predictor, monkeypatch):
    # 7 samples in batches of 2: 4 batches, split 2/2 with an uneven last batch (1 row); 3 probes, 2/1
    monkeypatch.setenv("QUANTC_CACHE", str(tmp_path / "cache1"))
    y = _budget(tmp_path, tiny_tokenizer, calib_file, qep, predictor)
    r = subprocess.run([sys.executable, "-m", "quantc", "-q", "compile", str(y), "-o", str(tmp_path / "one")],
                       capture_output=True, text=True, env=_env(QUANTC_CACHE=str(tmp_path / "c1")))
    assert r.returncode == 0, r.stderr[-3000:]
    r = _torchrun(2, ["compile", str(y), "-o", str(tmp_path / "two")], 29511 + int(qep * 10) + 60 * (predictor == "exact"),
                  QUANTC_CACHE=str(tmp_path / "c2"))          # measured again, not read from a cache
    assert r.returncode == 0, r.stderr[-3000:]
    _same_artifact(tmp_path / "one", tmp_path / "two")
    plan = (tmp_path / "two" / "plan.yaml").read_text()
    assert "bits: 2" in plan or "bits: 3" in plan            # a real mixed plan, not uniform 4-bit
    assert not list(tmp_path.glob("c2/measurements/*.tmp"))
    assert len(list((tmp_path / "c2" / "measurements").glob("*.json"))) == 1  # rank 0 alone wrote the measurement cache
    # the ranks split the work: sweep 1's units and sweep 2's linears, each solved once, round-robin
    # within a layer (sweep 2: 4 of a layer's 7 linears on rank 0, since o and down are groups of one)
    ms = json.loads(next((tmp_path / "c2" / "measurements").glob("*.json")).read_text())
    one = json.loads(next((tmp_path / "c1" / "measurements").glob("*.json")).read_text())
    assert one["units"] == ms["units"]             # the measurement itself, to the last digit
    assert _diagnostics(one) == _diagnostics(ms)
    assert one["meta"].get("calibration") == ms["meta"].get("calibration")     # fisher: the sample, uniform plans
    manifest = json.loads((tmp_path / "two" / "quantc.json").read_text())
    split = {**manifest["distributed"]["solves_per_rank"], "streams": manifest["distributed"]["held_out_streams_per_rank"]}
    for sweep, total in (("measure", len(ms["units"])), ("quantize", manifest["totals"]["modules"]),
                         ("streams", ms["meta"]["held_out_streams"])):   # each perturbed held-out stream once
        assert sum(split[sweep]) == total and min(split[sweep]) >= total // 3, (sweep, split, total)
    from quantc.config import load_config
    from quantc.memory import held_out_streams
    assert held_out_streams(load_config(y), 3) == ms["meta"]["held_out_streams"]     # what the estimate counts
    assert json.loads((tmp_path / "one" / "quantc.json").read_text())["distributed"] is None


def test_ranks_without_a_batch_still_give_the_bits_of_one(tmp_path, tiny_tokenizer, calib_file):
    """More processes than batches: 5 samples in batches of 2 are 3 batches (measurement and
    calibration alike), so the 4th rank has none in either sweep and only joins the collectives."""
    model = build_tiny("llama", tmp_path / "m", tiny_tokenizer, layers=2, seed=3)
    y = write_yaml(tmp_path / "b.yaml", f"""model: {model}
quant: {{group_size: 32}}
candidates: [{{bits: 2, sym: false}}, {{bits: 4}}]
budget: {{avg_bits: 3.5}}
plan: {{measure_samples: 5, alpha_samples: 1, alpha_seq_len: 32, probes: 1}}
calibration: {{source: {calib_file}, samples: 5, seq_len: 32, batch_size: 2}}
""")
    r = subprocess.run([sys.executable, "-m", "quantc", "-q", "compile", str(y), "-o", str(tmp_path / "one")],
                       capture_output=True, text=True, env=_env(QUANTC_CACHE=str(tmp_path / "c1")))
    assert r.returncode == 0, r.stderr[-3000:]
    r = _torchrun(4, ["compile", str(y), "-o", str(tmp_path / "four")], 29541, QUANTC_CACHE=str(tmp_path / "c4"))
    assert r.returncode == 0, r.stderr[-3000:]
    _same_artifact(tmp_path / "one", tmp_path / "four")


def test_a_dead_rank_stops_the_run_and_the_same_command_resumes(tmp_path, tiny_tokenizer, calib_file):
    y = _budget(tmp_path, tiny_tokenizer, calib_file, 0.0)
    cache = str(tmp_path / "c")
    r = subprocess.run([sys.executable, "-m", "quantc", "-q", "compile", str(y), "-o", str(tmp_path / "one")],
                       capture_output=True, text=True, env=_env(QUANTC_CACHE=cache))
    assert r.returncode == 0, r.stderr[-3000:]
    args = ["compile", str(y), "-o", str(tmp_path / "two")]
    r = _torchrun(2, args, 29531, QUANTC_CACHE=cache, QUANTC_FAULT_AFTER_LAYER="1", QUANTC_FAULT_RANK="1")
    assert r.returncode != 0
    assert re.search(r"rank\s*:\s*1\b", r.stderr) and "SIGKILL" in r.stderr   # torchrun names the dead rank
    state = json.loads((tmp_path / ".two.partial" / "resume" / "state.json").read_text())
    assert state["next_layer"] >= 1
    assert not (tmp_path / "two").exists()
    r = _torchrun(2, args, 29532, QUANTC_CACHE=cache)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming after decoder layer" in r.stderr
    _same_artifact(tmp_path / "one", tmp_path / "two")


def test_shares_cover_every_batch_once():
    for n_batches in (1, 4, 7):
        for size in (1, 2, 3):
            ranges = [World(r, size).share(n_batches) for r in range(size)]
            assert [b for r in ranges for b in r] == list(range(n_batches))
    tokens = torch.arange(7 * 3).reshape(7, 3)
    rows = torch.cat([World(r, 2).local_rows(tokens, 2) for r in range(2)])
    assert torch.equal(rows, tokens)
    assert SOLO.local_rows(tokens, 2) is tokens and not SOLO.active


def test_hessian_sum_does_not_depend_on_how_batches_are_grouped():
    """The property the distributed run rests on: per-batch float32 products summed in float64."""
    from quantc.calibration.hessian import Hessian
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 48, 64, generator=g) * (1 + 10 * i) for i in range(5)]
    whole = Hessian(64)
    for x in xs:
        whole.add(x)
    a, b = Hessian(64), Hessian(64)
    for x in xs[:2]:
        a.add(x)
    for x in xs[2:]:
        b.add(x)
    a.sum += b.sum                  # what the all-reduce of two ranks does
    a.n += b.n
    assert torch.equal(whole.H, a.H)


def test_the_memory_check_counts_every_process_on_the_host(tmp_path, tiny_tokenizer, calib_file, monkeypatch):
    """torchrun --nproc-per-node N: the N processes share one MemAvailable. Memory for one process's
    compile is not enough for two on the same host (each checked the whole host's memory before)."""
    from quantc import memory
    from quantc.config import load_config
    from quantc.errors import QuantcError
    cfg = load_config(_budget(tmp_path, tiny_tokenizer, calib_file, 0.5))
    for k in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK"):
        monkeypatch.delenv(k, raising=False)
    one = memory.memory_estimate(cfg)["total"]
    monkeypatch.setattr(memory, "available_memory", lambda: int(1.5 * one))
    memory.check_memory(cfg)                            # one process fits
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(QuantcError, match="2 processes on this host.*--nproc-per-node"):
        memory.check_memory(cfg)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")         # one per host (--nnodes 2): each host fits
    monkeypatch.setenv("GROUP_RANK", "1")
    memory.check_memory(cfg)
    # rank 0's host also gathers every rank's rows of the resume point: it needs more than the other
    rank0, other = memory.memory_estimate(cfg, 2)["total"], memory.memory_estimate(cfg, 2, gathers=False)["total"]
    assert rank0 > other
    monkeypatch.setattr(memory, "available_memory", lambda: (rank0 + other) // 2)
    memory.check_memory(cfg)
    monkeypatch.setenv("GROUP_RANK", "0")
    with pytest.raises(QuantcError):
        memory.check_memory(cfg)


def test_a_ranks_share_is_counted_in_whole_batches(tmp_path, tiny_tokenizer, calib_file):
    """7 sequences in batches of 2 (4 batches): 2 or 3 ranks each hold up to 2 batches (4 rows), 4 ranks
    one batch; the memory count follows World.share, not samples / ranks."""
    import json as js
    from quantc.config import load_config
    from quantc.memory import activation_bytes
    cfg = load_config(_budget(tmp_path, tiny_tokenizer, calib_file, 0.5))
    mc = js.loads((tmp_path / "m" / "config.json").read_text())
    q = {r: activation_bytes(cfg, mc, r)["quantize"] for r in (1, 2, 3, 4)}
    c = cfg.calibration                  # one process is rank 0: it also carries the held-out check's streams
    check = 4 * c.check_samples * c.seq_len * mc["hidden_size"] * 4
    assert check > 0 and q[2] == q[3] == 2 * q[4] and q[1] - check == q[4] * 7 / 2


def test_on_gpus_host_tensors_and_objects_go_through_gloo(monkeypatch):
    """On GPUs the group pairs nccl (CUDA tensors) with gloo (host tensors): torch runs the object
    collectives on the cpu backend, so the resume point's gather of a layer's activations does not
    pass through rank 0's GPU (with nccl alone it did). On CPUs: gloo."""
    import torch.distributed as dist
    from quantc import distributed
    asked = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **k: asked.append(backend))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: asked.append(f"set {i}"))
    assert distributed.join(torch.device("cuda")) == World(1, 2, 1)
    assert asked == ["set 1", "cpu:gloo,cuda:nccl"]
    asked.clear()
    distributed.join(torch.device("cpu"))
    assert asked == ["gloo"]


def test_a_run_stopped_under_torchrun_resumes_in_one_process(tmp_path, tiny_tokenizer, calib_file):
    """'Run the same command again (with any number of processes)': a 2-rank compile killed after layer 1
    finishes in a plain one-process compile, with the bits of an uninterrupted one. The resume point
    holds only finished layers' shards and the rows every rank gathered to rank 0."""
    y = _budget(tmp_path, tiny_tokenizer, calib_file, 0.5)
    cache = str(tmp_path / "c")
    one = ["-m", "quantc", "-q", "compile", str(y), "-o"]
    r = subprocess.run([sys.executable, *one, str(tmp_path / "one")], capture_output=True, text=True,
                       env=_env(QUANTC_CACHE=cache))
    assert r.returncode == 0, r.stderr[-3000:]
    r = _torchrun(2, ["compile", str(y), "-o", str(tmp_path / "two")], 29545, QUANTC_CACHE=cache,
                  QUANTC_FAULT_AFTER_LAYER="1", QUANTC_FAULT_RANK="1")
    assert r.returncode != 0 and not (tmp_path / "two").exists()
    assert json.loads((tmp_path / ".two.partial" / "resume" / "state.json").read_text())["next_layer"] >= 1
    r = subprocess.run([sys.executable, "-m", "quantc", "compile", str(y), "-o", str(tmp_path / "two")],
                       capture_output=True, text=True, env=_env(QUANTC_CACHE=cache))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming after decoder layer" in r.stderr
    _same_artifact(tmp_path / "one", tmp_path / "two")


def test_two_nodes_give_the_bits_of_one_process(tmp_path, tiny_tokenizer, calib_file):
    """`torchrun --nnodes 2`: two launches (two "machines", here on one host, each its own torchrun
    agent with one process and LOCAL_RANK 0) meet through the static rendezvous at --master-addr."""
    y = _budget(tmp_path, tiny_tokenizer, calib_file, 0.5)
    r = subprocess.run([sys.executable, "-m", "quantc", "-q", "compile", str(y), "-o", str(tmp_path / "one")],
                       capture_output=True, text=True, env=_env(QUANTC_CACHE=str(tmp_path / "c1")))
    assert r.returncode == 0, r.stderr[-3000:]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(k),
                               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", "29551",
                               "-m", "quantc", "-q", "compile", str(y), "-o", str(tmp_path / "two")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(QUANTC_CACHE=str(tmp_path / "c2")))
             for k in (0, 1)]
    outs = [p.communicate(timeout=600) for p in nodes]
    for p, (_, err) in zip(nodes, outs):
        assert p.returncode == 0, err[-3000:]
    _same_artifact(tmp_path / "one", tmp_path / "two")
    split = json.loads((tmp_path / "two" / "quantc.json").read_text())["distributed"]["solves_per_rank"]
    assert all(min(v) > 0 for v in split.values()), split


def test_rank_0_alone_samples_self_calibration_and_sends_it(tmp_path, tiny_tokenizer):
    """`calibration.source: self` needs the whole model in memory: rank 0 samples and broadcasts the
    tokens, so the other ranks hold one layer at a time (and the memory check counts them so). The
    artifact is one process's. The others wait for the tokens past QUANTC_DIST_TIMEOUT_S (3 s here,
    half the sampling), which is there to catch a dead rank, not a busy one."""
    from quantc.config import load_config
    from quantc.memory import memory_estimate
    model = build_tiny("llama", tmp_path / "m", tiny_tokenizer, layers=2, seed=5)
    y = write_yaml(tmp_path / "b.yaml", f"""model: {model}
quant: {{group_size: 32}}
calibration: {{source: self, samples: 192, seq_len: 256, batch_size: 16}}
""")
    cfg = load_config(y)
    assert memory_estimate(cfg, 2, gathers=False)["weights"] < memory_estimate(cfg, 2)["weights"]
    r = subprocess.run([sys.executable, "-m", "quantc", "-q", "compile", str(y), "-o", str(tmp_path / "one")],
                       capture_output=True, text=True, env=_env(QUANTC_CACHE=str(tmp_path / "c1")))
    assert r.returncode == 0, r.stderr[-3000:]
    r = _torchrun(2, ["compile", str(y), "-o", str(tmp_path / "two")], 29561, QUANTC_DIST_TIMEOUT_S="3",
                  QUANTC_CACHE=str(tmp_path / "c2"))         # its own cache: sampled again, not read
    assert r.returncode == 0, r.stderr[-3000:]
    # one process sampled: rank 0, the calibration's text and then the held-out check's
    assert r.stderr.count("sampling calibration text:   0%") == 2, r.stderr[-3000:]
    for f in ("model.safetensors", "config.json", "quantize_config.json"):
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f


def test_a_measurement_stopped_under_torchrun_resumes_in_one_process(tmp_path, tiny_tokenizer, calib_file):
    """Sweep 1's resume state holds every rank's calibration rows (gathered by rank 0): a 2-rank
    `quantc plan` whose rank 1 dies after measured layer 0 resumes under 2 ranks, dies again after
    layer 1, and finishes in one process, with the plan and the measurement of an uninterrupted run."""
    y = _budget(tmp_path, tiny_tokenizer, calib_file, 0.0)
    r = subprocess.run([sys.executable, "-m", "quantc", "-q", "plan", str(y), "-o", str(tmp_path / "p1")],
                       capture_output=True, text=True, env=_env(QUANTC_CACHE=str(tmp_path / "c1")))
    assert r.returncode == 0, r.stderr[-3000:]
    for port, layer in ((29581, "0"), (29582, "1")):
        r = _torchrun(2, ["plan", str(y), "-o", str(tmp_path / "p2")], port, QUANTC_CACHE=str(tmp_path / "c2"),
                      QUANTC_FAULT_AFTER_MEASURED_LAYER=layer, QUANTC_FAULT_RANK="1")
        assert r.returncode != 0
        assert (layer == "0") != ("measurement: resuming after decoder layer 0" in r.stderr)
    r = subprocess.run([sys.executable, "-m", "quantc", "plan", str(y), "-o", str(tmp_path / "p2")],
                       capture_output=True, text=True, env=_env(QUANTC_CACHE=str(tmp_path / "c2")))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "measurement: resuming after decoder layer 1" in r.stderr
    assert (tmp_path / "p1" / "plan.yaml").read_text() == (tmp_path / "p2" / "plan.yaml").read_text()
    one, two = (json.loads(next((tmp_path / c / "measurements").glob("*.json")).read_text()) for c in ("c1", "c2"))
    assert one["units"] == two["units"]
    assert _diagnostics(one) == _diagnostics(two)
    assert one["meta"]["calibration"] == two["meta"]["calibration"]     # the restored sample and uniform streams
    assert all("uniform_measured" in c for c in two["meta"]["calibration"].values())
