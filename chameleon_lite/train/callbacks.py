"""Training callbacks: checkpoints that include the final step, stability monitor, token throughput,
loss-curve plot."""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)


class FinalStepCheckpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint`, which also saves the step training ends at.

    With ``every_n_train_steps``, Lightning saves (and refreshes ``last.ckpt``) only at multiples of the
    interval, so a run whose ``max_steps`` is not one ends with ``last.ckpt`` holding an older step: a
    2,800-step run saving every 500 steps left step 2,500 there, and evaluating ``last.ckpt`` measured a
    model 300 steps short of the exported weights. At the end of a fit whose final step was not saved, this
    saves it as the interval would have (``stepNNNNNN.ckpt``, then ``last.ckpt``). Runs stopped by an
    exception (the non-finite guard, Ctrl-C) end in ``on_exception`` instead and save nothing more.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        unsaved = trainer.global_step > 0 and not self._should_skip_saving_checkpoint(trainer)
        if self._every_n_train_steps and unsaved:  # the calls ModelCheckpoint.on_train_batch_end makes
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)


class StabilityMonitor(L.Callback):
    """Logs the Chameleon paper's early-warning signals and warns when they drift.

    The paper (sec. 3.1) traces divergence to uncontrolled growth of the final hidden-state norm
    and of logits (the softmax's translation invariance lets them drift). The training step
    returns ``stability/hidden_rms`` and ``stability/max_logit_{text,image}``; this callback logs
    them every step and warns once when a signal exceeds ``warn_ratio`` x its value at the end of
    warm-up (the first ``reference_step`` steps) — usually hundreds of steps before the loss
    spikes.
    """

    def __init__(self, warn_ratio: float = 10.0, reference_step: int = 50):
        self.warn_ratio = warn_ratio
        self.reference_step = reference_step
        self.reference: dict[str, float] = {}
        self.warned: set[str] = set()

    # Kept in checkpoints: a run resumed after the warm-up could otherwise never measure its reference again.
    def state_dict(self) -> dict[str, Any]:
        return {"reference": dict(self.reference), "warned": sorted(self.warned)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reference = dict(state_dict.get("reference", {}))
        self.warned = set(state_dict.get("warned", ()))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stats = outputs.get("stability") if isinstance(outputs, dict) else None
        if not stats:
            return
        pl_module.log_dict(stats, on_step=True, batch_size=batch["input_ids"].shape[0])
        step = trainer.global_step
        for key, value in stats.items():
            v = float(value)
            if step <= self.reference_step:
                self.reference[key] = v
            elif key in self.reference and key not in self.warned and v > self.warn_ratio * self.reference[key]:
                self.warned.add(key)
                log.warning("stability: %s = %.3g at step %d is > %.0fx its value after warm-up (%.3g): "
                            "divergence risk (QK-norm on? z-loss on? lower optim.lr?)", key, v, step,
                            self.warn_ratio, self.reference[key])


class TokenThroughput(L.Callback):
    """Logs ``perf/tokens_per_s`` (all row tokens, padding included) and ``perf/loss_tokens_per_s``."""

    def __init__(self) -> None:
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        dt = time.perf_counter() - self._t0
        if dt <= 0:
            return
        world = trainer.world_size
        n = batch["input_ids"].numel() * world
        pl_module.log("perf/tokens_per_s", n / dt, on_step=True, prog_bar=True, batch_size=1)
        if isinstance(outputs, dict) and "n_tokens" in outputs:
            pl_module.log("perf/loss_tokens_per_s", float(outputs["n_tokens"]) * world / dt, on_step=True,
                          batch_size=1)


def read_metrics_csv(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Lightning CSVLogger ``metrics.csv`` -> {metric: [(step, value), ...]} (empty cells skipped). A metric's
    step that comes again (a resumed run redoing the steps after its last checkpoint) replaces the points
    from that step on: the curve is the one the run ended with."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = int(row.get("step") or 0)
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                points = series.setdefault(key, [])
                while points and points[-1][0] >= step:
                    points.pop()
                points.append((step, float(value)))
    return series


def plot_curves(series: dict[str, list[tuple[int, float]]], keys: list[str], path: Path, title: str = "") -> Path:
    """Draw the named metric series into one PNG (log-y when all values are positive)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    drawn = False
    for key in keys:
        points = series.get(key)
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, label=key, linewidth=1.2)
            drawn = True
    if drawn and all(v > 0 for k in keys for _, v in series.get(k, [])):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


class LossCurvePlot(L.Callback):
    """At the end of fit, plot train loss (total and per modality) from the CSV log into a PNG."""

    def __init__(self, path: str, keys: tuple[str, ...] = ("train/loss", "train/ce_text", "train/ce_image")):
        self.path = Path(path)
        self.keys = list(keys)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, L.pytorch.loggers.CSVLogger):
                logger.save()
                metrics = Path(logger.log_dir) / "metrics.csv"
                if metrics.is_file():
                    plot_curves(read_metrics_csv(metrics), self.keys, self.path, "training loss")
                    log.info("loss curve -> %s", self.path)
                    print(f"[train] loss curve: {self.path}")
                return
        log.warning("LossCurvePlot: no CSVLogger configured, no loss curve written")

