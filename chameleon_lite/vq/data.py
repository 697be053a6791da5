"""Training images for the tokenizer: the shapes world by default, or a folder / JSONL of user files.

Every dataset yields uint8 (3, S, S) tensors; user files that fail to load become ``None`` and are
dropped (and counted) by :func:`collate_images`, so one corrupt JPEG in a scrape costs one sample,
not the run. ``strict=True`` raises the :class:`~chameleon_lite.vq.image_io.ImageLoadError` instead.
Skip counts travel with the batch (``batch["skipped"]``) because the datasets run inside
DataLoader worker processes whose counters the trainer cannot see.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF

from chameleon_lite.config import ConfigError
from chameleon_lite.data.shapes import ShapesWorld
from chameleon_lite.data.shapes_scene import COLOURS
from chameleon_lite.vq.image_io import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIDE,
    ImageLoadError,
    center_square_resize,
    load_image,
)

log = logging.getLogger(__name__)

_RECOLOUR_STREAM = 7  # the recolouring's random stream, apart from the world's splits (0-2)
_PALETTE = torch.tensor(list(COLOURS.values()), dtype=torch.uint8)  # (colours, 3), COLOURS' order
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def recolour(image: Tensor, permutation: Sequence[int]) -> Tensor:
    """A shapes image with palette colour ``i`` repainted as palette colour ``permutation[i]``.

    Shapes images have hard edges and exact :data:`~chameleon_lite.data.shapes_scene.COLOURS` values,
    so the swap is exact: the result is the image of the same layout in other colours. Other pixels
    (the background) are kept.
    """
    if sorted(permutation) != list(range(len(_PALETTE))):
        raise ValueError(f"permutation must order all {len(_PALETTE)} palette colours, got {list(permutation)}")
    masks = [(image == colour[:, None, None]).all(dim=0) for colour in _PALETTE]  # before any repainting
    out = image.clone()
    for mask, target in zip(masks, permutation, strict=True):
        out[:, mask] = _PALETTE[target][:, None]
    return out


class ShapesImages(Dataset):
    """The images of a :class:`~chameleon_lite.data.shapes.ShapesWorld` split (captions dropped).

    ``recolour=True``: each image's palette colours are swapped by a random permutation (drawn from
    ``(seed, index)``, so deterministic), so a tokenizer trained on them sees every colour on every
    shape, the colour-shape pairs held out of the split included. The transformer's data never
    does; only the image vocabulary covers them (README Results, session 24).
    """

    def __init__(self, seed: int, image_size: int, split: str, length: int, recolour: bool = False) -> None:
        self.world = ShapesWorld(seed=seed, image_size=image_size, split=split, length=length)
        self.seed, self.recolour = seed, recolour

    def __len__(self) -> int:
        return len(self.world)

    def __getitem__(self, index: int) -> Tensor:
        image = self.world[index].image
        if not self.recolour:
            return image
        permutation = np.random.default_rng([self.seed, _RECOLOUR_STREAM, index]).permutation(len(COLOURS))
        return recolour(image, permutation.tolist())


class ImageFileDataset(Dataset):
    """Image files -> uint8 (3, S, S) (short side centre-cropped, resized), or ``None`` for a bad file.

    Bad files (see :func:`~chameleon_lite.vq.image_io.load_image`) are logged with their path and
    reason and yield ``None``; with ``strict=True`` they raise ``ImageLoadError``.
    """

    def __init__(self, paths: Sequence[Path], image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                 min_side: int = DEFAULT_MIN_SIDE, strict: bool = False) -> None:
        self.paths = list(paths)
        self.image_size = image_size
        self.max_pixels = max_pixels
        self.min_side = min_side
        self.strict = strict

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor | None:
        path = self.paths[index]
        try:
            image = load_image(path, max_pixels=self.max_pixels, min_side=self.min_side)
        except ImageLoadError as err:
            if self.strict:
                raise
            log.warning("skipping bad image: %s", err)
            return None
        return center_square_resize(TF.pil_to_tensor(image), self.image_size)


def list_image_folder(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive, by suffix), sorted; raises if there are none."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.folder={folder}: not a directory; pass a folder of images")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"data.folder={folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    return paths


def read_image_jsonl(jsonl: str | Path) -> list[Path]:
    """Paths from a JSONL file of ``{"image": path}`` records; relative paths are relative to the file."""
    source = Path(jsonl).expanduser()
    if not source.is_file():
        raise FileNotFoundError(f"data.jsonl={jsonl}: file not found")
    paths = []
    for number, line in enumerate(source.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            image = record["image"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{source}:{number}: expected a JSON object with an \"image\" path, got "
                             f"{line[:80]!r}") from None
        if not isinstance(image, str) or not image:
            raise ValueError(f"{source}:{number}: \"image\" must be a non-empty path string, got {image!r}")
        path = Path(image).expanduser()
        paths.append(path if path.is_absolute() else source.parent / path)
    if not paths:
        raise ValueError(f"data.jsonl={jsonl}: no records")
    return paths


def collate_images(items: list[Tensor | None]) -> dict[str, Tensor]:
    """Stack the good images -> ``{"images": uint8 (B, 3, S, S), "skipped": int64 scalar}`` (B may be 0)."""
    good = [item for item in items if item is not None]
    skipped = torch.tensor(len(items) - len(good))
    if not good:
        return {"images": torch.empty(0, 3, 0, 0, dtype=torch.uint8), "skipped": skipped}
    return {"images": torch.stack(good), "skipped": skipped}


def split_paths(paths: Sequence[Path], val_size: int, seed: int) -> tuple[list[Path], list[Path]]:
    """Deterministic (train, val) split holding out ``val_size`` files (at most half of them)."""
    order = list(range(len(paths)))
    random.Random(seed).shuffle(order)
    n_val = min(val_size, len(paths) // 2)
    held = set(order[:n_val])
    return ([p for i, p in enumerate(paths) if i not in held], [p for i, p in enumerate(paths) if i in held])


class VQDataModule(L.LightningDataModule):
    """Train/val loaders of images for the tokenizer.

    Source: ``folder`` (recursive image folder) or ``jsonl`` (``{"image": path}`` lines) if set,
    else the shapes world (``train_length``/``val_length`` samples of its train/val splits;
    ``recolour``: the training images recoloured, :class:`ShapesImages`, validation as drawn).
    For user files ``val_length`` files are held out for validation.
    """

    def __init__(self, image_size: int, batch_size: int = 32, num_workers: int = 0, seed: int = 0,
                 folder: str | None = None, jsonl: str | None = None, train_length: int = 1_000_000,
                 val_length: int = 256, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE,
                 strict: bool = False, recolour: bool = False) -> None:
        super().__init__()
        if folder and jsonl:
            raise ValueError("set only one of data.folder and data.jsonl")
        if recolour and (folder or jsonl):
            raise ConfigError("data.recolour=true swaps the shapes world's palette colours; user images have no "
                              "palette: drop data.recolour, or data.folder / data.jsonl")
        self.recolour = recolour
        self.image_size, self.batch_size, self.num_workers, self.seed = image_size, batch_size, num_workers, seed
        self.folder, self.jsonl = folder, jsonl
        self.train_length, self.val_length = train_length, val_length
        self.file_options = {"max_pixels": max_pixels, "min_side": min_side, "strict": strict}
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    @property
    def source(self) -> str:
        return "folder" if self.folder else "jsonl" if self.jsonl else "shapes"

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.source == "shapes":
            self.train_set = ShapesImages(self.seed, self.image_size, "train", self.train_length, self.recolour)
            self.val_set = ShapesImages(self.seed, self.image_size, "val", self.val_length)
            return
        paths = list_image_folder(self.folder) if self.folder else read_image_jsonl(self.jsonl)
        train, val = split_paths(paths, self.val_length, self.seed)
        if len(train) < self.batch_size:  # drop_last would leave no training batch: fit would do nothing
            raise ConfigError(f"data.{self.source}: {len(paths)} images leave {len(train)} for training after "
                              f"{len(val)} held out for validation, fewer than data.batch_size={self.batch_size}: "
                              "add images, or lower data.batch_size / data.val_length")
        log.info("data.%s: %d images, %d for training and %d held out for validation (data.val_length=%d, at most "
                 "half of them)", self.source, len(paths), len(train), len(val), self.val_length)
        self.train_set = ImageFileDataset(train, self.image_size, **self.file_options)
        self.val_set = ImageFileDataset(val, self.image_size, **self.file_options)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        # Shapes-world indices are already independent random scenes: only user files need shuffling.
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=train and self.source != "shapes",
                          num_workers=self.num_workers, collate_fn=collate_images, drop_last=train,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)
