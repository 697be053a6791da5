"""Training objective of the image tokenizer: pixel losses + quantizer loss (+ optional PatchGAN).

No term needs downloaded weights (no LPIPS): reconstruction is L1 + MSE on [-1, 1] pixels, which
keeps flat colours exact and edges sharp on the shapes world. The optional adversarial term is a
pix2pix PatchGAN with hinge losses (taming-transformers / LlamaGen), switched on by
``disc_weight > 0`` and applied from ``disc_start`` on.

Generator and discriminator are trained by ONE optimizer step on ONE scalar: the discriminator's
parameters are frozen while it scores the reconstruction for the generator, and it sees only
detached reconstructions for its own loss, so each half gets exactly its own gradient. That keeps
Lightning's automatic optimisation (gradient clipping, accumulation, ``max_steps`` counting
batches) intact.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from chameleon_lite.vq.config import VQConfigError
from chameleon_lite.vq.quantizer import QuantizerOutput


@dataclass(frozen=True)
class VQLossConfig:
    """Weights of the loss terms (``conf/vq/<preset>.yaml``'s ``loss:`` block)."""

    l1_weight: float = 1.0
    l2_weight: float = 1.0
    quantizer_weight: float = 1.0
    disc_weight: float = 0.0
    disc_start: int = 0
    disc_layers: int = 3
    disc_channels: int = 64

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise VQConfigError(f"vq.loss.{f.name} = {value!r} is invalid: expected a number >= 0")
        if self.disc_weight > 0 and (self.disc_layers < 1 or self.disc_channels < 1):
            raise VQConfigError("vq.loss.disc_layers and vq.loss.disc_channels must be >= 1 when disc_weight > 0")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> VQLossConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise VQConfigError(f"unknown vq.loss key(s) {unknown}; valid keys are {sorted(known)}")
        return cls(**dict(values))


class PatchDiscriminator(nn.Module):
    """pix2pix PatchGAN: (B, 3, H, W) -> (B, 1, h, w) real/fake logits, one per overlapping patch."""

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, n_layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False), nn.BatchNorm2d(out),
                       nn.LeakyReLU(0.2)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def hinge_discriminator_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


class VQLoss(nn.Module):
    """Total training loss. Holds the discriminator (when enabled) so it is trained and checkpointed
    with the model; ``forward`` returns the scalar to backpropagate and detached terms to log."""

    def __init__(self, cfg: VQLossConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.discriminator = (PatchDiscriminator(channels=cfg.disc_channels, n_layers=cfg.disc_layers)
                              if cfg.disc_weight > 0 else None)

    def forward(self, images: Tensor, recon: Tensor, quant: QuantizerOutput, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """``images``/``recon`` (B, 3, H, W) in [-1, 1]; ``step`` = optimizer steps taken so far."""
        l1 = (recon - images).abs().mean()
        mse = (recon - images).pow(2).mean()
        total = self.cfg.l1_weight * l1 + self.cfg.l2_weight * mse + self.cfg.quantizer_weight * quant.loss
        logs = {"l1": l1, "mse": mse, "commitment": quant.commitment, "codebook": quant.codebook}
        if self.discriminator is not None:
            adversarial, disc_loss = self._adversarial(images, recon, active=step >= self.cfg.disc_start)
            total = total + self.cfg.disc_weight * adversarial + disc_loss
            logs.update(generator_adv=adversarial, disc=disc_loss)
        logs["total"] = total
        return total, {k: v.detach() for k, v in logs.items()}

    def _adversarial(self, images: Tensor, recon: Tensor, active: bool) -> tuple[Tensor, Tensor]:
        disc = self.discriminator
        if not active:
            # Keep the discriminator in the graph with zero gradient so DDP sees every parameter used.
            zero = sum(p.sum() for p in disc.parameters()) * 0.0
            return zero, zero
        disc.requires_grad_(False)
        generator_adv = -disc(recon).mean()  # gradient reaches the generator only
        disc.requires_grad_(True)
        disc_loss = hinge_discriminator_loss(disc(images.detach()), disc(recon.detach()))
        return generator_adv, disc_loss
