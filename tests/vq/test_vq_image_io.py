"""Bad and unusual inputs: corrupt, truncated, empty, 16-bit, tiny, oversized files; modes; skip counting."""

import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from chameleon_lite.vq.data import ImageFileDataset, VQDataModule, collate_images, read_image_jsonl
from chameleon_lite.vq.image_io import ImageLoadError, image_to_tensor, load_image, prepare_images


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def rgb16_png(values: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one), values uint16 (H, W, 3)."""
    h, w, _ = values.shape
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@pytest.fixture
def files(tmp_path):
    good = Image.fromarray(np.full((20, 30, 3), (10, 200, 30), dtype=np.uint8))
    paths = {"good": tmp_path / "good.png", "corrupt": tmp_path / "corrupt.png", "empty": tmp_path / "empty.jpg",
             "truncated": tmp_path / "truncated.png", "tiny": tmp_path / "tiny.png", "big": tmp_path / "big.png"}
    paths["good"].write_bytes(png_bytes(good))
    paths["corrupt"].write_bytes(b"\x89PNG but then garbage " * 20)
    paths["empty"].write_bytes(b"")
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = png_bytes(noisy)
    paths["truncated"].write_bytes(data[: len(data) // 2])
    paths["tiny"].write_bytes(png_bytes(Image.new("RGB", (1, 1), (255, 0, 0))))
    paths["big"].write_bytes(png_bytes(Image.new("RGB", (200, 100), (0, 0, 255))))
    return paths


def test_good_file_loads_as_rgb(files):
    image = load_image(files["good"])
    assert image.mode == "RGB" and image.size == (30, 20) and image.getpixel((0, 0)) == (10, 200, 30)


@pytest.mark.parametrize("kind, message", [
    ("corrupt", "not a readable image"),
    ("empty", r"empty \(0 bytes\)"),
    ("truncated", "corrupt or truncated"),
    ("tiny", r"1x1 pixels is smaller than min_side=8"),
])
def test_bad_files_raise_image_load_error_naming_the_path(files, kind, message):
    with pytest.raises(ImageLoadError, match=message) as err:
        load_image(files[kind])
    assert str(files[kind]) in str(err.value)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("kind, message", [
    ("good", None),
    ("corrupt", "not a readable image"),
    ("empty", r"empty \(0 bytes\)"),
    ("truncated", "corrupt or truncated"),
    ("tiny", r"1x1 pixels is smaller than min_side=8"),
])
@pytest.mark.parametrize("form", ["bytes", "file object"])
def test_bytes_and_file_objects_load_like_the_file(files, kind, message, form):
    """A webdataset tar member arrives as bytes: same decoding and guards as the path, named by ``name``."""
    data = files[kind].read_bytes()
    source = data if form == "bytes" else io.BytesIO(data)
    if message is None:
        image = load_image(source, name="shard-000.tar:0001.png")
        assert image.mode == "RGB" and image.tobytes() == load_image(files[kind]).tobytes()
        return
    with pytest.raises(ImageLoadError, match=message) as err:
        load_image(source, name="shard-000.tar:0001.png")
    assert str(err.value).startswith("shard-000.tar:0001.png: ")


def test_bytes_keep_the_pixel_budget_sixteen_bit_and_transparency_rules(files):
    with pytest.raises(ImageLoadError, match=r"<image bytes>: 200x100 = 20000 pixels exceeds max_pixels=10000"):
        load_image(files["big"].read_bytes(), max_pixels=10_000)
    rgb = np.zeros((16, 16, 3), dtype=np.uint16)
    rgb[..., 0], rgb[..., 2] = 65535, 257 * 50
    assert load_image(rgb16_png(rgb)).getpixel((3, 3)) == (255, 0, 50)
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    image = load_image(png_bytes(rgba))
    assert image.getpixel((0, 0)) == (255, 0, 0) and image.getpixel((5, 5)) == (255, 255, 255)
    with pytest.raises(ImageLoadError, match="unsupported type int"):
        load_image(3)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ImageLoadError, match="missing.png: cannot read"):
        load_image(tmp_path / "missing.png")


def test_pixel_budget_guards_against_decompression_bombs(files):
    with pytest.raises(ImageLoadError, match=r"200x100 = 20000 pixels exceeds max_pixels=10000") as err:
        load_image(files["big"], max_pixels=10_000)
    assert "big.png" in str(err.value) and "raise max_pixels" in str(err.value)
    assert load_image(files["big"], max_pixels=20_000).size == (200, 100)
    with pytest.raises(ImageLoadError, match="max_pixels"):
        prepare_images(torch.zeros(3, 200, 100, dtype=torch.uint8), 32, max_pixels=10_000)


def test_a_max_pixels_beyond_pillows_own_limit_is_honoured(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses over 2x this at open
    path = tmp_path / "wide.png"
    Image.new("RGB", (100, 40), (0, 0, 255)).save(path)
    assert load_image(path, max_pixels=10_000).size == (100, 40)
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored
    with pytest.raises(ImageLoadError, match="exceeds max_pixels=3000"):
        load_image(path, max_pixels=3000)


def test_tiny_images_load_when_min_side_allows_them(files):
    assert load_image(files["tiny"], min_side=1).size == (1, 1)
    x = prepare_images(files["tiny"], 16, min_side=1)
    assert x.shape == (1, 3, 16, 16) and torch.allclose(x[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.0]))


def test_sixteen_bit_pngs_become_eight_bit(tmp_path):
    gray = np.array([[0, 257 * 100], [65535, 257 * 7]], dtype=np.uint16).repeat(8, 0).repeat(8, 1)
    path = tmp_path / "gray16.png"
    Image.fromarray(gray).save(path)
    assert Image.open(path).mode.startswith("I")
    image = load_image(path)
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (0, 0, 0)
    assert image.getpixel((8, 0)) == (100, 100, 100) and image.getpixel((0, 8)) == (255, 255, 255)
    rgb = np.zeros((16, 16, 3), dtype=np.uint16)
    rgb[..., 0], rgb[..., 2] = 65535, 257 * 50
    path = tmp_path / "rgb16.png"
    path.write_bytes(rgb16_png(rgb))
    assert load_image(path).getpixel((3, 3)) == (255, 0, 50)
    as_tensor = image_to_tensor(torch.from_numpy(rgb.astype(np.int32)).permute(2, 0, 1).to(torch.uint16))
    assert torch.allclose(as_tensor[:, 0, 0], torch.tensor([1.0, 0.0, 50 / 255]), atol=1e-6)


def test_transparency_is_composited_onto_white_and_modes_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    path = tmp_path / "rgba.png"
    rgba.save(path)
    image = load_image(path)
    assert image.getpixel((0, 0)) == (255, 0, 0)
    assert image.getpixel((5, 5)) == (255, 255, 255)
    assert image.getpixel((1, 0))[0] in (127, 128)
    palette = Image.new("P", (10, 10), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.info["transparency"] = 0
    palette.putpixel((0, 0), 1)
    path = tmp_path / "palette.png"
    palette.save(path, transparency=0)
    image = load_image(path)
    assert image.getpixel((0, 0)) == (255, 0, 0) and image.getpixel((5, 5)) == (255, 255, 255)
    for mode, key, red in (("RGB", (0, 0, 0), (255, 0, 0)), ("L", 0, 200)):  # tRNS colour key, as optipng saves
        keyed = Image.new(mode, (10, 10), key)
        keyed.putpixel((0, 0), red)
        path = tmp_path / f"trns_{mode}.png"
        keyed.save(path, transparency=key)
        image = load_image(path)
        assert image.getpixel((5, 5)) == (255, 255, 255), mode
        assert image.getpixel((0, 0)) == (red if mode == "RGB" else (200, 200, 200))
    cmyk = Image.new("CMYK", (10, 10), (0, 255, 255, 0))
    path = tmp_path / "cmyk.jpg"
    cmyk.save(path)
    r, g, b = load_image(path).getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60
    rgba_tensor = torch.tensor([0.0, 0.0, 0.0, 0.0]).view(4, 1, 1).expand(4, 8, 8)
    assert torch.allclose(image_to_tensor(rgba_tensor), torch.ones(3, 8, 8))


def test_folder_dataset_skips_and_counts_bad_files_or_raises_when_strict(files):
    paths = [files[k] for k in ("good", "corrupt", "empty", "truncated", "tiny", "big")]
    dataset = ImageFileDataset(paths, image_size=16)
    batch = collate_images([dataset[i] for i in range(len(dataset))])
    assert batch["images"].shape == (2, 3, 16, 16) and batch["images"].dtype == torch.uint8
    assert int(batch["skipped"]) == 4
    empty = collate_images([None, None])
    assert empty["images"].shape[0] == 0 and int(empty["skipped"]) == 2
    strict = ImageFileDataset(paths, image_size=16, strict=True)
    with pytest.raises(ImageLoadError, match="corrupt.png"):
        strict[1]


def test_jsonl_source_resolves_relative_paths_and_names_bad_lines(files, tmp_path):
    jsonl = tmp_path / "images.jsonl"
    jsonl.write_text(json.dumps({"image": "good.png"}) + "\n\n" + json.dumps({"image": str(files["big"])}) + "\n")
    assert read_image_jsonl(jsonl) == [files["good"], files["big"]]
    jsonl.write_text(json.dumps({"image": "good.png"}) + "\n{\"path\": 1}\n")
    with pytest.raises(ValueError, match=r"images.jsonl:2: expected a JSON object"):
        read_image_jsonl(jsonl)
    jsonl.write_text(json.dumps({"image": 5}) + "\n")
    with pytest.raises(ValueError, match=r"images.jsonl:1: \"image\" must be a non-empty path string, got 5"):
        read_image_jsonl(jsonl)


def test_datamodule_sources(files, tmp_path):
    folder = VQDataModule(image_size=16, batch_size=2, folder=str(tmp_path), val_length=1)
    folder.setup("fit")
    assert folder.source == "folder" and len(folder.train_set) + len(folder.val_set) == 6
    with pytest.raises(FileNotFoundError, match="not a directory"):
        VQDataModule(image_size=16, folder=str(tmp_path / "nope")).setup("fit")
    with pytest.raises(ValueError, match="only one of"):
        VQDataModule(image_size=16, folder="a", jsonl="b")
