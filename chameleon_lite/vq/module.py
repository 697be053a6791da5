"""VQModule: the LightningModule that trains an image tokenizer.

Batches are ``{"images": uint8 (B, 3, S, S), "skipped": int}`` (see ``vq/data.py``). Logged:
``train/{total,l1,mse,commitment,codebook,psnr,usage,perplexity,restarted_codes}`` (usage and
perplexity over a rolling window of ``usage_window`` steps), ``val/{psnr,mse,usage,perplexity}``
(over the whole validation run) and ``data/skipped_images`` per epoch. Each validation writes a
reconstruction grid PNG (top row originals, bottom row reconstructions) to
``<log_dir>/reconstructions/step_XXXXXXX.png``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torchmetrics.aggregation import MeanMetric
from torchvision.utils import make_grid, save_image

from chameleon_lite.eval.vq_metrics import psnr
from chameleon_lite.vq.api import ImageTokenizer
from chameleon_lite.vq.config import VQConfig
from chameleon_lite.vq.losses import VQLoss, VQLossConfig
from chameleon_lite.vq.model import VQModel
from chameleon_lite.vq.quantizer import CodebookUsage

log = logging.getLogger(__name__)


def to_model_range(images: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1]."""
    return images.float() / 127.5 - 1.0


class VQModule(L.LightningModule):
    """Trains :class:`VQModel` with :class:`VQLoss` using one AdamW over generator (+ discriminator) params.

    Learning rate: linear warmup over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr``
    at ``trainer.max_steps``.
    """

    def __init__(self, model: Mapping[str, Any], loss: Mapping[str, Any] | None = None, lr: float = 4e-4,
                 betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0, warmup_steps: int = 100,
                 min_lr_ratio: float = 0.1, disc_lr: float | None = None, usage_window: int = 100,
                 grid_images: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = VQConfig.from_dict(model)
        self.loss_config = VQLossConfig.from_dict(loss or {})
        self.model = VQModel(self.config)
        self.loss = VQLoss(self.loss_config)
        self.train_usage = CodebookUsage(self.config.codebook_size, window=usage_window)
        self.val_usage = CodebookUsage(self.config.codebook_size)
        # per-image means over every process, synced once at the epoch's end (a process whose batches were all
        # empty still joins the same collectives)
        self.val_psnr, self.val_mse = MeanMetric(), MeanMetric()
        self.skipped_this_epoch = 0

    def tokenizer(self, name: str | None = None) -> ImageTokenizer:
        """An :class:`ImageTokenizer` sharing this module's model (puts the model in eval mode)."""
        return ImageTokenizer(self.model, name=name)

    # ------------------------------------------------------------------------------- training
    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        self.skipped_this_epoch += int(batch["skipped"])
        if batch["images"].shape[0] == 0:
            # Every file of this batch was bad. The quantizer's collectives and a zero loss over every parameter
            # (rather than None) keep DDP ranks in step with those that had images.
            self.model.quantize.empty_step()
            return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
        x = to_model_range(batch["images"])
        recon, quant = self.model(x)
        total, terms = self.loss(x, recon.float(), quant, self.global_step)
        self.train_usage.update(quant.indices)
        train_psnr = psnr((x + 1) / 2, ((recon.detach().float() + 1) / 2).clamp(0, 1)).mean()
        batch_size = x.shape[0]
        self.log_dict({f"train/{k}": v for k, v in terms.items() if k != "total"}, batch_size=batch_size)
        self.log("train/loss", terms["total"], prog_bar=True, batch_size=batch_size)
        self.log("train/psnr", train_psnr, prog_bar=True, batch_size=batch_size)
        self.log("train/usage", self.train_usage.usage(), prog_bar=True, batch_size=batch_size)
        self.log("train/perplexity", self.train_usage.perplexity(), batch_size=batch_size)
        self.log("train/restarted_codes", float(self.model.quantize.last_restarted), batch_size=batch_size)
        return total

    def on_train_epoch_end(self) -> None:
        skipped = int(self.all_gather(torch.tensor(self.skipped_this_epoch, device=self.device)).sum())
        self.log("data/skipped_images", float(skipped))
        if skipped and self.trainer.is_global_zero:
            log.warning("epoch %d: skipped %d unreadable image(s) (each logged above with its path and reason; "
                        "set data.strict=true to stop at the first one)", self.current_epoch, skipped)
        self.skipped_this_epoch = 0

    # ----------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self.val_usage.reset()

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        if batch["images"].shape[0] == 0:
            return
        x = to_model_range(batch["images"])
        recon, quant = self.model(x)
        original, decoded = (x + 1) / 2, ((recon.float() + 1) / 2).clamp(0, 1)
        self.val_usage.update(quant.indices)
        self.val_psnr.update(psnr(original, decoded))
        self.val_mse.update((original - decoded).pow(2).flatten(1).mean(1))
        if batch_idx == 0 and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self._save_grid(original, decoded)

    def on_validation_epoch_end(self) -> None:
        counts = self.all_gather(self.val_usage.counts.to(self.device))
        if counts.ndim == 2:
            counts = counts.sum(0)
        self.val_usage.counts = counts.cpu()
        images = torch.tensor(float(self.val_psnr.update_count), device=self.device)  # (batches, each one update)
        if self.trainer.world_size > 1:
            images = self.trainer.strategy.reduce(images, reduce_op="sum")
        for name, metric in (("psnr", self.val_psnr), ("mse", self.val_mse)):
            if images > 0:  # (no val image read anywhere: nothing to log, rather than NaN)
                self.log(f"val/{name}", metric.compute(), prog_bar=name == "psnr")
            metric.reset()
        self.log("val/usage", self.val_usage.usage(), prog_bar=True)
        self.log("val/perplexity", self.val_usage.perplexity())

    def _save_grid(self, original: Tensor, decoded: Tensor) -> None:
        n = min(self.hparams.grid_images, original.shape[0])
        grid = make_grid(torch.cat([original[:n], decoded[:n]]).cpu(), nrow=n, padding=2, pad_value=0.5)
        directory = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "reconstructions"
        directory.mkdir(parents=True, exist_ok=True)
        save_image(grid, directory / f"step_{self.global_step:07d}.png")

    # ------------------------------------------------------------------------------ optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = [{"params": [p for p in self.model.parameters() if p.requires_grad], "weight_decay": hp.weight_decay}]
        if self.loss.discriminator is not None:
            groups.append({"params": list(self.loss.discriminator.parameters()), "weight_decay": 0.0,
                           "lr": hp.disc_lr or hp.lr})
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        warmup, floor = max(0, hp.warmup_steps), hp.min_lr_ratio

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
