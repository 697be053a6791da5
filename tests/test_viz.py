"""Captioned image grids."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from chameleon_lite.viz import make_grid_with_captions, save_captioned_grid


def images(n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=generator, dtype=torch.uint8)


def test_grid_tiles_upscaled_images_with_captions():
    grid = make_grid_with_captions(
        images(5), ["a red circle"] * 4 + ["a long caption\nsaw: two lines " * 3], nrow=3
    )
    assert grid.mode == "RGB"
    assert grid.width == 3 * 160 + 4 * 4  # 32 px upscaled x5 to >= 160, 4 px padding
    assert grid.height > 2 * 160  # two rows, each with a caption panel under the image
    tile = torch.tensor(list(grid.crop((4, 4, 164, 164)).getdata()), dtype=torch.uint8).T.reshape(3, 160, 160)
    assert torch.equal(tile, images(5)[0].repeat_interleave(5, 1).repeat_interleave(5, 2))


def test_float_images_match_uint8_and_grid_is_saved(tmp_path):
    uint8 = images(2)
    path = save_captioned_grid(list(uint8.float() / 255), ["a", "b"], tmp_path / "out" / "grid.png")
    with Image.open(path) as saved:
        assert (
            saved.format == "PNG" and saved.tobytes() == make_grid_with_captions(uint8, ["a", "b"]).tobytes()
        )


def test_mismatched_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        make_grid_with_captions(images(2), ["a"])
    with pytest.raises(ValueError, match="RGB"):
        make_grid_with_captions(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), ["a"])
