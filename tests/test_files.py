"""Shared-file helpers: atomic writes keep the usual permissions; one builder of a shared artifact at a time."""

from __future__ import annotations

import multiprocessing
import os
import stat
import time

import pytest
import torch
from safetensors.torch import save_file

from chameleon_lite.files import atomic_path, atomic_write_text, build_lock


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_get_the_mode_a_plain_write_gets_also_through_safetensors(tmp_path):
    """safetensors' save_file re-creates its file as 0o600: a cache dir shared between users could not be read."""
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "w.safetensors") as tmp:
            save_file({"x": torch.zeros(2)}, str(tmp))
        atomic_write_text(tmp_path / "t.json", "{}")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "w.safetensors") == _mode(tmp_path / "t.json") == 0o644


def _hold(path, log, seconds):
    with build_lock(path):
        with open(log, "a") as f:
            f.write(f"start {os.getpid()}\n")
        time.sleep(seconds)
        with open(log, "a") as f:
            f.write(f"end {os.getpid()}\n")


@pytest.mark.skipif(os.name != "posix", reason="advisory file locks (fcntl) are POSIX")
def test_build_lock_lets_one_process_build_at_a_time(tmp_path):
    log = tmp_path / "log"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_hold, args=(tmp_path / "cache" / "x.lock", log, 0.5)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    events = [line.split()[0] for line in log.read_text().splitlines()]
    assert events == ["start", "end", "start", "end"]  # never two inside the block at once


@pytest.mark.parametrize("failure", ["open", "flock"])
def test_without_a_lock_the_block_still_runs(tmp_path, monkeypatch, failure):
    """A read-only cache dir (the lock file cannot be created) or a file system without flock (NFS without
    lockd): loading a complete cache needs no lock, so the block runs unlocked rather than failing."""
    import errno

    from chameleon_lite import files

    def refuse(*args, **kwargs):
        raise OSError(errno.EACCES if failure == "open" else errno.ENOLCK, "refused")

    if failure == "flock" and files.fcntl is None:
        pytest.skip("no flock on this platform")
    if failure == "open":
        monkeypatch.setattr(files.os, "open", refuse)
    else:
        monkeypatch.setattr(files.fcntl, "flock", refuse)
    ran = []
    with build_lock(tmp_path / "x.lock"):
        ran.append(True)
    assert ran
