"""Output staging: a compile (or `export onnx`) writes into a hidden folder beside its output,
`.NAME.partial/`, and renames it into place only when it is complete.

- One writer per output. `prepare_output` takes an OS lock (`fcntl.flock` on `.NAME.partial/.lock`,
  which records the holder's PID and command): a second run into the same `-o` stops at once with
  one line naming the process that holds it. The kernel drops the lock when its process dies, so a
  killed run never leaves a stale lock behind.
- No leftovers. When the run fails or is interrupted (`@cleans_up_output` around it), the partial
  folder and the parent folders this run created go, unless the folder holds a resume point; then it
  stays and a note on the exception (shown by the CLI, and in tracebacks) says where it is and that
  the same command continues.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import time
from functools import wraps
from pathlib import Path

from . import durable
from .errors import QuantcError

try:
    import fcntl
except ImportError:          # not POSIX: no lock (the rest works the same)
    fcntl = None

log = logging.getLogger("quantc")

LOCK_NAME = ".lock"          # inside the partial folder; never part of the output (see finalize_output)
RESUME_DIR = "resume"        # the quantize sweep's resume point (resume.Checkpoint)


def partial_folder(out: Path) -> Path:
    return Path(out).resolve().parent / f".{Path(out).name}.partial"


def resume_point(tmp: Path) -> int | None:
    """Decoder layers finished in the resume point kept in `tmp` (None: no resume point)."""
    try:
        st = json.loads((Path(tmp) / RESUME_DIR / "state.json").read_text())
        return int(st["next_layer"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resume_note(tmp: Path) -> str | None:
    n = resume_point(tmp)
    if n is None:
        return None
    done = "decoder layer 0" if n == 1 else f"decoder layers 0-{n - 1}"
    return f"the resume point ({done} done) is kept in {tmp}: run the same command to continue"


class Staging:
    """One prepared output: its partial folder, the held lock and the folders created for it."""

    def __init__(self, out: Path, tmp: Path, fd: int | None, created: list[Path]):
        self.out, self.tmp, self.fd, self.created = out, tmp, fd, created

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)            # closing the descriptor drops the flock
            self.fd = None
        if self in _active:
            _active.remove(self)

    def abandon(self) -> str | None:
        """The run failed: remove what it wrote, keep a resume point; return the note about it."""
        try:
            note = resume_note(self.tmp)
            if note is None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                for d in self.created:              # deepest first, only while empty
                    try:
                        d.rmdir()
                    except OSError:
                        break
            else:
                for p in self.tmp.iterdir():
                    if p.name not in (RESUME_DIR, LOCK_NAME):
                        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                (self.tmp / LOCK_NAME).unlink(missing_ok=True)
            return note
        finally:
            self.release()


_active: list[Staging] = []


def _holder(fd: int) -> str:
    # the holder writes its pid right after taking the lock: a run refused in that instant waits for it
    # (up to a second) so that the message still names the process
    for _ in range(20):
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):
            info = {}
        if info.get("pid"):
            break
        time.sleep(0.05)
    if not info.get("pid"):
        return "another quantc process"
    started = time.strftime("%H:%M:%S", time.localtime(info.get("started", 0)))
    host = "" if info.get("host") in (None, socket.gethostname()) else f" on {info['host']}"
    cmd = f": {info['command']}" if info.get("command") else ""
    return f"quantc process {info['pid']}{host}, started {started}{cmd}"


def _lock(tmp: Path, out: Path) -> int | None:
    """Create `tmp` and hold an exclusive lock on tmp/.lock (fails at once when another process has it)."""
    if fcntl is None:
        tmp.mkdir(exist_ok=True)
        return None
    for _ in range(10):
        tmp.mkdir(exist_ok=True)         # OSError: the caller says the output's folder is not writable
        try:
            fd = os.open(tmp / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:        # another run removed the folder just now: try again
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _holder(fd)
            os.close(fd)
            raise QuantcError(f"{out} is being written by {who}; wait for it to finish or choose another -o "
                              f"(its work folder is {tmp})") from None
        except OSError as e:             # a file system without locks: go on unlocked, say so
            log.warning("cannot lock %s (%s); make sure no other run writes %s", tmp, e.strerror, out)
            return fd
        try:                             # the file may have been removed (its holder finished) before flock
            same = os.stat(tmp / LOCK_NAME).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                    "command": " ".join(["quantc", *sys.argv[1:]]) if sys.argv and "quantc" in sys.argv[0] else ""}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            return fd
        os.close(fd)
    raise QuantcError(f"cannot lock {tmp}: another process keeps replacing it; try again")


def _check_replaceable(out: Path, marker: str) -> None:
    """--force replaces an earlier output, not any folder (a typo in -o must not delete a home folder)."""
    if out.is_dir() and any(out.iterdir()) and not (out / marker).is_file():
        raise QuantcError(f"{out} exists and is not an output of quantc (no {marker}); --force only replaces "
                          "an earlier output: remove the folder yourself or choose another -o")


def prepare_output(out: str | Path, force: bool, marker: str = "quantc.json") -> Path:
    """Check the output path now (before hours of work), lock it against a second run, and return the
    temporary folder beside it (a resume point in it is kept; everything else there is cleared)."""
    out = Path(out)
    if out.exists() and not force:
        raise QuantcError(f"{out} already exists; pass --force to overwrite it or choose another -o")
    if out.exists():
        _check_replaceable(out, marker)
    parent = out.resolve().parent
    created = []
    p = parent
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QuantcError(f"cannot create the output folder's parent {parent}: {e.strerror}") from None
    if not os.access(parent, os.W_OK):
        _remove_empty(created)
        raise QuantcError(f"{parent} is not writable; choose another output folder with -o")
    tmp = partial_folder(out)
    try:
        fd = _lock(tmp, out)
    except QuantcError:
        _remove_empty(created)
        raise
    except OSError as e:
        _remove_empty(created)
        raise QuantcError(f"cannot write the output beside {out} ({e.strerror}); choose a writable folder with -o") from None
    st = Staging(out, tmp, fd, created)
    _active.append(st)
    try:
        if out.exists() and not force:   # again, under the lock: a run that just finished wrote it
            raise QuantcError(f"{out} already exists; pass --force to overwrite it or choose another -o")
        for p in tmp.iterdir():          # drop everything but the resume point and the lock
            if p.name not in (RESUME_DIR, LOCK_NAME):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        (tmp / ".write-test").write_bytes(b"")
        (tmp / ".write-test").unlink()
    except OSError as e:
        st.abandon()
        raise QuantcError(f"cannot write the output beside {out} ({e.strerror}); choose a writable folder with -o") from None
    except BaseException:
        st.abandon()
        raise
    return tmp


def _remove_empty(dirs: list[Path]) -> None:
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            break


def staged_files(tmp: Path):
    """The output's files in the partial folder (not the lock, the resume point or offloaded activations)."""
    for p in sorted(Path(tmp).rglob("*")):
        parts = set(p.relative_to(tmp).parts)
        if p.is_file() and not {RESUME_DIR, "offload", LOCK_NAME} & parts:
            yield p


def finalize_output(tmp: Path, out: Path) -> None:
    """Rename the finished temporary folder into place (the old output, if any, only goes now), then
    drop the lock. The folder is renamed with the lock file inside and still locked, so a run that
    starts meanwhile finds either the locked folder or the finished output, never a half-moved one."""
    out = Path(out)
    tmp = Path(tmp)
    st = next((s for s in _active if s.tmp == tmp.resolve() or s.tmp == tmp), None)
    # every file's bytes on the disk before the rename names them (not the resume point's and the
    # offloaded activations', which go once the output is in place; the resume point syncs its own)
    durable.sync_tree(tmp, skip=(RESUME_DIR, "offload"))
    if out.exists():
        old = out.parent / f".{out.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    durable.fsync(out.parent)                # and the rename itself
    (out / LOCK_NAME).unlink(missing_ok=True)
    if st is not None:
        st.created = []
        st.release()


def cleans_up_output(fn):
    """Around a function that prepares outputs: if it fails (any exception, Ctrl-C included), every
    output it prepared and did not finalize is abandoned (see Staging.abandon); a kept resume point
    is noted on the exception (`e.__notes__`)."""
    @wraps(fn)
    def wrapper(*a, **k):
        n = len(_active)
        try:
            return fn(*a, **k)
        except BaseException as e:
            while len(_active) > n:
                note = _active[-1].abandon()
                if note:
                    add_note(e, note)
            raise
        finally:                         # returned without finalizing (a bug): still no lock, no leftovers
            while len(_active) > n:
                _active[-1].abandon()
    return wrapper


def add_note(e: BaseException, note: str) -> None:
    if hasattr(e, "add_note"):
        e.add_note(note)
    else:                                # Python 3.10
        e.__notes__ = [*getattr(e, "__notes__", []), note]


def check_writable(path: str | Path, what: str = "output") -> None:
    """A file or folder that will be written only after long work: a file can be created in its nearest
    existing folder now (tried, then removed; nothing else is created)."""
    import tempfile
    p = Path(path).resolve()
    q = p if p.is_dir() else p.parent
    while not q.exists():
        q = q.parent
    try:
        with tempfile.TemporaryFile(dir=q):
            pass
    except OSError as e:
        raise QuantcError(f"{path}: the {what} cannot be written ({q}: {e.strerror}); choose another path") from None
