"""VQConfig: the single source of an image tokenizer's shape (presets are YAML, validated here).

A config fixes everything needed to rebuild the network and its quantizer: ``vq.yaml`` next to
``vq.safetensors`` is exactly ``VQConfig.to_dict()`` (plus a format tag), and
``conf/vq/<preset>.yaml``'s ``model:`` block is validated by :meth:`VQConfig.from_dict`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Encoder kinds (see :class:`VQConfig`).
ENCODERS: tuple[str, ...] = ("conv", "patch")


class VQConfigError(ValueError):
    """A VQ config value is wrong; the message names the key and what it must be."""


@dataclass(frozen=True)
class VQConfig:
    """Encoder/decoder/quantizer shape of a VQGAN-style image tokenizer.

    Geometry: ``len(channel_multipliers) - 1`` stride-2 stages, so the downsampling factor is
    ``f = 2 ** (len(channel_multipliers) - 1)`` and an ``image_size`` square image becomes a
    ``grid_size x grid_size`` grid of codes (``grid_size = image_size // f``).

    Quantizer: codes live in an ``embed_dim``-dimensional space (``quant_conv`` maps the
    ``latent_channels`` encoder output down to it, ``post_quant_conv`` back up). With
    ``l2_normalize`` both encoder outputs and codes are projected onto the unit sphere before the
    nearest-neighbour lookup (LlamaGen's remedy for codebook collapse, best with a small
    ``embed_dim`` such as 8). ``ema_decay`` switches the codebook from gradient updates to
    exponential moving averages of assigned encoder outputs. ``dead_code_restart`` re-seeds codes
    that were not hit for ``dead_code_window`` training steps with recent encoder outputs.

    Encoder: ``encoder="conv"`` is taming's ResNet encoder (HF ``ChameleonVQVAE``-compatible); its
    receptive field spans the whole image (3x3 convs, GroupNorm statistics over all positions and
    the mid attention), so a code depends on its neighbourhood, not only on its own patch.
    ``encoder="patch"`` maps each ``f x f`` patch on its own (patchify + per-position residual MLP,
    no spatial mixing): identical patches always get identical codes. That makes the token stream
    far easier for the transformer to model (on the shapes world a blank patch gets one code
    instead of hundreds) while the decoder, still convolutional, uses neighbouring codes to
    rebuild edges.
    """

    image_size: int = 64
    in_channels: int = 3
    base_channels: int = 64
    channel_multipliers: tuple[int, ...] = (1, 1, 2, 2)
    num_res_blocks: int = 1
    mid_attention: bool = True
    latent_channels: int = 64
    norm_groups: int = 32
    dropout: float = 0.0
    codebook_size: int = 512
    embed_dim: int = 8
    l2_normalize: bool = True
    beta: float = 0.25
    ema_decay: float | None = None
    dead_code_restart: bool = True
    dead_code_window: int = 50
    restart_buffer_size: int = 4096
    encoder: str = "conv"

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_multipliers", tuple(int(m) for m in self.channel_multipliers))
        positive = ("image_size", "in_channels", "base_channels", "num_res_blocks", "latent_channels",
                    "norm_groups", "codebook_size", "embed_dim", "dead_code_window", "restart_buffer_size")
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise VQConfigError(f"vq.model.{key} = {value!r} is invalid: expected a positive integer")
        if not self.channel_multipliers or min(self.channel_multipliers) < 1:
            raise VQConfigError(f"vq.model.channel_multipliers = {list(self.channel_multipliers)} is invalid: "
                                "expected a non-empty list of positive integers, one per resolution")
        if self.image_size % self.downsample_factor:
            raise VQConfigError(
                f"vq.model.image_size = {self.image_size} is not divisible by the downsampling factor "
                f"{self.downsample_factor} (2 ** (len(channel_multipliers) - 1)); pick a multiple of it")
        for channels in {self.base_channels * m for m in self.channel_multipliers}:
            if channels % self.norm_groups:
                raise VQConfigError(
                    f"vq.model.norm_groups = {self.norm_groups} does not divide the {channels} channels of "
                    f"a stage (base_channels x channel_multipliers); pick a divisor")
        if self.encoder not in ENCODERS:
            raise VQConfigError(f"vq.model.encoder = {self.encoder!r} is invalid: expected one of {list(ENCODERS)} "
                                "(conv: taming/HF ResNet encoder; patch: each f x f patch encoded on its own)")
        if not 0.0 <= self.dropout < 1.0:
            raise VQConfigError(f"vq.model.dropout = {self.dropout} is invalid: expected 0 <= dropout < 1")
        if self.beta < 0:
            raise VQConfigError(f"vq.model.beta = {self.beta} is invalid: expected >= 0")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise VQConfigError(f"vq.model.ema_decay = {self.ema_decay} is invalid: expected null "
                                "(gradient-updated codebook) or a decay in (0, 1) such as 0.99")

    @property
    def downsample_factor(self) -> int:
        """Pixels per code along each side (``f``)."""
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def grid_size(self) -> int:
        """Codes per side of the code grid."""
        return self.image_size // self.downsample_factor

    @property
    def tokens_per_image(self) -> int:
        return self.grid_size**2

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-able dict; ``from_dict(to_dict())`` is the identity."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["channel_multipliers"] = list(self.channel_multipliers)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> VQConfig:
        """Validate a mapping (a preset's ``model:`` block or ``vq.yaml``); unknown keys are errors."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise VQConfigError(f"unknown vq.model key(s) {unknown}; valid keys are {sorted(known)}")
        return cls(**dict(values))
