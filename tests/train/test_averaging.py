"""``callbacks.averaging``: the mean of the weights over the last part of training (TailAveraging)."""

import csv

import pytest
import torch
from safetensors.torch import load_file

from chameleon_lite.cli.train import train
from chameleon_lite.train.averaging import TailAveraging

# six steps, a checkpoint after each: the window of fraction 0.5 holds steps 4, 5 and 6
AVERAGED = ["callbacks.averaging.fraction=0.5", "callbacks.averaging.every_n_steps=1"]
EVERY_STEP = ["callbacks.checkpoint.every_n_train_steps=1", "callbacks.loss_curve=null"]


def _ckpt(run, step: int) -> dict:
    return torch.load(run / "checkpoints" / f"step{step:06d}.ckpt", weights_only=True)


def _close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def _val_losses(run) -> dict[int, float]:
    with open(run / "logs" / "metrics.csv") as f:
        return {int(r["step"]): float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")}


@pytest.mark.slow
def test_the_model_is_the_mean_of_the_last_steps_weights_and_training_is_unchanged(tiny_train_cfg, tmp_path):
    plain, averaged = tmp_path / "plain", tmp_path / "averaged"
    train(tiny_train_cfg(*EVERY_STEP, f"run_dir={plain}"))
    train(tiny_train_cfg(*EVERY_STEP, *AVERAGED, f"run_dir={averaged}"))
    trained = {s: _ckpt(plain, s)["state_dict"] for s in range(1, 7)}
    # before the window: checkpoints hold the trained weights, with nothing else
    assert "current_model_state" not in _ckpt(averaged, 3)
    assert _close(_ckpt(averaged, 3)["state_dict"], trained[3])
    # inside it: the trained weights go on exactly as without averaging; state_dict is their running mean
    for step, window in ((4, [4]), (5, [4, 5]), (6, [4, 5, 6])):
        ckpt = _ckpt(averaged, step)
        assert _close(ckpt["current_model_state"], trained[step]), step
        mean = {k: sum(trained[s][k] for s in window) / len(window) for k in trained[step]}
        assert _close(ckpt["state_dict"], mean), step
        assert not _close(ckpt["state_dict"], trained[step]) or step == 4
    # the exported model is the mean; validation used the trained weights before the window, the mean at its end
    exported = load_file(averaged / "model" / "model.safetensors")
    assert _close({f"model.{k}": v for k, v in exported.items()}, _ckpt(averaged, 6)["state_dict"])
    plain_val, averaged_val = _val_losses(plain), _val_losses(averaged)
    assert sorted(averaged_val) == [2, 5]
    assert averaged_val[2] == plain_val[2] and averaged_val[5] != plain_val[5]


@pytest.mark.slow
def test_a_resume_inside_the_window_continues_the_mean(tiny_train_cfg, tmp_path):
    run, again = tmp_path / "run", tmp_path / "again"
    train(tiny_train_cfg(*EVERY_STEP, *AVERAGED, f"run_dir={run}"))
    train(tiny_train_cfg(*EVERY_STEP, *AVERAGED, f"run_dir={again}",
                         f"ckpt_path={run / 'checkpoints' / 'step000005.ckpt'}"))
    assert _close(_ckpt(again, 6)["state_dict"], _ckpt(run, 6)["state_dict"])
    assert _close(_ckpt(again, 6)["current_model_state"], _ckpt(run, 6)["current_model_state"])
    # resumed with averaging off, training goes on from the trained weights, not from the mean
    plain = tmp_path / "plain"
    train(tiny_train_cfg(*EVERY_STEP, f"run_dir={plain}", f"ckpt_path={run / 'checkpoints' / 'step000005.ckpt'}",
                         "resume_check=warn"))
    assert _close(_ckpt(plain, 6)["state_dict"], _ckpt(run, 6)["current_model_state"])


def test_the_window_and_bad_settings():
    cb = TailAveraging(fraction=0.4, every_n_steps=2)
    cb.max_steps, cb.start_step = 11, 6  # what setup sets for trainer.max_steps=11
    assert [s + 1 for s in range(11) if cb.should_update(step_idx=s)] == [8, 10, 11]  # the last step always
    assert not cb.should_update(epoch_idx=0)
    assert not any(TailAveraging().should_update(step_idx=s) for s in range(20))  # fraction 0: off
    with pytest.raises(ValueError, match=r"callbacks.averaging.fraction=1.5: expected"):
        TailAveraging(fraction=1.5)
    with pytest.raises(ValueError, match=r"callbacks.averaging.every_n_steps=0: expected a positive int"):
        TailAveraging(fraction=0.5, every_n_steps=0)
