"""ImageTokenizer: inputs it accepts, determinism, decode contracts, safetensors save/load, chameleon_512."""

import dataclasses

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from chameleon_lite.config import CONF_DIR
from chameleon_lite.vq import CodeRangeError, ImageLoadError, ImageTokenizer, VQConfig
from chameleon_lite.vq.model import VQModel

TINY = VQConfig(image_size=32, base_channels=16, channel_multipliers=(1, 2, 2), num_res_blocks=1,
                latent_channels=16, norm_groups=8, codebook_size=32, embed_dim=4)


@pytest.fixture(scope="module")
def tok() -> ImageTokenizer:
    torch.manual_seed(0)
    return ImageTokenizer(VQModel(TINY), name="tiny")


def test_properties(tok):
    assert (tok.image_size, tok.grid_size, tok.tokens_per_image, tok.codebook_size) == (32, 8, 64, 32)


def test_encode_decode_shapes_dtypes_ranges(tok):
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    codes = tok.encode(images)
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < 32
    pixels = tok.decode(codes)
    assert pixels.shape == (3, 3, 32, 32) and pixels.dtype == torch.float32
    assert 0.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0
    as_uint8 = tok.decode_uint8(codes)
    assert as_uint8.dtype == torch.uint8 and as_uint8.shape == (3, 3, 32, 32)
    assert torch.equal(as_uint8, (pixels * 255).round().to(torch.uint8))


def test_encode_decode_is_deterministic(tok):
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    codes = tok.encode(images)
    assert torch.equal(codes, tok.encode(images))
    assert torch.equal(tok.decode(codes), tok.decode(codes))
    # batch composition does not change an image's codes
    assert torch.equal(tok.encode(images[1]), codes[1:])


def test_accepts_tensors_pil_paths_and_mixed_lists(tok, tmp_path):
    rgb = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    pil = Image.fromarray(rgb.permute(1, 2, 0).numpy())
    path = tmp_path / "a.png"
    pil.save(path)
    expected = tok.encode(rgb)
    assert torch.equal(tok.encode(rgb.float() / 255), expected)
    assert torch.equal(tok.encode(pil), expected)
    assert torch.equal(tok.encode(str(path)), expected)
    wide = Image.new("RGB", (90, 50), (200, 10, 10))
    gray = Image.new("L", (40, 40), 128)
    codes = tok.encode([rgb, pil, path, wide, gray, torch.full((1, 33, 33), 7, dtype=torch.uint8)])
    assert codes.shape == (6, 8, 8)
    assert torch.equal(codes[:3], expected.expand(3, -1, -1))


def test_preprocess_crops_the_centre_square_and_resizes(tok):
    image = torch.zeros(3, 64, 128, dtype=torch.uint8)
    image[:, :, 32:96] = 255  # white centre square, black side bands
    x = tok.preprocess(image)
    assert x.shape == (1, 3, 32, 32)
    assert torch.allclose(x, torch.ones_like(x))


def test_float_input_outside_unit_range_is_refused(tok):
    with pytest.raises(ImageLoadError, match=r"expected \[0, 1\]"):
        tok.encode(torch.rand(3, 32, 32) * 2 - 1)
    with pytest.raises(ImageLoadError, match="not an image"):
        tok.encode(torch.rand(5, 32, 32))


def test_decode_refuses_codes_outside_the_codebook(tok):
    with pytest.raises(CodeRangeError, match=r"values in \[32, 32\].*codebook \[0, 32\)"):
        tok.decode(torch.full((1, 8, 8), 32))
    with pytest.raises(CodeRangeError, match=r"\[-1, 0\]"):
        tok.decode(torch.tensor([[-1] + [0] * 63]))
    with pytest.raises(CodeRangeError, match="integer"):
        tok.decode(torch.zeros(1, 8, 8))
    with pytest.raises(CodeRangeError, match="shape"):
        tok.decode(torch.zeros(1, 7, dtype=torch.long))
    codes = torch.randint(0, 32, (2, 8, 8))
    assert torch.equal(tok.decode(codes.flatten(1)), tok.decode(codes))  # flat LM rows
    assert tok.decode(codes[0]).shape == (1, 3, 32, 32)  # one grid


def test_save_and_load_round_trip(tok, tmp_path):
    out = tok.save_pretrained(tmp_path / "tok", extra={"command": "test"})
    assert sorted(p.name for p in out.iterdir()) == ["vq.safetensors", "vq.yaml"]  # no temp files left
    state = load_file(out / "vq.safetensors")
    assert set(state) == set(tok.model.export_state_dict())
    document = yaml.safe_load((out / "vq.yaml").read_text())
    assert document["model"] == TINY.to_dict() and document["provenance"] == {"command": "test"}
    loaded = ImageTokenizer.from_pretrained(out)
    assert loaded.config == TINY and loaded.name == "tiny"
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    codes = tok.encode(images)
    assert torch.equal(loaded.encode(images), codes)
    assert torch.equal(loaded.decode(codes), tok.decode(codes))


def test_load_errors_name_the_file(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="vq.yaml not found"):
        ImageTokenizer.from_pretrained(tmp_path / "nothing")
    out = tok.save_pretrained(tmp_path / "tok")
    document = yaml.safe_load((out / "vq.yaml").read_text())
    document["model"]["codebook_size"] = 64
    (out / "vq.yaml").write_text(yaml.safe_dump(document))
    with pytest.raises(ValueError, match="vq.safetensors does not match"):
        ImageTokenizer.from_pretrained(out)
    (out / "vq.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        ImageTokenizer.from_pretrained(out)


def chameleon_512(**changes) -> VQConfig:
    cfg = VQConfig.from_dict(yaml.safe_load((CONF_DIR / "vq" / "chameleon_512.yaml").read_text())["model"])
    return dataclasses.replace(cfg, **changes)


def test_chameleon_512_geometry_round_trips_512px_to_32x32_codes():
    """The preset's geometry (512 px, f=16, 8192 x 256-d codes) at 1/8 width and depth, so it runs in seconds."""
    torch.manual_seed(0)
    tok = ImageTokenizer(VQModel(chameleon_512(base_channels=16, norm_groups=8, num_res_blocks=1, latent_channels=32)))
    image = torch.randint(0, 256, (3, 512, 512), dtype=torch.uint8)
    codes = tok.encode(image)
    assert codes.shape == (1, 32, 32) and tok.tokens_per_image == 1024 and int(codes.max()) < 8192
    assert tok.decode(codes).shape == (1, 3, 512, 512)


@pytest.mark.slow
def test_chameleon_512_preset_round_trips_512px_to_32x32_codes():
    """The full preset as shipped (69M parameters, ~1.5 TFLOP for one encode + decode)."""
    torch.manual_seed(0)
    tok = ImageTokenizer(VQModel(chameleon_512()))
    codes = tok.encode(Image.new("RGB", (640, 512), (30, 120, 200)))
    assert codes.shape == (1, 32, 32) and codes.dtype == torch.int64
    assert tok.decode(codes).shape == (1, 3, 512, 512)
