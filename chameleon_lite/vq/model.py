"""VQGAN-style image tokenizer network: ResNet encoder -> quantizer -> ResNet decoder.

The layout and parameter names follow taming-transformers' encoder/decoder as used by Chameleon
(``encoder.down.{i}.block.{j}``, ``encoder.mid.attn_1``, ``quant_conv``, ``quantize.embedding``...),
so the encoder half loads HF ``ChameleonVQVAE`` weights key for key when the config matches
(``encoder="conv"``, ``norm_groups=32``, ``l2_normalize=False``). ``encoder="patch"`` swaps in
:class:`PatchEncoder` (each f x f patch encoded on its own); the decoder is the same for both.
Pixels enter and leave in [-1, 1].

Shapes for the ``shapes`` preset (64 px, multipliers (1, 2, 4, 4), f = 8, patch encoder)::

    x (B, 3, 64, 64) -> encoder -> (B, latent, 8, 8) -> quant_conv -> z (B, embed_dim, 8, 8)
      -> quantize -> codes (B, 8, 8) / q (B, embed_dim, 8, 8) -> post_quant_conv -> decoder -> (B, 3, 64, 64)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chameleon_lite.vq.config import VQConfig
from chameleon_lite.vq.quantizer import QuantizerOutput, VectorQuantizer


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice plus a (1x1 when the width changes) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a (B, C, h, w) map, residual."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (proj(n).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))  # (B, hw, C)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, hw, C)
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv with taming's asymmetric (right/bottom) zero padding: (h, w) -> (h/2, w/2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 conv: (h, w) -> (2h, 2w)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int, cfg: VQConfig) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, cfg.norm_groups, cfg.dropout)
    mid.attn_1 = AttnBlock(channels, cfg.norm_groups) if cfg.mid_attention else nn.Identity()
    mid.block_2 = ResnetBlock(channels, channels, cfg.norm_groups, cfg.dropout)
    return mid


class Encoder(nn.Module):
    """(B, in_channels, S, S) -> (B, latent_channels, S/f, S/f); attention only at the lowest resolution."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_multipliers]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = cfg.base_channels
        for level, width in enumerate(widths):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, width, cfg.norm_groups, cfg.dropout))
                block_in = width
            if level != len(widths) - 1:
                stage.downsample = Downsample(block_in)
            self.down.append(stage)
        self.mid = _mid(block_in, cfg)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, block_in, eps=1e-6)
        self.conv_out = nn.Conv2d(block_in, cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level, stage in enumerate(self.down):
            for block in stage.block:
                h = block(h)
            if level != len(self.down) - 1:
                h = stage.downsample(h)  # (B, C, H/2, W/2)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class PatchEncoder(nn.Module):
    """(B, in_channels, S, S) -> (B, latent_channels, S/f, S/f), each f x f patch encoded on its own.

    A stride-f patchify conv, then ``num_res_blocks + 1`` pre-norm residual MLPs applied per position
    (LayerNorm over channels, not GroupNorm, whose statistics would mix positions). No operation
    looks across patches, so a code is a function of its own pixels only.
    """

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        width = cfg.base_channels * cfg.channel_multipliers[-1]
        f = cfg.downsample_factor
        self.patchify = nn.Conv2d(cfg.in_channels, width, f, stride=f)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.SiLU(), nn.Dropout(cfg.dropout),
                          nn.Linear(4 * width, width))
            for _ in range(cfg.num_res_blocks + 1))
        self.norm_out = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, cfg.latent_channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.patchify(x).permute(0, 2, 3, 1)  # (B, h, w, width): channels last for the per-position MLPs
        for block in self.blocks:
            h = h + block(h)
        return self.proj_out(F.silu(self.norm_out(h))).permute(0, 3, 1, 2)  # (B, latent, h, w)


class Decoder(nn.Module):
    """(B, latent_channels, S/f, S/f) -> (B, 3, S, S), mirror of :class:`Encoder` with one extra block per level."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_multipliers]
        block_in = widths[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, cfg)
        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, widths[level], cfg.norm_groups, cfg.dropout))
                block_in = widths[level]
            if level != 0:
                stage.upsample = Upsample(block_in)
            self.up.insert(0, stage)  # up[level] is the stage at resolution level ``level``
        self.norm_out = nn.GroupNorm(cfg.norm_groups, block_in, eps=1e-6)
        self.conv_out = nn.Conv2d(block_in, cfg.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(range(len(self.up))):
            stage = self.up[level]
            for block in stage.block:
                h = block(h)
            if level != 0:
                h = stage.upsample(h)  # (B, C, 2H, 2W)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQModel(nn.Module):
    """Encoder, 1x1 ``quant_conv`` into code space, :class:`VectorQuantizer`, 1x1 ``post_quant_conv``, decoder."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = PatchEncoder(cfg) if cfg.encoder == "patch" else Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.latent_channels, cfg.embed_dim, 1)
        self.quantize = VectorQuantizer(
            cfg.codebook_size, cfg.embed_dim, beta=cfg.beta, l2_normalize=cfg.l2_normalize, ema_decay=cfg.ema_decay,
            dead_code_restart=cfg.dead_code_restart, dead_code_window=cfg.dead_code_window,
            restart_buffer_size=cfg.restart_buffer_size)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.latent_channels, 1)
        self.decoder = Decoder(cfg)

    def encode(self, x: Tensor) -> QuantizerOutput:
        """Pixels (B, 3, S, S) in [-1, 1] -> quantizer output (codes (B, S/f, S/f) and losses)."""
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, quantized: Tensor) -> Tensor:
        """Code vectors (B, embed_dim, h, w) -> pixels (B, 3, h*f, w*f), roughly in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(quantized))

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Integer code grid (B, h, w) -> pixels (B, 3, h*f, w*f); indices must be in range (not checked here)."""
        return self.decode(self.quantize.lookup(indices))

    def forward(self, x: Tensor) -> tuple[Tensor, QuantizerOutput]:
        """Reconstruction (B, 3, S, S) and the quantizer output for ``x`` (B, 3, S, S) in [-1, 1]."""
        quant = self.encode(x)
        return self.decode(quant.quantized), quant

    def export_state_dict(self) -> dict[str, Tensor]:
        """Weights needed for inference (training-only quantizer buffers left out), contiguous, detached."""
        skip = {f"quantize.{name}" for name in VectorQuantizer.TRAINING_STATE}
        return {k: v.detach().contiguous() for k, v in self.state_dict().items() if k not in skip}

    def load_export_state_dict(self, state: dict[str, Tensor]) -> None:
        """Inverse of :meth:`export_state_dict`; raises ValueError listing missing/unexpected keys."""
        try:
            result = self.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatch
            raise ValueError(f"weights do not match the config: {err}") from None
        training_state = {f"quantize.{name}" for name in VectorQuantizer.TRAINING_STATE}
        missing = [k for k in result.missing_keys if k not in training_state]
        if missing or result.unexpected_keys:
            raise ValueError(f"weights do not match the config: missing {missing[:8]}, "
                             f"unexpected {list(result.unexpected_keys)[:8]}")
        if self.quantize.ema_decay is not None:
            with torch.no_grad():
                self.quantize.ema_embed_sum.copy_(self.quantize.embedding.weight)
                self.quantize.ema_cluster_size.fill_(1.0)
