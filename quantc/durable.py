"""Durable writes: the one home of how quantc puts a file or a folder in place.

Every file quantc keeps (artifact shards, resume points, cached measurements, plans, calibration
tokens) is written under a temporary name and renamed over its target. The rename alone is atomic
for other processes, but not across a power cut: a file system may commit the new name before the
file's bytes (ext4 with `data=writeback`, XFS), so the target can come back empty, and the rename
itself sits in the folder's page cache until that is flushed. So before a rename the new bytes are
flushed to the disk (fsync), and after it the folder that holds the name.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

# a folder (or a read-only file) that cannot be opened or synced this way: the platform or file system
# has nothing to flush for it (Windows opens no folders and flushes no read-only handle; some file
# systems answer EINVAL for folders); a real I/O error (EIO, ENOSPC) still raises
_NO_FOLDER_SYNC = {errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES, errno.EPERM, errno.EISDIR}


def fsync(path: str | Path) -> None:
    """Flush a file's bytes, or a folder's entries, to the disk. A file is opened for writing where it
    may be (Windows flushes only such handles), else read-only (a read-only file copied into an output,
    as a tokenizer file from a read-only model folder: POSIX flushes it through any handle); a folder
    read-only, where the platform allows it."""
    path = Path(path)
    folder = path.is_dir()
    if folder and os.name == "nt":
        return
    read_only = folder
    try:
        try:
            fd = os.open(path, os.O_RDONLY if folder else os.O_RDWR)
        except PermissionError:
            if folder:
                raise
            fd, read_only = os.open(path, os.O_RDONLY), True
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        if not (read_only and e.errno in _NO_FOLDER_SYNC):
            raise


def replace(tmp: str | Path, path: str | Path) -> None:
    """Rename the finished file or folder `tmp` over `path` so that after a crash or a power cut the
    target is either the old one or the whole new one."""
    tmp, path = Path(tmp), Path(path)
    sync_tree(tmp) if tmp.is_dir() else fsync(tmp)
    os.replace(tmp, path)
    fsync(path.parent)


def write(path: str | Path, fill) -> None:
    """Make `path` durably: `fill(tmp)` writes the new file under a temporary name of this process (two
    processes writing one path each write their own, and the last rename wins), which then replaces
    `path`; a failure or an interrupt (a full disk, Ctrl-C) leaves no half-written copy behind."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        fill(tmp)
        replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` durably (`write`)."""
    write(path, lambda tmp: tmp.write_text(text))


def sync_tree(folder: str | Path, skip: tuple[str, ...] = ()) -> None:
    """fsync every file under `folder`, then every folder, deepest first, `folder` last; the top-level
    entries named in `skip` are left out."""
    folder = Path(folder)
    for root, dirs, files in os.walk(folder, topdown=False):
        if Path(root) != folder and Path(root).relative_to(folder).parts[0] in skip:
            continue
        for name in files:
            if Path(root) == folder and name in skip:
                continue
            p = Path(root) / name
            if not p.is_symlink():
                fsync(p)
        fsync(root)
