"""Crash-safe Lightning checkpoints: a kill during a save never leaves a corrupt ``last.ckpt``.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temp file is made by
``tempfile.mkstemp()`` in the *system* temp dir, then ``shutil.move``\\ d onto the target. When
``/tmp`` is another file system than the run directory (tmpfs, a container overlay, a cluster's
local disk vs. the shared run dir), that move is a copy: a SIGKILL or node loss during it leaves
a truncated checkpoint under the final name, and the temp file (as large as the checkpoint) is
leaked in ``/tmp``. Nothing is fsync'd either.

:class:`AtomicCheckpointIO` writes next to the target instead: temp file in the same directory,
``fsync``, ``os.replace`` (atomic on POSIX), then ``fsync`` of the directory. Readers see the old
complete file or the new complete file, never a mix. Temp files left by a killed save are removed
by the next save of the same name. Loading always uses ``weights_only=True`` (through
:func:`~chameleon_lite.checkpoint.safe_torch_load` for local files), so resuming from a file that
carries pickled code refuses it instead of running it.

:func:`chameleon_lite.train.trainer.build_trainer` installs it as the trainer's checkpoint plugin, so
every ``trainer.save_checkpoint`` of the run, ``last.ckpt`` included, goes through it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from chameleon_lite.checkpoint import safe_torch_load
from chameleon_lite.files import atomic_path


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with same-directory atomic, fsync'd writes and weights-only loads (local paths).

    Remote paths (``s3://...``) keep Lightning's fsspec behaviour, where object stores make each
    upload atomic themselves.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options for local paths")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.stem}.*.tmp{path.suffix}"):  # left by a save that was killed
            stale.unlink(missing_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(path.parent)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Callable | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Always weights-only: this repo's checkpoints hold tensors and plain containers only."""
        if not isinstance(get_filesystem(path), LocalFileSystem):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        return safe_torch_load(path)

