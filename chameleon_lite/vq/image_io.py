"""The one place where image files and user images become tokenizer input.

* :func:`load_image` decodes a file (a path, its bytes or a file object) into an RGB ``PIL.Image``
  (the JSONL and webdataset sources reuse it), refusing empty, corrupt, truncated, tiny and oversized
  (decompression-bomb) files with an :class:`ImageLoadError` that names the file and the fix.
* :func:`to_rgb` normalises any PIL mode the way Chameleon does: transparency is composited onto
  white, grayscale/palette/CMYK become RGB, 16-bit samples are scaled to 8 bits.
* :func:`prepare_images` turns tensors, PIL images, paths or lists of them into one float batch
  (B, 3, S, S) in [0, 1]: centre square crop of the short side, then an antialiased resize to S
  (the same pixels as "resize the short side, then centre-crop", without ever materialising a
  huge intermediate for a very long panorama).
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

#: 8000 x 8000: far above any tokenizer resolution, far below what exhausts memory on decode.
DEFAULT_MAX_PIXELS = 64_000_000
#: Files smaller than this on their short side are almost always tracking pixels or broken exports.
DEFAULT_MIN_SIDE = 8

ImageInput = Tensor | Image.Image | str | os.PathLike
ImagesInput = ImageInput | Sequence[ImageInput]

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageLoadError(ValueError):
    """An image (file or in-memory input) that cannot be tokenized; the message names it and the fix."""


def load_image(source: str | os.PathLike | bytes | BinaryIO, max_pixels: int = DEFAULT_MAX_PIXELS,
               min_side: int = DEFAULT_MIN_SIDE, name: str | None = None) -> Image.Image:
    """Decode an image file into an RGB PIL image (EXIF orientation applied).

    ``source`` is a path, the file's bytes (e.g. a webdataset tar member) or a binary file object.
    ``name`` is what error messages call it (default: the path, the file object's ``name``, or
    ``<image bytes>``). The pixel budget is checked from the header, before any pixel is decoded.
    Raises :class:`ImageLoadError` naming the image for a missing, empty, unreadable, corrupt or
    truncated file, one with more than ``max_pixels`` pixels, or a short side below ``min_side``.
    """
    if isinstance(source, (str, os.PathLike)):
        fp: Path | BinaryIO = Path(source)
        name = name or str(fp)
        try:
            size_bytes = fp.stat().st_size
        except OSError as err:
            raise ImageLoadError(f"{name}: cannot read the file ({err.strerror}); check the path") from None
    elif isinstance(source, (bytes, bytearray, memoryview)):
        name = name or "<image bytes>"
        size_bytes = len(source)
        fp = io.BytesIO(source)
    elif hasattr(source, "read"):
        name = name or str(getattr(source, "name", "<image file object>"))
        size_bytes = None
        if source.seekable():
            start = source.tell()
            size_bytes = source.seek(0, io.SEEK_END) - start
            source.seek(start)
        fp = source
    else:
        raise ImageLoadError(f"{name or 'image'}: unsupported type {type(source).__name__}; pass a path, the "
                             "file's bytes or a binary file object")
    if size_bytes == 0:
        raise ImageLoadError(f"{name}: file is empty (0 bytes); re-export the image or remove the file")
    try:
        with warnings.catch_warnings(), _pillow_pixel_limit(max_pixels):
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own budget applies below
            image = Image.open(fp)
    except UnidentifiedImageError:
        raise ImageLoadError(f"{name}: not a readable image (unknown format or corrupt header); "
                             "convert it to PNG/JPEG or remove the file") from None
    except Image.DecompressionBombError as err:
        raise ImageLoadError(f"{name}: {err} (decompression-bomb guard); downscale the image") from None
    except OSError as err:
        raise ImageLoadError(f"{name}: cannot open image ({err}); check the file") from None
    with image:
        check_image_size(image.width, image.height, name, max_pixels, min_side)
        try:
            with warnings.catch_warnings(), _pillow_pixel_limit(max_pixels):
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise ImageLoadError(f"{name}: image data is corrupt or truncated ({err}); "
                                 "re-export the image or remove the file") from None
        return to_rgb(image)


@contextlib.contextmanager
def _pillow_pixel_limit(max_pixels: int) -> Iterator[None]:
    """Pillow refuses images over 2 x ``Image.MAX_IMAGE_PIXELS`` (~179M) at open; a larger ``max_pixels`` asked
    for is let through (this module's own check applies right after, on the header's size)."""
    before = Image.MAX_IMAGE_PIXELS
    if before is not None and max_pixels > 2 * before:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


def check_image_size(width: int, height: int, name: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                     min_side: int = DEFAULT_MIN_SIDE) -> None:
    """Raise :class:`ImageLoadError` if a ``width x height`` image breaks the pixel budget or is too small."""
    if width * height > max_pixels:
        raise ImageLoadError(
            f"{name}: {width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels} "
            "(decompression-bomb guard); downscale the image, or raise max_pixels "
            "(data.max_pixels=... / ImageTokenizer(max_pixels=...)) if you trust it")
    if min(width, height) < min_side:
        raise ImageLoadError(
            f"{name}: {width}x{height} pixels is smaller than min_side={min_side} on its short side; "
            "remove the image or lower min_side (data.min_side=... / ImageTokenizer(min_side=...))")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, compositing transparency onto white (as Chameleon does)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        # Integer modes hold 16-bit samples (PNG/TIFF): keep the top 8 bits; PIL's own convert clips.
        values = np.asarray(image, dtype=np.int64).clip(0, 65535) // 257
        image = Image.fromarray(values.astype(np.uint8))
    if image.mode in ("P", "L", "RGB") and "transparency" in image.info:  # a palette index or tRNS colour key
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def image_to_tensor(image: ImageInput, name: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS,
                    min_side: int = DEFAULT_MIN_SIDE) -> Tensor:
    """One image -> float (3, H, W) in [0, 1].

    Accepts a path, a PIL image, or a tensor (C, H, W) with C in {1, 3, 4} (4 = RGBA, composited
    onto white) of dtype uint8, uint16 (16-bit, scaled to 8) or float in [0, 1]. ``name`` is used
    in error messages (e.g. ``images[3]``).
    """
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image, max_pixels=max_pixels, min_side=min_side)
    if isinstance(image, Image.Image):
        check_image_size(image.width, image.height, name, max_pixels, min_side)
        return TF.pil_to_tensor(to_rgb(image)).float() / 255.0
    if not isinstance(image, Tensor):
        raise ImageLoadError(f"{name}: unsupported type {type(image).__name__}; pass a tensor (C, H, W), "
                             "a PIL image, a path, or a list of them")
    if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
        raise ImageLoadError(f"{name}: tensor of shape {tuple(image.shape)} is not an image; expected "
                             "(C, H, W) with C = 1 (gray), 3 (RGB) or 4 (RGBA), channels first")
    check_image_size(image.shape[2], image.shape[1], name, max_pixels, min_side)
    if image.dtype == torch.uint8:
        x = image.float() / 255.0
    elif image.dtype == torch.uint16:
        x = image.to(torch.int32).float() / 65535.0
    elif image.is_floating_point():
        x = image.float()
        low, high = float(x.min()), float(x.max())
        if low < -1e-3 or high > 1 + 1e-3:
            raise ImageLoadError(f"{name}: float tensor has values in [{low:.3g}, {high:.3g}], expected "
                                 "[0, 1]; divide uint8-range values by 255 (or pass uint8), map [-1, 1] "
                                 "with (x + 1) / 2")
        x = x.clamp(0.0, 1.0)
    else:
        raise ImageLoadError(f"{name}: tensor dtype {image.dtype} is not an image dtype; use uint8, "
                             "uint16 or float in [0, 1]")
    if x.shape[0] == 4:
        rgb, alpha = x[:3], x[3:]
        x = rgb * alpha + (1.0 - alpha)  # composite onto white
    elif x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return x


def center_square_resize(x: Tensor, size: int) -> Tensor:
    """(..., C, H, W) -> (..., C, size, size): centre crop to the short side, antialiased bicubic resize.

    A tensor that is already ``size x size`` is returned unchanged (bit-exact).
    """
    h, w = x.shape[-2:]
    side = min(h, w)
    if (h, w) != (side, side):
        x = TF.center_crop(x, [side, side])
    if side != size:
        x = TF.resize(x, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)
        if x.is_floating_point():
            x = x.clamp(0.0, 1.0)
    return x


def prepare_images(images: ImagesInput, size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                   min_side: int = DEFAULT_MIN_SIDE) -> Tensor:
    """Tokenizer input from anything image-like -> float (B, 3, size, size) in [0, 1] (CPU).

    ``images`` is one image (tensor (C, H, W), PIL image, path), a batch tensor (B, C, H, W), or a
    list/tuple of images of any sizes and kinds. Raises :class:`ImageLoadError` naming the bad item.
    """
    if isinstance(images, Tensor) and images.ndim == 4:
        items: Sequence[ImageInput] = list(images)
    elif isinstance(images, (list, tuple)):
        items = images
    else:
        items = [images]
    if len(items) == 0:
        raise ImageLoadError("no images given: pass at least one image")
    batch = [center_square_resize(image_to_tensor(item, f"images[{i}]" if len(items) > 1 else "image",
                                                  max_pixels, min_side).cpu(), size)
             for i, item in enumerate(items)]
    return torch.stack(batch)
