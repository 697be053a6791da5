"""Shared fixtures: compose the real Hydra configs, overridden to tiny CPU sizes."""

from __future__ import annotations

import os

import pytest

from chameleon_lite.config import compose_config

os.environ.setdefault("MPLBACKEND", "Agg")

# A training run small enough for CI: tiny model, few rows, fp32 on CPU.
TINY_TRAIN = [
    "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=256",
    "data.n_train=256", "data.n_val=32", "data.seq_len=256", "data.batch_size=4",
    "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.limit_val_batches=2",
    "trainer.precision=32-true", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
    "optim.warmup_steps=2", "callbacks.checkpoint.every_n_train_steps=3",
]


@pytest.fixture
def tiny_train_cfg(tmp_path):
    def make(*extra: str):
        return compose_config("train", [*TINY_TRAIN, f"run_dir={tmp_path / 'run'}",
                                        f"data.cache_dir={tmp_path / 'cache'}", *extra])

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny model trained for a few seconds on the shapes world (shipped tokenizers): the fixture
    of the generation, evaluation and notebook tests (not the 30-minute model)."""
    from chameleon_lite.cli.train import train

    root = tmp_path_factory.mktemp("tiny_ckpt")
    cfg = compose_config("train", [*TINY_TRAIN, "trainer.max_steps=20", "trainer.val_check_interval=20",
                                   f"run_dir={root / 'run'}", f"data.cache_dir={root / 'cache'}",
                                   "callbacks.loss_curve=null", "callbacks.checkpoint.every_n_train_steps=20"])
    train(cfg)
    return root / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def tiny_generator(tiny_checkpoint):
    """A `Generator` on `tiny_checkpoint` (eager, CPU), shared by the generation tests."""
    from chameleon_lite.generation.api import Generator

    return Generator.load(tiny_checkpoint)
