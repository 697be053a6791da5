"""NaN/Inf guard: a non-finite loss or gradient never reaches the weights or a checkpoint.

The check runs after backward and before the optimizer step (Lightning's
``on_before_optimizer_step``, before gradient clipping), on the loss this rank computed and on the
gradients (which DDP has already averaged over ranks; the decision is OR-reduced over ranks so
every process acts alike). Then, by ``on_nonfinite``:

- ``stop`` (default): raise :class:`NonFiniteError` naming the step, what was non-finite and the
  last good checkpoint. The weights are untouched and no later checkpoint is written, so that
  checkpoint stays the newest one.
- ``skip``: drop this step's gradients (every ``p.grad = None``, so AdamW neither moves the weights
  nor updates its moments; the LR schedule still advances, as with AMP's GradScaler), count it in
  ``train/nonfinite_skipped_steps`` and go on; after ``max_consecutive_skips`` skipped steps in a
  row the run stops as above, since skipping is no longer recovering. The running count is logged
  every step (and kept in checkpoints).

Independently, a checkpoint whose weights are not all finite is refused before it is written
(``on_save_checkpoint`` raises), whatever produced them.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from torch import Tensor

from chameleon_lite.config import ConfigError

log = logging.getLogger(__name__)

MODES = ("stop", "skip")


class NonFiniteError(ValueError):
    """Training produced a NaN/Inf loss, gradient or weight; the message names the step and the last good checkpoint."""


def last_checkpoint(trainer: L.Trainer) -> str:
    """The newest checkpoint this run wrote (or resumed from), as a path, or a sentence saying there is none."""
    for cb in trainer.checkpoint_callbacks:
        path = getattr(cb, "last_model_path", "") or getattr(cb, "best_model_path", "")
        if path:
            return path
    return trainer.ckpt_path or "none (no checkpoint was written yet)"


def first_nonfinite(named: Any) -> str | None:
    """Name of the first ``(name, tensor)`` pair whose tensor holds a NaN/Inf (``None`` tensors ignored), else None.

    One host-device sync for all tensors (a per-tensor ``bool()`` would sync once per parameter).
    """
    named = [(name, value) for name, value in named if value is not None]
    if not named:
        return None
    finite = torch.stack([torch.isfinite(value).all() for _, value in named])
    if bool(finite.all()):
        return None
    return named[int((~finite).nonzero()[0, 0])][0]


class NonFiniteGuard(L.Callback):
    """Stops (or skips the optimizer step) on a non-finite loss or gradient; see the module docstring."""

    def __init__(self, on_nonfinite: str = "stop", max_consecutive_skips: int = 10) -> None:
        if on_nonfinite not in MODES:
            raise ConfigError(f"callbacks.nonfinite.on_nonfinite={on_nonfinite!r} is invalid: use 'stop' or 'skip'")
        if not isinstance(max_consecutive_skips, int) or max_consecutive_skips < 1:
            raise ConfigError(f"callbacks.nonfinite.max_consecutive_skips={max_consecutive_skips!r} is invalid: "
                              "expected an int >= 1")
        self.on_nonfinite = on_nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped_steps = 0
        self.consecutive = 0
        self._bad_loss: str | None = None

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        if self._bad_loss is None and not bool(torch.isfinite(loss).all()):  # any micro-batch of the window
            self._bad_loss = f"loss ({float(loss.detach())})"

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        problem, self._bad_loss = self._bad_loss, None
        # fp16 (`16-mixed`): the GradScaler overflows on purpose now and then, skips that step itself and lowers
        # its scale; inf gradients are its business there, a non-finite loss still is ours.
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        if problem is None and not scaled:
            bad = first_nonfinite((name, p.grad) for name, p in pl_module.named_parameters())
            problem = None if bad is None else f"gradient of {bad}"
        if not trainer.strategy.reduce_boolean_decision(problem is not None, all=False):
            self.consecutive = 0
            return
        problem = problem or "gradient (on another rank)"
        step = trainer.global_step
        if self.on_nonfinite == "stop":
            raise NonFiniteError(self._message(trainer, problem, step, "", ", or set "
                                               "callbacks.nonfinite.on_nonfinite=skip to skip such steps"))
        self.skipped_steps += 1
        self.consecutive += 1
        if self.consecutive > self.max_consecutive_skips:
            raise NonFiniteError(self._message(trainer, problem, step, f" for {self.consecutive} steps in a row "
                                               "(skipping is not recovering)", ""))
        for p in pl_module.parameters():
            p.grad = None
        log.warning("non-finite %s at step %d: optimizer step skipped (%d skipped so far)", problem, step,
                    self.skipped_steps)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        pl_module.log("train/nonfinite_skipped_steps", float(self.skipped_steps), on_step=True, batch_size=1)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        bad = first_nonfinite((k, v) for k, v in checkpoint.get("state_dict", {}).items()
                              if isinstance(v, Tensor) and v.is_floating_point())
        # every rank decides together: under FSDP only rank 0 holds the gathered weights, and a rank that went on
        # to save alone would wait at the checkpoint's barrier until the collective timeout
        if trainer.strategy.reduce_boolean_decision(bad is not None, all=False):
            raise NonFiniteError(f"refusing to write a checkpoint at step {trainer.global_step}: weight "
                                 f"{bad or '(on another rank)'} is not finite; the last good checkpoint is "
                                 f"{last_checkpoint(trainer)}")

    @staticmethod
    def _message(trainer: L.Trainer, problem: str, step: int, detail: str, more_fixes: str) -> str:
        return (f"non-finite {problem} at step {step}{detail}; training stopped before the optimizer step, "
                f"so the last good checkpoint is {last_checkpoint(trainer)}. Resume from it (ckpt_path=...) "
                f"with a lower optim.lr, more optim.warmup_steps or a lower trainer.gradient_clip_val{more_fixes}")

    def state_dict(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped_steps, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped_steps = int(state_dict["skipped_steps"])
        self.consecutive = int(state_dict["consecutive"])
