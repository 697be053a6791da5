"""Shared pieces of the reliability tests: a tiny tokenizer directory, tiny run configs, CLI runs, logs.

Plain functions rather than fixtures so that several test modules share one tokenizer directory
and one token cache per session (built once under pytest's base temp dir). This module is also
imported by the training subprocesses of the tests (``PYTHONPATH=tests/reliability:tests``) for the
test-only callbacks at the bottom.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
from conftest import TINY_TRAIN, compose_config

from chameleon_lite.config import REPO_ROOT

#: A VQ small enough to encode hundreds of images per second on one CPU core: 32 px -> 4 x 4 = 16 codes.
TINY_VQ = {"image_size": 32, "base_channels": 8, "channel_multipliers": (1, 1, 2, 2), "latent_channels": 16,
           "norm_groups": 8, "codebook_size": 64, "embed_dim": 8, "mid_attention": False}

#: TINY_TRAIN on 32 px shapes and 64-token rows; no loss plot, no validation unless a test asks.
RELIABILITY_TRAIN = [*TINY_TRAIN, "data.image_size=32", "data.seq_len=64", "model.max_seq_len=64",
                     "data.n_train=96", "data.n_val=16", "trainer.limit_val_batches=0",
                     "callbacks.loss_curve=null", "export_weights=false"]


def shared_dir(basetemp: Path, name: str) -> Path:
    return Path(basetemp) / f"reliability-{name}"


def build_tiny_tokenizer(directory: Path) -> Path:
    """A complete tokenizer directory (text.model, vocab.json, random-weight vq.*), built once per path.

    Random VQ weights are enough: the tests check data handling and training mechanics, not image
    quality, and this keeps them independent of the shipped tokenizers/shapes artefacts.
    """
    if (directory / "vocab.json").is_file():
        return directory
    from chameleon_lite.cli.tokenizer import build_tokenizer
    from chameleon_lite.vq.api import ImageTokenizer
    from chameleon_lite.vq.config import VQConfig
    from chameleon_lite.vq.model import VQModel

    torch.manual_seed(0)
    ImageTokenizer(VQModel(VQConfig(**TINY_VQ))).save_pretrained(directory)
    build_tokenizer(compose_config("train_tokenizer", [f"tokenizer.dir={directory}", "overwrite=true",
                                                       "tokenizer.shapes.n_captions=500",
                                                       f"tokenizer.image_codebook_size={TINY_VQ['codebook_size']}"]))
    return directory


def train_overrides(basetemp: Path, run_dir: Path | None, *extra: str) -> list[str]:
    """Overrides for a tiny CPU run sharing the session's tokenizer and token cache.

    ``run_dir`` is for in-process runs; CLI runs leave it to Hydra (``hydra.run.dir`` / ``run_name``).
    """
    tok = build_tiny_tokenizer(shared_dir(basetemp, "tokenizer"))
    where = [f"run_dir={run_dir}"] if run_dir is not None else []
    return [*RELIABILITY_TRAIN, f"tokenizer.dir={tok}", f"data.cache_dir={shared_dir(basetemp, 'cache')}", *where,
            *extra]


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads (restored after).

    Tiny models gain nothing from threads, and on shared busy cores OpenMP's spinning threads make
    a step of the tiny model ~50x slower than one thread does.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cli_env() -> dict[str, str]:
    """Environment for ``python -m chameleon_lite.cli.train`` subprocesses: test callbacks importable, 1 thread."""
    here = Path(__file__).resolve().parent
    paths = [str(here), str(here.parent), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1"}


def cli_command(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "chameleon_lite.cli.train", *overrides]


def run_cli(overrides: list[str], cwd: Path = REPO_ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    """``chameleon-train overrides...`` started in ``cwd``; output captured as text."""
    return subprocess.run(cli_command(overrides), cwd=cwd, env=cli_env(), capture_output=True, text=True,
                          timeout=timeout, check=False)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Poll until ``path`` exists; fail with the process output if it exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process exited ({proc.returncode}) before {path} appeared:\n{out[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


def logged_series(run_dir: Path, key: str) -> dict[int, float]:
    """``{step: value}`` of one metric from the run's CSV log; a step logged twice keeps its last value."""
    series: dict[int, float] = {}
    with open(run_dir / "logs" / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row.get(key) not in (None, ""):
                series[int(row["step"])] = float(row[key])
    return series


class StallAfterStep(L.Callback):
    """Test-only: after optimizer step ``step``, touch ``marker`` and hang, so a test can SIGKILL the run there."""

    def __init__(self, step: int, marker: str) -> None:
        self.step = step
        self.marker = Path(marker)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if trainer.global_step == self.step:
            self.marker.touch()
            time.sleep(3600)


class RecordRngState(L.Callback):
    """Test-only: append ``rank step digest`` of the torch RNG state before each training batch to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        digest = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16]
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_rank} {trainer.global_step} {digest}\n")
