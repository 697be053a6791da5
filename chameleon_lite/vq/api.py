"""ImageTokenizer: images <-> integer code grids, the only VQ interface the rest of the repo uses.

::

    tok = ImageTokenizer.from_pretrained("tokenizers/shapes")
    codes = tok.encode(images)          # LongTensor (B, 8, 8), values in [0, codebook_size)
    pixels = tok.decode(codes)          # float (B, 3, 64, 64) in [0, 1]
    tok.decode_uint8(codes)             # uint8 (B, 3, 64, 64)

On disk a tokenizer is ``vq.safetensors`` (inference weights only) + ``vq.yaml`` (``VQConfig``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from chameleon_lite.files import atomic_write_bytes, atomic_write_text
from chameleon_lite.vq.config import VQConfig
from chameleon_lite.vq.image_io import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, ImagesInput, prepare_images
from chameleon_lite.vq.model import VQModel

WEIGHTS_NAME = "vq.safetensors"
CONFIG_NAME = "vq.yaml"
FORMAT = "chameleon-lite-vq/1"
#: `ImageTokenizer.code_appearance`: a code's contrast pattern is pooled to at most this side.
APPEARANCE_PATTERN_SIDE = 8
#: A patch whose largest contrast is below this is blank: its pattern is scaled by this, not by its own peak.
_BLANK_CONTRAST = 0.1


class CodeRangeError(ValueError):
    """Codes passed to ``decode`` that are not valid indices of this tokenizer's codebook."""


class ImageTokenizer:
    """Inference wrapper around a :class:`VQModel` (always in eval mode, no gradients).

    ``max_pixels``/``min_side`` guard file and in-memory inputs (see ``image_io.load_image``).
    """

    def __init__(self, model: VQModel, device: str | torch.device | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE,
                 name: str | None = None) -> None:
        self.model = model.eval()
        if device is not None:
            self.model.to(device)
        self.config: VQConfig = model.config
        self.max_pixels = max_pixels
        self.min_side = min_side
        self.name = name

    # ------------------------------------------------------------------------------ properties
    @property
    def image_size(self) -> int:
        """Side in pixels of the square images this tokenizer encodes and decodes."""
        return self.config.image_size

    @property
    def grid_size(self) -> int:
        """Side of the code grid: ``encode`` returns (B, grid_size, grid_size)."""
        return self.config.grid_size

    @property
    def tokens_per_image(self) -> int:
        return self.config.tokens_per_image

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------------------- encode/decode
    def preprocess(self, images: ImagesInput) -> Tensor:
        """Anything image-like -> float (B, 3, S, S) in [0, 1] on the tokenizer's device."""
        x = prepare_images(images, self.image_size, max_pixels=self.max_pixels, min_side=self.min_side)
        return x.to(self.device)

    @torch.inference_mode()
    def encode(self, images: ImagesInput) -> Tensor:
        """Images -> codes, int64 (B, grid_size, grid_size) in ``[0, codebook_size)``.

        ``images``: uint8/uint16/float-in-[0, 1] tensors (C, H, W) or (B, C, H, W), PIL images,
        paths, or a list of them; each is centre-cropped to a square and resized to ``image_size``.
        Deterministic: the same input gives the same codes.
        """
        x = self.preprocess(images)
        return self.model.encode(x * 2.0 - 1.0).indices

    @torch.inference_mode()
    def decode(self, codes: Tensor) -> Tensor:
        """Codes -> float images (B, 3, image_size, image_size) in [0, 1].

        ``codes``: integer (B, h, w), a single grid (h, w), or flat (B, tokens_per_image) rows as the
        language model emits them. Raises :class:`CodeRangeError` for values outside the codebook.
        """
        grid = self._check_codes(codes)
        pixels = self.model.decode_indices(grid.to(self.device))
        return ((pixels.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def decode_uint8(self, codes: Tensor) -> Tensor:
        """Like :meth:`decode`, as uint8 (B, 3, image_size, image_size) (rounded)."""
        return (self.decode(codes) * 255.0).round().to(torch.uint8)

    def code_appearance_size(self, pattern_side: int = APPEARANCE_PATTERN_SIDE) -> int:
        """Features per code of `code_appearance`."""
        return min(pattern_side, self.image_size // self.grid_size) ** 2 + 5

    @torch.inference_mode()
    def code_appearance(self, codes: Tensor, pattern_side: int = APPEARANCE_PATTERN_SIDE, batch: int = 256) -> Tensor:
        """What each code looks like where it is used, as features a linear map can compose: float32
        (codebook_size, pattern_side**2 + 5), one row per code.

        ``codes``: code grids of real images, (B, grid, grid) or (B, tokens_per_image) (e.g. a training set's
        token cache). They are decoded (a code's pixels depend on its neighbours: decoded alone, in a grid
        filled with it, a code shows colours it never has in an image) and every cell is described by

        - its contrast pattern: 1 - luminance per pixel, divided by the cell's largest contrast (a flat-coloured
          shape's mask is then 1 on the shape and 0 on a white background, whatever the colour), average-pooled
          to at most ``pattern_side`` x ``pattern_side``;
        - its ink colour: the RGB mean weighted by contrast;
        - its ink fraction: the pattern's mean.

        A code's row is the mean over its cells, each feature standardised over the codes that occur, plus a
        last feature that is 1 for those; a code that never occurs in ``codes`` has an all-zero row. Pattern and
        colour are separate features, so a linear score of them is a pattern score plus a colour score
        (`model.image_code_embed=appearance`). Deterministic (the decoder is in eval mode).
        """
        grids = self._check_codes(codes)
        g, n = self.grid_size, self.codebook_size
        cell = self.image_size // g
        side = min(pattern_side, cell)
        total = torch.zeros(n, side * side + 4)
        count = torch.zeros(n)
        for first in range(0, grids.shape[0], batch):
            chunk = grids[first:first + batch]
            rgb = self.decode(chunk).float().cpu()  # (b, 3, S, S) in [0, 1]
            rgb = rgb.unfold(2, cell, cell).unfold(3, cell, cell)  # (b, 3, g, g, cell, cell)
            rgb = rgb.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, cell, cell)  # one row per cell, raster order
            contrast = (1.0 - rgb.mean(dim=1)).clamp(min=0.0)  # (cells, cell, cell): 0 on white
            peak = contrast.flatten(1).amax(dim=1).clamp(min=_BLANK_CONTRAST)  # a blank cell's noise stays near 0
            pattern = F.adaptive_avg_pool2d((contrast / peak[:, None, None])[:, None], side).flatten(1)
            ink = (rgb * contrast[:, None]).sum(dim=(2, 3)) / (contrast.sum(dim=(1, 2))[:, None] + 1e-6)
            index = chunk.reshape(-1).cpu()
            total.index_add_(0, index, torch.cat([pattern, ink, pattern.mean(dim=1, keepdim=True)], dim=1))
            count.index_add_(0, index, torch.ones(index.numel()))
        seen = count > 0
        if not seen.any():
            raise ValueError("code_appearance needs at least one code grid, got none")
        mean = total[seen] / count[seen, None]
        features = torch.zeros(n, total.shape[1] + 1)
        features[seen, :-1] = (mean - mean.mean(dim=0)) / mean.std(dim=0, correction=0).clamp(min=1e-6)
        features[seen, -1] = 1.0
        return features

    def _check_codes(self, codes: Tensor) -> Tensor:
        if not isinstance(codes, Tensor):
            codes = torch.as_tensor(codes)
        if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.is_complex():
            raise CodeRangeError(f"codes must be an integer tensor, got dtype {codes.dtype}")
        g = self.grid_size
        shape = tuple(codes.shape)
        if codes.ndim == 2 and shape == (g, g):
            codes = codes.unsqueeze(0)
        elif codes.ndim == 2 and shape[1] == self.tokens_per_image:
            codes = codes.reshape(-1, g, g)
        if codes.ndim != 3 or tuple(codes.shape[1:]) != (g, g) or codes.shape[0] == 0:
            raise CodeRangeError(f"codes of shape {shape}: expected (B, {g}, {g}), ({g}, {g}) or "
                                 f"(B, {self.tokens_per_image})")
        low, high = int(codes.min()), int(codes.max())
        if low < 0 or high >= self.codebook_size:
            raise CodeRangeError(
                f"codes contain values in [{low}, {high}], outside this tokenizer's codebook [0, "
                f"{self.codebook_size}); if these are UnifiedVocab ids, convert them to image codes first "
                "(subtract the vocab's image_offset)")
        return codes.long()

    # ------------------------------------------------------------------------------------ files
    def save_pretrained(self, directory: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
        """Write ``vq.safetensors`` + ``vq.yaml`` into ``directory``, each atomically; returns the dir.

        ``extra`` (e.g. how it was trained) is stored under ``provenance`` in ``vq.yaml``.
        """
        directory = Path(directory)
        state = self.model.export_state_dict()
        atomic_write_bytes(directory / WEIGHTS_NAME,
                           save_safetensors({k: v.cpu() for k, v in state.items()}, metadata={"format": FORMAT}))
        document: dict[str, Any] = {"format": FORMAT, "model": self.config.to_dict()}
        if self.name:
            document["name"] = self.name
        if extra:
            document["provenance"] = extra
        atomic_write_text(directory / CONFIG_NAME, yaml.safe_dump(document, sort_keys=False))
        return directory

    @staticmethod
    def _read_document(config_path: Path) -> tuple[VQConfig, dict]:
        document = yaml.safe_load(config_path.read_text()) or {}
        if not isinstance(document, dict) or document.get("format") != FORMAT or "model" not in document:
            raise ValueError(f"{config_path}: not a chameleon-lite VQ config (expected format: {FORMAT})")
        return VQConfig.from_dict(document["model"]), document

    @classmethod
    def read_config(cls, directory: str | os.PathLike) -> VQConfig:
        """The `VQConfig` of the tokenizer in ``directory`` (its ``vq.yaml``), without loading the weights."""
        return cls._read_document(Path(directory) / CONFIG_NAME)[0]

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device | None = None,
                        **kwargs: Any) -> ImageTokenizer:
        """Load a tokenizer written by :meth:`save_pretrained` (no pickle: YAML + safetensors)."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: an image tokenizer directory holds {CONFIG_NAME} and "
                                        f"{WEIGHTS_NAME} (train one with chameleon-train-vq)")
        config, document = cls._read_document(config_path)
        model = VQModel(config)
        try:
            state = load_safetensors(weights_path.read_bytes())
        except SafetensorError as err:
            raise ValueError(f"{weights_path}: not a readable safetensors file ({err}); re-export it") from None
        try:
            model.load_export_state_dict(state)
        except ValueError as err:
            raise ValueError(f"{weights_path} does not match {config_path}: {err}") from None
        return cls(model, device=device, name=document.get("name"), **kwargs)
