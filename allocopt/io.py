"""Atomic file and directory writes (an interrupted or failed write never leaves a half-written output), and JSON
reads that fail in one line."""
from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from allocopt import defaults
from allocopt.errors import AllocoptError


def ensure_writable_dir(directory: str | os.PathLike) -> Path:
    """Create ``directory`` (and parents) or say in one line why it cannot hold outputs."""
    directory = Path(directory)
    blocker = next((p for p in (directory, *directory.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise AllocoptError(f"cannot create output directory {directory}: {blocker} is a file, not a directory; "
                            "choose a writable location")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AllocoptError(f"cannot create output directory {directory}: {exc.strerror}; choose a writable location") from exc
    if not os.access(directory, os.W_OK):
        raise AllocoptError(f"output directory {directory} is not writable; choose a writable location")
    return directory


@contextlib.contextmanager
def output_dir(directory: str | os.PathLike) -> Iterator[Path]:
    """:func:`ensure_writable_dir` for one job: if the job fails before writing anything into the directories
    this created, they are removed again, so a failed command leaves no empty run folder behind."""
    directory = Path(directory)
    new = [p for p in (directory, *directory.parents) if not p.exists()]     # what mkdir(parents=True) will create
    ensure_writable_dir(directory)
    try:
        yield directory
    except BaseException:
        for folder in new:                                                      # innermost first
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


LOCK_FILE = ".allocopt.lock"


@contextlib.contextmanager
def exclusive(path: Path, held: str, what: str, fix: str) -> Iterator[None]:
    """Hold something (``held``: "run directory X", "study Y") for this process alone while the block runs: a second
    process (or a second job in this one) gets one AllocoptError naming the holder (pid, host, start time), ``what``
    it is doing and the ``fix``.

    The lock is an advisory ``flock`` on the file ``path`` (e.g. ``run_dir/.allocopt.lock``), released by the kernel
    if the holder dies, so a killed run never leaves anything locked; the file is removed when the block ends, and
    a lock taken on a file that was removed meanwhile is taken again on the new one.
    """
    path = Path(path)
    while True:
        fh = open(path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise AllocoptError(f"{held} is in use by {holder} ({what}); {fix}") from None
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino:
            break
        fh.close()                                       # the holder removed the file as we opened it: again
    try:
        fh.seek(0), fh.truncate()
        fh.write(f"pid {os.getpid()} on {host_name()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        fh.flush()
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        fh.close()


def host_name() -> str:
    """This machine's name in lock files, temp folders and worker ids: ``$ALLOCOPT_HOST`` (two machines that share a
    name, or a test playing another host), else the host name."""
    return os.environ.get(defaults.HOST_ENV) or socket.gethostname()


def _host() -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in host_name())


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (another user's process counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                               # someone else's process: alive
        return True
    return True


def read_json(path: str | os.PathLike, source: str, remedy: str) -> Any:
    """The JSON value in ``path``; a file that is not UTF-8 text or not JSON is one AllocoptError line "``source`` is
    not valid JSON (why); ``remedy``". OSErrors (a missing file) pass through for the caller's own message."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise AllocoptError(f"{source} is not valid JSON (not UTF-8 text, byte {exc.start}); {remedy}") from exc
    except json.JSONDecodeError as exc:
        raise AllocoptError(f"{source} is not valid JSON ({exc.msg} at line {exc.lineno}); {remedy}") from exc


def _write_error(path: Path, exc: BaseException) -> AllocoptError:
    reason = getattr(exc, "strerror", None) or str(exc).rpartition("I/O error: ")[2]
    return AllocoptError(f"could not write {path}: {reason}; free disk space or choose another location")


def _is_write_failure(exc: BaseException) -> bool:
    """An OSError, or safetensors' own wrapper of one (transformers writes weights through it)."""
    return isinstance(exc, OSError) or (type(exc).__name__ == "SafetensorError" and "I/O error" in str(exc))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it into place."""
    path = Path(path)
    ensure_writable_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _write_error(path, exc) from exc
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` in one rename.

    On any exception the temporary directory is removed and ``path`` is left exactly as it was. A process killed
    mid-write (SIGKILL, power loss) cannot clean up: its temporary directory names its host and pid, and the next
    write to the same ``path`` from this host removes those whose process is gone.
    """
    path = Path(path)
    non_empty = path.is_dir() and any(path.iterdir())
    if not overwrite and (non_empty or path.is_file()):
        raise AllocoptError(f"output directory {path} already exists and is not empty; pass --overwrite or choose another --out")
    ensure_writable_dir(path.parent)
    owner = f".{path.name}.{_host()}."
    for stale in path.parent.glob(f"{glob.escape(owner)}*.tmp"):
        pid = stale.name[len(owner):].split(".", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f"{owner}{os.getpid()}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise _write_error(path, exc) from exc
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_write_failure(exc):
            raise _write_error(path, exc) from exc
        raise
