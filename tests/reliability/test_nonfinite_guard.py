"""NaN/Inf guard (chameleon_lite/train/guards.py) as configured in conf/callbacks/default.yaml.

A NaN is injected into one step's loss (or an Inf into one gradient) by patching the training
module; the guard must stop before the weights move (naming the step and the last good
checkpoint), or with ``on_nonfinite=skip`` skip exactly that optimizer step and count it.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import compose_config
from reliability_helpers import logged_series, torch_threads, train_overrides

from chameleon_lite.checkpoint import safe_torch_load
from chameleon_lite.cli.train import train
from chameleon_lite.train.guards import NonFiniteError, NonFiniteGuard
from chameleon_lite.train.module import ChameleonLightningModule


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture
def poison(monkeypatch):
    """``poison(kind, steps)``: make the loss (``kind="loss"``) or one gradient (``"grad"``) non-finite at ``steps``."""

    def install(kind: str, steps: set[int]) -> None:
        if kind == "loss":
            training_step = ChameleonLightningModule.training_step

            def poisoned_step(self, batch, batch_idx):
                out = training_step(self, batch, batch_idx)
                if self.global_step in steps:
                    out["loss"] = out["loss"] * math.nan
                return out

            monkeypatch.setattr(ChameleonLightningModule, "training_step", poisoned_step)
        else:
            def poisoned_grad(self):
                if self.global_step in steps:
                    self.model.norm.weight.grad[0] = math.inf

            monkeypatch.setattr(ChameleonLightningModule, "on_after_backward", poisoned_grad)

    return install


def run(tmp_path: Path, *extra: str) -> dict:
    return train(compose_config("train", train_overrides(tmp_path.parent, tmp_path / "run", *extra)))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return safe_torch_load(path)["state_dict"]


def test_nan_loss_stops_before_the_step_and_names_step_and_last_good_checkpoint(tmp_path, poison):
    poison("loss", {3})
    with pytest.raises(NonFiniteError) as err:
        run(tmp_path, "callbacks.checkpoint.every_n_train_steps=2")
    ckpts = tmp_path / "run" / "checkpoints"
    message = str(err.value)
    assert "non-finite loss (nan) at step 3" in message and str(ckpts / "last.ckpt") in message
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["last.ckpt", "step000002.ckpt"]
    last = safe_torch_load(ckpts / "last.ckpt")
    assert last["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_inf_gradient_stops_naming_the_parameter(tmp_path, poison):
    poison("grad", {1})
    with pytest.raises(NonFiniteError, match=r"non-finite gradient of model\.norm\.weight at step 1"):
        run(tmp_path, "trainer.max_steps=3")


def test_skip_mode_skips_exactly_the_bad_step_and_counts_it(tmp_path, poison):
    poison("loss", {3})
    result = run(tmp_path, "callbacks.nonfinite.on_nonfinite=skip", "callbacks.checkpoint.every_n_train_steps=1")
    assert result["global_step"] == 6
    ckpts = tmp_path / "run" / "checkpoints"
    before, after, later = (weights(ckpts / f"step00000{k}.ckpt") for k in (3, 4, 5))
    assert all(torch.equal(before[k], after[k]) for k in before), "the non-finite step must not move the weights"
    assert any(not torch.equal(after[k], later[k]) for k in after), "training goes on after the skipped step"
    skipped = logged_series(tmp_path / "run", "train/nonfinite_skipped_steps")
    assert skipped == {0: 0.0, 1: 0.0, 2: 0.0, 3: 1.0, 4: 1.0, 5: 1.0}
    guard_state = next(v for k, v in safe_torch_load(ckpts / "last.ckpt")["callbacks"].items() if "NonFinite" in k)
    assert guard_state["skipped_steps"] == 1


def test_skip_mode_gives_up_after_too_many_consecutive_bad_steps(tmp_path, poison):
    poison("loss", {2, 3, 4, 5})
    with pytest.raises(NonFiniteError, match="at step 4 for 3 steps in a row"):
        run(tmp_path, "callbacks.nonfinite.on_nonfinite=skip", "callbacks.nonfinite.max_consecutive_skips=2")


def test_a_checkpoint_with_non_finite_weights_is_refused_before_writing():
    votes = []

    def any_rank(decision, all):  # Lightning's argument names
        votes.append((decision, all))
        return decision or other_rank_bad

    trainer = SimpleNamespace(global_step=7, checkpoint_callbacks=[SimpleNamespace(last_model_path="run/last.ckpt")],
                              strategy=SimpleNamespace(reduce_boolean_decision=any_rank))
    other_rank_bad = False
    state = {"state_dict": {"model.w": torch.tensor([1.0, math.nan]), "model.step": torch.tensor(3)}}
    with pytest.raises(NonFiniteError, match=r"step 7: weight model\.w is not finite; .* run/last\.ckpt"):
        NonFiniteGuard().on_save_checkpoint(trainer, None, state)
    NonFiniteGuard().on_save_checkpoint(trainer, None, {"state_dict": {"model.w": torch.ones(2)}})
    # under FSDP another rank (rank 0) may hold the bad weights while this one holds none: it stops too
    other_rank_bad = True
    with pytest.raises(NonFiniteError, match=r"weight \(on another rank\) is not finite"):
        NonFiniteGuard().on_save_checkpoint(trainer, None, {"state_dict": {}})
    assert votes == [(True, False), (False, False), (False, False)]


def test_bad_mode_is_a_config_error_naming_the_key():
    with pytest.raises(ValueError, match="callbacks.nonfinite.on_nonfinite='explode'"):
        NonFiniteGuard(on_nonfinite="explode")


def test_fp16_scaler_overflows_are_left_to_the_scaler_but_a_nonfinite_loss_is_not():
    """Under `16-mixed` the GradScaler overflows now and then on purpose and skips that step itself; the guard
    (stop mode) must not end the run on such inf gradients. Without a scaler they stop it."""
    layer = torch.nn.Linear(2, 1)
    layer.weight.grad = torch.tensor([[math.inf, 0.0]])
    strategy = SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision)

    def trainer(scaler):
        return SimpleNamespace(global_step=3, strategy=strategy, checkpoint_callbacks=[], ckpt_path=None,
                               precision_plugin=SimpleNamespace(scaler=scaler))

    NonFiniteGuard().on_before_optimizer_step(trainer(torch.amp.GradScaler("cpu")), layer, None)
    assert layer.weight.grad is not None  # untouched: the scaler's step skips it
    with pytest.raises(NonFiniteError, match="gradient of weight"):
        NonFiniteGuard().on_before_optimizer_step(trainer(None), layer, None)
    guard = NonFiniteGuard()
    guard.on_before_backward(trainer(torch.amp.GradScaler("cpu")), layer, torch.tensor(math.nan))
    with pytest.raises(NonFiniteError, match="loss"):
        guard.on_before_optimizer_step(trainer(torch.amp.GradScaler("cpu")), layer, None)
