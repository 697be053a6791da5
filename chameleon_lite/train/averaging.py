"""Tail weight averaging: the equal-weight mean of the weights over the last part of training (SWA / LAWA).

Lightning's :class:`~lightning.pytorch.callbacks.WeightAveraging` keeps the average (a
``torch.optim.swa_utils.AveragedModel``), swaps it in for validation, puts it into checkpoints'
``state_dict`` (the trained weights go to ``current_model_state``, so a resume continues them) and
copies it into the module when training ends, so the exported ``model/`` holds the average.

Two things it does not do on its own, and this subclass adds: the averaging window is given as the
last ``fraction`` of ``trainer.max_steps`` (the cosine schedule's tail), and until the first update,
validation and checkpoints use the trained weights (the base class would swap in the copy it took at
setup, the untrained initial weights, and save those as the checkpoint's ``state_dict``).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.strategies import FSDPStrategy
from torch.optim.swa_utils import AveragedModel

from chameleon_lite.config import ConfigError

log = logging.getLogger(__name__)


class TailAveraging(WeightAveraging):
    """Average the weights every ``every_n_steps`` steps over the last ``fraction`` of ``trainer.max_steps``.

    ``fraction=0`` switches it off (``conf/callbacks/default.yaml``'s ``averaging`` entry; turn it on with
    e.g. ``callbacks.averaging.fraction=0.4``).
    """

    def __init__(self, fraction: float = 0.0, every_n_steps: int = 10) -> None:
        if not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"callbacks.averaging.fraction={fraction!r}: expected the averaged fraction of training "
                             "in [0, 1] (0 = off)")
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"callbacks.averaging.every_n_steps={every_n_steps!r}: expected a positive int")
        super().__init__(use_buffers=False)  # the buffers (RoPE tables) are constants, not trained
        self.fraction = fraction
        self.every_n_steps = every_n_steps
        self.start_step = 0
        self.max_steps = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # (not the base class's setup: that calls configure_model, i.e. compile=true's compile, before the
        # copy, and warns about sharding; this module's layers exist from __init__, and the copy never runs)
        if self.fraction == 0.0 or stage != "fit":
            return  # off: no copy of the model is made, and every hook below finds nothing averaged
        if isinstance(trainer.strategy, FSDPStrategy):
            raise ConfigError("callbacks.averaging keeps a full copy of the weights, which trainer=fsdp shards: "
                             "use trainer=ddp, or callbacks.averaging.fraction=0")
        if trainer.max_steps is None or trainer.max_steps < 1:
            raise ConfigError("callbacks.averaging needs trainer.max_steps (the window is its last fraction)")
        self.max_steps = trainer.max_steps
        self.start_step = int(trainer.max_steps * (1.0 - self.fraction))
        self._average_model = AveragedModel(pl_module, device=pl_module.device, use_buffers=False)
        log.info("weight averaging: the mean of the weights every %d steps from step %d of %d",
                 self.every_n_steps, self.start_step, trainer.max_steps)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        # step_idx is zero-based: step_idx + 1 optimizer steps are done; the last step is always averaged in
        if step_idx is None or self.fraction == 0.0:
            return False
        done = step_idx + 1
        return done > self.start_step and ((done - self.start_step) % self.every_n_steps == 0 or done == self.max_steps)

    def averaged(self) -> int:
        """How many weight snapshots the average holds (0 before the window opens)."""
        return 0 if self._average_model is None else int(self._average_model.n_averaged)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.averaged():
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.averaged():
            super().on_validation_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.averaged():
            log.info("weight averaging: the model now holds the mean of %d snapshots", self.averaged())
            super().on_train_end(trainer, pl_module)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if "current_model_state" not in checkpoint:
            return  # saved before the window opened (or without averaging): no average yet, the first update starts it
        if self._average_model is None:  # averaging is off now: go on training the trained weights, not the mean
            pl_module.load_state_dict(checkpoint["current_model_state"])
            log.info("resuming with callbacks.averaging off: the checkpoint's trained weights go on, its mean is dropped")
            return
        super().on_load_checkpoint(trainer, pl_module, checkpoint)  # restores the mean and the trained weights

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.averaged():
            super().on_save_checkpoint(trainer, pl_module, checkpoint)
