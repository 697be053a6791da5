"""Checkpoints are written atomically: a SIGKILL in the middle of a save leaves the previous file intact.

A forked child starts saving a second checkpoint over the first and kills itself with SIGKILL when
half of the bytes are on disk. The same kill on a plain ``open(path, "wb")`` writer leaves a
truncated, unloadable file (the control that shows the kill lands mid-write).
"""

from __future__ import annotations

import io
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from reliability_helpers import torch_threads, train_overrides

from chameleon_lite.checkpoint import CheckpointError, safe_torch_load
from chameleon_lite.cli.train import train
from chameleon_lite.train.checkpoint_io import AtomicCheckpointIO


def checkpoint(step: int) -> dict:
    return {"global_step": step, "state_dict": {"w": torch.full((50_000,), float(step))}}


def plain_save(state: dict, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)


def kill_during_save(save: Callable[[dict, Path], None], state: dict, path: Path) -> None:
    """Run ``save(state, path)`` in a forked child that SIGKILLs itself after writing half of the bytes."""
    pid = os.fork()
    if pid == 0:
        try:
            real_save = torch.save

            def dying_save(obj, f):
                buffer = io.BytesIO()
                real_save(obj, buffer)
                data = buffer.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)

            torch.save = dying_save
            save(state, path)
        finally:
            os._exit(3)  # only reached if the kill did not happen
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_sigkill_during_an_atomic_save_keeps_the_previous_checkpoint(tmp_path):
    io_plugin = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io_plugin.save_checkpoint(checkpoint(1), path)

    kill_during_save(io_plugin.save_checkpoint, checkpoint(2), path)
    survivor = safe_torch_load(path)
    assert survivor["global_step"] == 1 and torch.equal(survivor["state_dict"]["w"], checkpoint(1)["state_dict"]["w"])
    assert list(path.parent.glob(".last.*.tmp.ckpt")), "the killed save should have left its temp file"

    io_plugin.save_checkpoint(checkpoint(3), path)
    assert io_plugin.load_checkpoint(path)["global_step"] == 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"], "the next save removes the leftover"


def test_control_the_same_kill_corrupts_a_plain_write(tmp_path):
    path = tmp_path / "last.ckpt"
    plain_save(checkpoint(1), path)
    kill_during_save(plain_save, checkpoint(2), path)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        safe_torch_load(path)


def test_training_writes_and_resumes_every_checkpoint_through_the_atomic_io(tmp_path, tmp_path_factory, monkeypatch):
    saved, loaded = [], []
    save, load = AtomicCheckpointIO.save_checkpoint, AtomicCheckpointIO.load_checkpoint

    def recording_save(self, state, path, storage_options=None):
        saved.append(Path(path).name)
        save(self, state, path, storage_options)

    def recording_load(self, path, map_location=None, weights_only=None):
        loaded.append(Path(path).name)
        return load(self, path, map_location, weights_only)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", recording_save)
    monkeypatch.setattr(AtomicCheckpointIO, "load_checkpoint", recording_load)
    basetemp, every = tmp_path_factory.getbasetemp(), "callbacks.checkpoint.every_n_train_steps=2"
    with torch_threads(1):
        train(compose_config("train", train_overrides(basetemp, tmp_path, "trainer.max_steps=4", every)))
        assert saved == ["step000002.ckpt", "last.ckpt", "step000004.ckpt", "last.ckpt"]
        train(compose_config("train", train_overrides(basetemp, tmp_path, "trainer.max_steps=6", "ckpt_path=last",
                                                      every)))
    assert loaded == ["last.ckpt"]
    assert saved[4:] == ["step000006.ckpt", "last.ckpt"]
