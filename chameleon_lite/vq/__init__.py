"""Image tokenizer (VQGAN family): images <-> grids of discrete codes. Start at :class:`ImageTokenizer`."""

from chameleon_lite.vq.api import CodeRangeError, ImageTokenizer
from chameleon_lite.vq.config import VQConfig, VQConfigError
from chameleon_lite.vq.image_io import ImageLoadError, load_image

__all__ = ["CodeRangeError", "ImageLoadError", "ImageTokenizer", "VQConfig", "VQConfigError", "load_image"]
