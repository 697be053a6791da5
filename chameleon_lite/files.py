"""Crash-safe file writes: an artifact is either the old good one or the complete new one."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent builders each write a complete file (atomic)
    fcntl = None

log = logging.getLogger(__name__)


def file_digest(path: str | os.PathLike, n: int = 16) -> str:
    """The first ``n`` hex digits of the SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:n]


def _default_mode() -> int:
    """0o666 minus the umask: what ``open(path, "w")`` would have given (mkstemp uses 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, _default_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success it is renamed over ``path``, on error removed.

    For writers that insist on a file name (sentencepiece, safetensors, ``Image.save``).
    The temp name keeps the suffix so that format detection by extension still works.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _default_mode())  # after the writer: safetensors' save_file re-creates the file as 0o600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def build_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock on the file ``path`` (created if missing) for the block.

    For builders of shared artifacts (token caches): the processes of a job started by torchrun or SLURM, or
    two runs sharing a cache directory, would otherwise all build the same file at once; with the lock the
    first builds it and the others wait, then load it. Released when the block ends or the process dies.
    Where no lock can be had (a read-only cache directory, a lock file of another user that cannot be opened,
    a file system without locks) the block runs unlocked: loading a complete cache needs none, and each
    builder's writes stay atomic.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)  # flock needs no write access
    except OSError as err:
        log.debug("no lock file %s (%s): going on unlocked", path, err)
        yield
        return
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another process building %s", path.with_suffix(""))
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as err:  # ENOLCK (NFS without lockd), ENOSYS / EINVAL (file systems without flock)
                log.warning("cannot lock %s (%s): building without a lock", path, err)
        yield
    finally:
        os.close(fd)
