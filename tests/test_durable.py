"""Durable writes (quantc/durable.py): a file's or a folder's bytes reach the disk before the rename
that names them, and the rename itself after it, in every writer that puts outputs in place."""
from __future__ import annotations

import os

import torch

from quantc import durable, staging, tensorfile


def _record(monkeypatch):
    """Log fsync(path) and os.replace(src, dst) in the order they happen (both still run)."""
    events, real_fsync, real_replace = [], durable.fsync, os.replace

    def fsync(p):
        events.append(("fsync", os.path.realpath(p)))
        real_fsync(p)

    def replace(a, b):
        events.append(("replace", os.path.realpath(a), os.path.realpath(b)))
        real_replace(a, b)
    monkeypatch.setattr(durable, "fsync", fsync)
    monkeypatch.setattr(durable.os, "replace", replace)
    return events


def test_a_file_is_synced_before_its_rename_and_its_folder_after(tmp_path, monkeypatch):
    events = _record(monkeypatch)
    target = tmp_path / "plan.yaml"
    durable.write_text(target, "a: 1\n")
    assert target.read_text() == "a: 1\n" and list(tmp_path.iterdir()) == [target]
    (i,) = [k for k, e in enumerate(events) if e[0] == "replace"]
    tmp = events[i][1]
    assert ("fsync", tmp) in events[:i]
    assert ("fsync", str(tmp_path.resolve())) in events[i + 1:]


def test_a_safetensors_file_goes_through_the_durable_rename(tmp_path, monkeypatch):
    events = _record(monkeypatch)
    x = torch.arange(6, dtype=torch.float32)
    tensorfile.write(tmp_path / "w.safetensors", {"x": tensorfile.tensor_entry(lambda: x, x.dtype, tuple(x.shape))})
    kinds = [e[0] for e in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    assert events[1][2] == str((tmp_path / "w.safetensors").resolve())


def test_the_staged_output_is_on_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    out = tmp_path / "out"
    tmp = staging.prepare_output(out, force=False)
    (tmp / "sub").mkdir()
    files = [tmp / "model.safetensors", tmp / "quantc.json", tmp / "sub" / "tokenizer.json"]
    for f in files:
        f.write_text(f.name)
    events = _record(monkeypatch)
    staging.finalize_output(tmp, out)
    (i,) = [k for k, e in enumerate(events) if e[0] == "replace"]
    synced = {e[1] for e in events[:i]}
    assert {os.path.realpath(f) for f in files} <= synced
    assert {os.path.realpath(tmp), os.path.realpath(tmp / "sub")} <= synced
    assert ("fsync", str(tmp_path.resolve())) in events[i + 1:]
    assert sorted(p.name for p in out.rglob("*")) == sorted(["model.safetensors", "quantc.json", "sub", "tokenizer.json"])



def test_a_read_only_file_in_the_output_is_synced_too(tmp_path, monkeypatch):
    """A file copied with its mode from a read-only model folder (a tokenizer file) cannot be opened for
    writing: it is synced through a read-only handle, and the output still goes into place. (Opening
    it for writing is refused here by a stand-in, since the tests may run as root.)"""
    out = tmp_path / "out"
    tmp = staging.prepare_output(out, force=False)
    f = tmp / "tokenizer.json"
    f.write_text("{}")
    real_open, opened = os.open, []

    def guarded(path, flags, *a, **k):
        if os.path.basename(path) == "tokenizer.json" and flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(13, "Permission denied", str(path))
        opened.append((os.path.basename(path), flags))
        return real_open(path, flags, *a, **k)
    monkeypatch.setattr(durable.os, "open", guarded)
    staging.finalize_output(tmp, out)
    assert ("tokenizer.json", os.O_RDONLY) in opened
    assert (out / "tokenizer.json").read_text() == "{}"
