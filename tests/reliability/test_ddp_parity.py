"""Splitting a step's rows over processes or micro-batches does not change the update.

2-process CPU DDP (gloo), and gradient accumulation, reach the weights of one process taking the
same rows in one batch.

DDP shards packed rows by rank (row r -> rank r % 2) and each rank takes 2 rows per step, so
step s of the DDP run covers rows 4s..4s+3, exactly the rows of step s of the 1-process run with
batch 4. ``loss_on=completion`` gives the rows different numbers of loss tokens, so the ranks hold
different counts: averaging per-rank (or per-micro-batch) means would drift by ~1e-2 in 3 steps;
the module divides the summed gradients by the step's global token count instead
(`ChameleonLightningModule.on_before_optimizer_step`). The DDP job is started through the CLI,
as a user would: Lightning's ``ddp`` strategy relaunches the script for rank 1.
"""

from __future__ import annotations

import csv

import pytest
from conftest import compose_config
from reliability_helpers import run_cli, torch_threads, train_overrides
from safetensors.torch import load_file

from chameleon_lite.cli.train import train

STEPS = 3


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path, tmp_path_factory):
    basetemp = tmp_path_factory.getbasetemp()
    # + one validation over every val row: 10 documents pack into 9 rows, so rank 1's share ends with a padding
    # row, a batch of its own (2 rows per process), which still runs the forward
    common = [f"trainer.max_steps={STEPS}", "export_weights=true", "callbacks.checkpoint=null",
              "data.loss_on=completion", "trainer.limit_val_batches=1.0", f"trainer.val_check_interval={STEPS}",
              "data.n_val=10"]
    with torch_threads(1):
        single = train(compose_config("train", train_overrides(basetemp, tmp_path / "single", *common,
                                                               "data.batch_size=4")))
    assert single["global_step"] == STEPS
    ddp_dir = tmp_path / "ddp"
    proc = run_cli(train_overrides(basetemp, None, *common, "trainer=ddp_cpu", "trainer.devices=2",
                                   "data.batch_size=2", f"hydra.run.dir={ddp_dir}"))
    assert proc.returncode == 0, proc.stderr[-4000:]

    one, two = load_file(f"{single['weights']}/model.safetensors"), load_file(f"{ddp_dir}/model/model.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        diff = (one[name] - two[name]).abs().max().item()
        assert diff <= 1e-5, f"{name}: max |1 process - DDP| = {diff:.3g}"
    # validation: the mean over every val token, whatever the batches and processes (the rows hold different
    # numbers of loss tokens, so a row-weighted mean of batch means differed by ~1e-2 between the two runs)
    with open(ddp_dir / "logs" / "metrics.csv") as f:
        logged = [row for row in csv.DictReader(f) if row.get("val/ce")]
    assert len(logged) == 1
    for key in ("val/ce", "val/ce_image", "val/ce_text", "val/loss"):
        assert float(logged[0][key]) == pytest.approx(single["metrics"][key], abs=1e-4), key


def _weights_after(run_dir, basetemp, *extra):
    common = [f"trainer.max_steps={STEPS}", "export_weights=true", "callbacks.checkpoint=null",
              "data.loss_on=completion"]
    with torch_threads(1):
        result = train(compose_config("train", train_overrides(basetemp, run_dir, *common, *extra)))
    assert result["global_step"] == STEPS
    return load_file(f"{result['weights']}/model.safetensors")


def test_gradient_accumulation_matches_one_batch_of_the_same_rows(tmp_path, tmp_path_factory):
    """2 micro-batches of 2 rows (set through ``data.batch_tokens``) == 1 batch of 4 rows: the rows hold different numbers of loss tokens
    (``loss_on=completion``), so Lightning's equal-weight average of micro-batch means would not match."""
    basetemp = tmp_path_factory.getbasetemp()
    one = _weights_after(tmp_path / "one", basetemp, "data.batch_size=4")
    # data.batch_tokens = 4 rows of 64 tokens per step -> 2 rows per micro-batch with 2 micro-batches per step
    acc = _weights_after(tmp_path / "acc", basetemp, "data.batch_tokens=256", "trainer.accumulate_grad_batches=2")
    worst = max((one[name] - acc[name]).abs().max().item() for name in one)
    assert worst <= 1e-5, f"max |batch 4 - 2 x 2 accumulated| = {worst:.3g}"


def _rng_digests(path) -> dict[tuple[int, int], str]:
    """``{(rank, step): digest}`` from `RecordRngState`'s file (a step recorded twice keeps its last)."""
    return {(int(rank), int(step)): digest for rank, step, digest in
            (line.split() for line in path.read_text().splitlines())}


@pytest.mark.slow
def test_ddp_processes_draw_their_own_dropout_and_a_resume_restores_each(tmp_path, tmp_path_factory):
    """`seed_everything` gives every process the same stream: without a stream per process the rows of one
    global batch drew the same dropout masks on both. A resume restores each process's stream from the
    checkpoint (it once got rank 0's on both), so the resumed steps draw what the uninterrupted run drew."""
    basetemp = tmp_path_factory.getbasetemp()
    common = ["trainer=ddp_cpu", "trainer.devices=2", "data.batch_size=2", "model.resid_dropout=0.1",
              "callbacks.checkpoint.every_n_train_steps=2", "+callbacks.rng._target_=reliability_helpers.RecordRngState"]

    def run(name, steps, *extra):
        proc = run_cli(train_overrides(basetemp, None, *common, f"trainer.max_steps={steps}",
                                       f"+callbacks.rng.path={tmp_path / name}.rng", f"hydra.run.dir={tmp_path / name}",
                                       *extra))
        assert proc.returncode == 0, proc.stderr[-4000:]
        return _rng_digests(tmp_path / f"{name}.rng")

    whole = run("whole", 4)
    assert all(whole[(0, step)] != whole[(1, step)] for step in range(4))
    run("parted", 2)
    resumed = run("parted", 4, "ckpt_path=last")
    assert {key: resumed[key] for key in whole if key[1] >= 2} == {key: whole[key] for key in whole if key[1] >= 2}
