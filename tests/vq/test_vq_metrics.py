"""VQ evaluation: SSIM matches scikit-image, PSNR, evaluate_vq on shapes, photos, run_vq_eval files."""

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from skimage.metrics import structural_similarity

from chameleon_lite.data.shapes import ShapesWorld
from chameleon_lite.eval.vq_metrics import (
    detector_agreement,
    evaluate_vq,
    photo_crops,
    photo_psnr,
    psnr,
    run_vq_eval,
    ssim,
)
from chameleon_lite.vq import ImageTokenizer, VQConfig
from chameleon_lite.vq.model import VQModel

TINY = VQConfig(image_size=32, base_channels=16, channel_multipliers=(1, 2, 2), num_res_blocks=1,
                latent_channels=16, norm_groups=8, codebook_size=32, embed_dim=4)


@pytest.fixture(scope="module")
def tok() -> ImageTokenizer:
    torch.manual_seed(0)
    return ImageTokenizer(VQModel(TINY))


def test_ssim_matches_scikit_image():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 40, 36, generator=g)
    y = (x + 0.1 * torch.randn(2, 3, 40, 36, generator=g)).clamp(0, 1)
    ours = ssim(x, y)
    for i in range(2):
        ref = structural_similarity(x[i].numpy().astype(np.float64), y[i].numpy().astype(np.float64), channel_axis=0,
                                    data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert abs(float(ours[i]) - ref) < 1e-4
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-5)


def test_psnr_values():
    x = torch.zeros(1, 3, 4, 4)
    assert float(psnr(x, x + 0.1)) == pytest.approx(20.0, abs=1e-4)
    assert float(psnr(x, x)) == 100.0


def test_evaluate_vq_on_shapes_and_loaders(tok):
    world = ShapesWorld(seed=0, image_size=32, split="val", length=10)
    result = evaluate_vq(tok, world, batch_size=4)
    assert result["num_images"] == 10
    assert 0.0 < result["codebook_usage"] <= 1.0 and result["codes_used"] == round(result["codebook_usage"] * 32)
    assert 1.0 <= result["perplexity"] <= 32.0 and -1.0 <= result["ssim"] <= 1.0 and result["psnr"] > 0
    batches = [{"images": torch.stack([world[i].image for i in range(j, j + 5)])} for j in (0, 5)]
    assert evaluate_vq(tok, batches, batch_size=3) == pytest.approx(result)
    assert evaluate_vq(tok, world, max_images=3)["num_images"] == 3


def test_detector_agreement_compares_object_readings():
    world = ShapesWorld(seed=0, image_size=64, split="val", length=4)
    original = torch.stack([world[i].image for i in range(4)]).float() / 255
    assert detector_agreement(original, original).all()
    blank = torch.ones_like(original)
    assert not detector_agreement(original, blank).any()  # every scene has at least one object


def test_photo_crops_and_psnr(tok):
    photo = torch.zeros(3, 100, 60, dtype=torch.uint8)
    crops = photo_crops(photo, 32, per_side=2)
    assert len(crops) == 4 and all(c.shape == (3, 32, 32) for c in crops)
    assert len(photo_crops(photo, 512, per_side=2)) == 2  # crop side shrinks to the short side (60)
    result = photo_psnr(tok, ["astronaut", "coffee"])
    assert set(result) == {"astronaut", "coffee", "mean"} and result["mean"] > 0


def test_run_vq_eval_writes_json_and_markdown(tok, tmp_path):
    tok.save_pretrained(tmp_path / "tok")
    images = tmp_path / "mine"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (50, 40), (80 * i, 30, 200)).save(images / f"{i}.png")
    (images / "bad.png").write_bytes(b"")
    cfg = OmegaConf.create({"tokenizer": {"dir": str(tmp_path / "tok")}, "out_dir": str(tmp_path / "eval"),
                            "vq": {"n_images": 8, "photos": ["chelsea"], "folder": str(images)}})
    result = run_vq_eval(cfg)
    saved = json.loads((tmp_path / "eval" / "vq.json").read_text())
    assert saved["shapes"]["num_images"] == 8 and saved["split"] == "val" and set(saved["photos"]) == {"chelsea", "mean"}
    assert saved["folder"]["num_images"] == 3 and saved["folder"]["skipped"] == 1
    table = (tmp_path / "eval" / "vq.md").read_text()
    assert table == result["table"] and "| codebook usage |" in table and "PSNR photo `chelsea`" in table
    assert 0.0 <= saved["shapes"]["detector_agreement"] <= 1.0 and "detector reads the same objects" in table
    assert "1 unreadable skipped" in table
    no_photos = run_vq_eval(OmegaConf.merge(cfg, {"vq": {"photo_crops": False, "folder": None}}))
    assert no_photos["photos"] == {} and "folder" not in no_photos
    # val shows the val pair in some scenes: reported apart exactly when the drawn images hold one
    val_world = ShapesWorld(seed=0, image_size=32, split="val", length=8)
    assert ("shapes_heldout" in no_photos) == any(val_world[i].heldout for i in range(8))
    test = run_vq_eval(OmegaConf.merge(cfg, {"vq": {"photo_crops": False, "folder": None, "split": "test",
                                                    "n_images": 16}}))
    held, seen = test["shapes_heldout"], test["shapes_seen"]
    assert held["num_images"] > 0 and seen["num_images"] > 0 and held["num_images"] + seen["num_images"] == 16
    assert "held-out colour-shape pairs: PSNR" in test["table"] and 0.0 <= held["detector_agreement"] <= 1.0
    with pytest.raises(ValueError, match="tokenizer.dir"):
        run_vq_eval({"out_dir": str(tmp_path)})


def test_photo_crops_without_scikit_image_are_a_logged_skip(tok, tmp_path, monkeypatch, caplog):
    """scikit-image is only in the dev extra: on a base install the default photo line is skipped, and said."""
    import sys

    tok.save_pretrained(tmp_path / "tok")
    monkeypatch.setitem(sys.modules, "skimage", None)  # import skimage.data -> ImportError
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    cfg = OmegaConf.create({"tokenizer": {"dir": str(tmp_path / "tok")}, "out_dir": str(tmp_path / "eval"),
                            "vq": {"n_images": 4}})
    result = run_vq_eval(cfg)
    assert result["photos"] == {} and "scikit-image is not installed" in result["photos_skipped"]
    assert "| PSNR photos | skipped: scikit-image is not installed" in result["table"]
    assert json.loads((tmp_path / "eval" / "vq.json").read_text())["photos_skipped"] == result["photos_skipped"]
    assert "scikit-image is not installed" in caplog.text
    assert result["shapes"]["num_images"] == 4  # the rest of the eval ran


def test_a_bad_vq_folder_is_named_before_any_work(tok, tmp_path):
    from chameleon_lite.config import ConfigError

    tok.save_pretrained(tmp_path / "tok")
    cfg = OmegaConf.create({"tokenizer": {"dir": str(tmp_path / "tok")}, "out_dir": str(tmp_path / "eval"),
                            "vq": {"n_images": 4, "photo_crops": False, "folder": str(tmp_path / "typo")}})
    with pytest.raises(ConfigError, match=r"vq.folder=.*typo: not a directory"):
        run_vq_eval(cfg)
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    for name in ("a.png", "b.jpg"):
        (unreadable / name).write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"none of the 2 image files of .*unreadable could be read"):
        run_vq_eval(OmegaConf.merge(cfg, {"vq": {"folder": str(unreadable)}}))
    photo_typo = OmegaConf.merge(cfg, {"vq": {"folder": None, "photo_crops": True, "photos": ["astronut"]}})
    with pytest.raises(ConfigError, match=r"\['astronut'\] are not images of skimage.data"):
        run_vq_eval(photo_typo)
