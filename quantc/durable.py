"""Durable writes: the one home of how quantc puts a file or a folder in place.

Every file quantc keeps (artifact shards, resume points, cached measurements, plans, calibration
tokens) is written under a temporary name and renamed over its target. The rename alone is atomic
for other processes, but not across a power cut: a file system may commit the new name before the
file's bytes (ext4 with `data=writeback`, XFS), so the target can come back empty, and the rename
itself sits in the folder's page cache until that is flushed. So before a rename the new bytes are
flushed to the disk (fsync), and after it the folder that holds the name.
"""
from __future__ import annotations

import os
from pathlib import Path


def fsync(path: str | Path) -> None:
    """Flush a file's bytes, or a folder's entries, to the disk. Folders cannot be opened for this on
    Windows (nothing to do there: its renames are not ordered this way); a file system that refuses to
    sync a folder (EINVAL) has nothing to flush for it."""
    path = Path(path)
    if os.name == "nt" and path.is_dir():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def replace(tmp: str | Path, path: str | Path) -> None:
    """Rename the finished file or folder `tmp` over `path` so that after a crash or a power cut the
    target is either the old one or the whole new one."""
    tmp, path = Path(tmp), Path(path)
    sync_tree(tmp) if tmp.is_dir() else fsync(tmp)
    os.replace(tmp, path)
    fsync(path.parent)


def write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` durably, through a temporary file of this process (two processes writing
    one path each write their own, and the last rename wins)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sync_tree(folder: str | Path) -> None:
    """fsync every file under `folder`, then every folder, deepest first, `folder` last."""
    folder = Path(folder)
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            p = Path(root) / name
            if not p.is_symlink():
                fsync(p)
        fsync(root)
