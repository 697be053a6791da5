"""Pictures for people: a grid of images, each with its caption printed underneath."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import make_grid


def _wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels; explicit newlines start new lines."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        start = len(lines)
        for word in paragraph.split():
            if len(lines) > start and font.getlength(f"{lines[-1]} {word}") <= width:
                lines[-1] = f"{lines[-1]} {word}"
            else:
                lines.append(word)
        if len(lines) == start:
            lines.append("")
    return lines


def make_grid_with_captions(
    images: torch.Tensor | Sequence[torch.Tensor],
    captions: Sequence[str],
    *,
    nrow: int = 8,
    min_tile_width: int = 160,
    font_size: int = 12,
    padding: int = 4,
) -> Image.Image:
    """One RGB picture: `images` tiled `nrow` per row, each above its word-wrapped caption.

    images: (N, 3, H, W) tensor or N (3, H, W) tensors of one size, uint8 or float in [0, 1]
    (as the image tokenizer decodes them), on any device. Each is upscaled by an integer factor
    (nearest neighbour, pixels stay crisp) to at least `min_tile_width` wide. Captions wrap at
    the tile width and at explicit newlines; Pillow's built-in font (no downloads). Raises
    ValueError when the numbers of images and captions differ or the images are not CHW RGB.
    """
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions")
    if len(images) == 0:
        raise ValueError("make_grid_with_captions needs at least one image")
    batch = (images if isinstance(images, torch.Tensor) else torch.stack(list(images))).detach().cpu()
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"images must be RGB (N, 3, H, W), got shape {tuple(batch.shape)}")
    if batch.dtype != torch.uint8:
        batch = (batch.float().clamp(0, 1) * 255).round().to(torch.uint8)
    scale = max(1, math.ceil(min_tile_width / batch.shape[-1]))
    batch = batch.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    width = batch.shape[-1]
    font = ImageFont.load_default(size=font_size)
    wrapped = [_wrap(caption, font, width - 4) for caption in captions]
    line_height = font_size + 3
    panel_height = line_height * max(len(lines) for lines in wrapped) + 4
    tiles = []
    for image, lines in zip(batch, wrapped):
        panel = Image.new("RGB", (width, panel_height), "white")
        draw = ImageDraw.Draw(panel)
        for i, line in enumerate(lines):
            draw.text((2, 2 + i * line_height), line, fill="black", font=font)
        tiles.append(torch.cat([image, pil_to_tensor(panel)], dim=1))  # (3, H + panel, W)
    return to_pil_image(make_grid(tiles, nrow=nrow, padding=padding, pad_value=128))


def save_captioned_grid(
    images: torch.Tensor | Sequence[torch.Tensor],
    captions: Sequence[str],
    path: str | Path,
    **grid_options: int,
) -> Path:
    """Write `make_grid_with_captions(images, captions, **grid_options)` as a PNG at `path`
    (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid_with_captions(images, captions, **grid_options).save(path, format="PNG")
    return path
