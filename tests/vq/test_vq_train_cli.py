"""chameleon-train-vq end to end on the real Hydra config, overridden to a tiny CPU run."""

import csv

import pytest
import torch
from conftest import compose_config
from PIL import Image

from chameleon_lite.cli.train_vq import train_vq
from chameleon_lite.config import ConfigError
from chameleon_lite.vq import ImageTokenizer
from chameleon_lite.vq.data import list_image_folder, split_paths

TINY_VQ = [
    "vq.name=tiny", "vq.model.image_size=32", "vq.model.base_channels=16", "vq.model.channel_multipliers=[1,2,2]",
    "vq.model.latent_channels=16", "vq.model.norm_groups=8", "vq.model.codebook_size=32", "vq.model.embed_dim=4",
    "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "data.batch_size=4", "data.val_length=4",
    "optim.warmup_steps=1", "checkpoint_every=2",
]


def test_shapes_default_trains_logs_and_exports(tmp_path):
    cfg = compose_config("train_vq", [*TINY_VQ, f"run_dir={tmp_path / 'run'}", f"out_dir={tmp_path / 'tok'}"])
    assert cfg.vq.name == "tiny" and cfg.data.folder is None  # shapes world by default
    result = train_vq(cfg)
    assert result["global_step"] == 4
    tok = ImageTokenizer.from_pretrained(tmp_path / "tok")
    assert tok.name == "tiny" and tok.encode(torch.zeros(3, 32, 32, dtype=torch.uint8)).shape == (1, 8, 8)
    run = tmp_path / "run"
    grids = sorted((run / "logs" / "reconstructions").glob("step_*.png"))
    assert [g.name for g in grids] == ["step_0000002.png", "step_0000004.png"]
    assert Image.open(grids[0]).size[1] > 2 * 32  # originals row + reconstructions row
    rows = list(csv.DictReader((run / "logs" / "metrics.csv").open()))
    columns = set(rows[0])
    for key in ("train/loss", "train/psnr", "train/usage", "train/perplexity", "val/psnr", "val/usage",
                "val/perplexity"):
        assert key in columns, key
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_user_folder_with_bad_files_is_skipped_and_counted(tmp_path, caplog):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(7):
        Image.new("RGB", (40 + i, 36), (30 * i, 100, 200)).save(images / f"ok{i}.png")
    (images / "broken.jpg").write_bytes(b"not a jpeg at all" * 10)
    (images / "empty.png").write_bytes(b"")
    overrides = [*TINY_VQ, f"run_dir={tmp_path / 'run'}", f"out_dir={tmp_path / 'tok'}", f"data.folder={images}",
                 "data.val_length=2", "data.batch_size=9", "trainer.max_steps=2", "trainer.val_check_interval=1",
                 "export=false"]
    train_files, _ = split_paths(list_image_folder(images), 2, seed=0)
    expected_skips = sum(p.name in ("broken.jpg", "empty.png") for p in train_files)
    assert expected_skips == 2  # the seeded split holds out two good files
    cfg = compose_config("train_vq", [*overrides, "data.batch_size=" + str(len(train_files))])
    with caplog.at_level("INFO", logger="chameleon_lite.vq.data"):
        result = train_vq(cfg)
    assert "data.folder: 9 images, 7 for training and 2 held out for validation" in caplog.text
    assert result["metrics"]["data/skipped_images"] == expected_skips
    assert not (tmp_path / "tok").exists()  # export=false
    strict = compose_config("train_vq", [*overrides, "data.batch_size=" + str(len(train_files)), "data.strict=true",
                                         f"run_dir={tmp_path / 'run2'}"])
    with pytest.raises(ValueError, match="broken.jpg|empty.png"):
        train_vq(strict)


def test_too_few_images_for_one_batch_is_refused_and_nothing_is_exported(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        Image.new("RGB", (32, 32), (40 * i, 100, 200)).save(images / f"ok{i}.png")
    cfg = compose_config("train_vq", [*TINY_VQ, f"run_dir={tmp_path / 'run'}", f"out_dir={tmp_path / 'tok'}",
                                      f"data.folder={images}", "data.val_length=2", "data.batch_size=8"])
    with pytest.raises(ConfigError, match=r"6 images leave 4 for training .* fewer than data.batch_size=8"):
        train_vq(cfg)
    assert not (tmp_path / "tok").exists()  # the tokenizer it would have replaced stays as it was


def test_an_existing_tokenizer_is_only_replaced_when_asked(tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vq.safetensors").write_bytes(b"the tokenizer every model of this directory uses")
    cfg = compose_config("train_vq", [*TINY_VQ, f"run_dir={tmp_path / 'run'}", f"out_dir={tmp_path / 'tok'}"])
    with pytest.raises(ConfigError, match="already holds a VQ .* overwrite=true"):
        train_vq(cfg)
    assert not (tmp_path / "run").exists()  # refused before training
    assert (tmp_path / "tok" / "vq.safetensors").read_bytes().startswith(b"the tokenizer")


def test_a_resume_with_another_vq_architecture_is_refused_naming_the_setting(tmp_path):
    """It stopped inside Lightning's checkpoint restore with a tensor size mismatch."""
    common = [*TINY_VQ, f"run_dir={tmp_path / 'run'}", "export=false"]
    train_vq(compose_config("train_vq", common))
    with pytest.raises(ConfigError, match=r"vq.model.codebook_size: 32 in the checkpoint, 16 now"):
        train_vq(compose_config("train_vq", [*common, "ckpt_path=last", "trainer.max_steps=6",
                                             "vq.model.codebook_size=16"]))
    result = train_vq(compose_config("train_vq", [*common, "ckpt_path=last", "trainer.max_steps=6"]))
    assert result["global_step"] == 6
