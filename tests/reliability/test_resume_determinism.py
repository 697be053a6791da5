"""Determinism and exact resume: a run killed with SIGKILL and resumed with ``ckpt_path=last`` logs the
same losses as an uninterrupted run, redoing only the steps after its last checkpoint.

The runs use dropout (so the RNG must be restored), validate between checkpoints (validation starts
loader iterators) and cross epoch boundaries (so the sampler's epoch and position matter).
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import compose_config
from reliability_helpers import (
    cli_command,
    cli_env,
    logged_series,
    run_cli,
    torch_threads,
    train_overrides,
    wait_for,
)

from chameleon_lite.checkpoint import safe_torch_load
from chameleon_lite.cli.train import train

STEPS = 10
CKPT_EVERY = 3
KILL_AFTER = 8  # optimizer steps done when the run is killed; its last checkpoint is at step 6


def logged_rows(run_dir: Path, key: str) -> list[tuple[int, float]]:
    """Every ``(step, value)`` row of one metric in the run's CSV log, in file order (no de-duplication)."""
    with open(run_dir / "logs" / "metrics.csv", newline="") as f:
        return [(int(row["step"]), float(row[key])) for row in csv.DictReader(f) if row.get(key) not in (None, "")]


def run_overrides(basetemp, run_dir) -> list[str]:
    return train_overrides(basetemp, run_dir, f"trainer.max_steps={STEPS}", "data.n_train=24",
                           f"callbacks.checkpoint.every_n_train_steps={CKPT_EVERY}", "model.resid_dropout=0.1",
                           "trainer.val_check_interval=4", "trainer.limit_val_batches=1")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """Run directory of an uninterrupted in-process run."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = train(compose_config("train", run_overrides(tmp_path_factory.getbasetemp(), run_dir)))
    assert result["global_step"] == STEPS
    return run_dir


@pytest.fixture(scope="module")
def reference(reference_run):
    """Loss curve ``{step: loss}`` of the uninterrupted run."""
    return logged_series(reference_run, "train/loss")


def test_reference_run_crosses_an_epoch_and_logs_every_step(reference, reference_run):
    assert sorted(reference) == list(range(STEPS))
    epochs = logged_series(reference_run, "epoch")
    assert max(epochs.values()) >= 1, "the run should cross an epoch boundary to exercise the sampler state"


def test_same_seed_same_config_same_loss_curve(reference, tmp_path, tmp_path_factory):
    train(compose_config("train", run_overrides(tmp_path_factory.getbasetemp(), tmp_path / "run")))
    again = logged_series(tmp_path / "run", "train/loss")
    assert again == reference  # exact, step by step


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(reference, tmp_path_factory):
    """``chameleon-train run_name=r`` killed after step 8, then ``chameleon-train run_name=r ckpt_path=last``.

    Which rows the CSV log must hold, in file order (`loggers.CSVLogger` appends on resume; every logged row
    is written at once, `logger.save()` per `log_metrics`): the killed run logged the losses of step indices
    0 .. KILL_AFTER - 2 (`StallAfterStep` hangs in `on_train_batch_end` after optimizer step KILL_AFTER, before
    Lightning hands that batch's metrics to the logger); the resumed run restarts after its checkpoint (global
    step 6, saved in `on_train_batch_end` of index 5) and logs indices 6 .. STEPS - 1. So index 6 - after the
    checkpoint, before the kill - appears twice, every other step once, and every row equals the reference.
    A resume that restarted from step 0, or one that skipped or repeated other steps, fails."""
    workdir = tmp_path_factory.mktemp("interrupted")
    run_dir = workdir / "runs" / "r"
    marker = workdir / "stalled"
    command = run_overrides(tmp_path_factory.getbasetemp(), None) + ["run_name=r"]
    stall = ["+callbacks.stall._target_=reliability_helpers.StallAfterStep", f"+callbacks.stall.step={KILL_AFTER}",
             f"+callbacks.stall.marker={marker}"]
    proc = subprocess.Popen(cli_command(command + stall), cwd=workdir, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(marker, proc)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL

    killed_at = safe_torch_load(run_dir / "checkpoints" / "last.ckpt")["global_step"]
    assert killed_at == KILL_AFTER // CKPT_EVERY * CKPT_EVERY

    resumed = run_cli(command + ["ckpt_path=last"], cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    rows = logged_rows(run_dir, "train/loss")
    before_kill, after_resume = list(range(KILL_AFTER - 1)), list(range(killed_at, STEPS))
    assert [step for step, _ in rows] == before_kill + after_resume, (
        "the killed run's rows must be kept, and the resumed run must redo exactly the steps after its checkpoint")
    assert [step for step, _ in rows].count(killed_at) == 2  # redone after the kill: logged by both runs
    for k, (step, loss) in enumerate(rows):
        assert loss == pytest.approx(reference[step], abs=1e-6), f"row {k} (step {step})"
    assert logged_series(run_dir, "train/loss") == pytest.approx(reference, abs=1e-6)
