"""Every primary config composes with its defaults and with typical overrides; bad keys fail clearly."""

import subprocess
import sys

import pytest
from conftest import compose_config
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from chameleon_lite.config import CONF_DIR

PRIMARY = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))


def test_there_is_a_primary_config_per_console_script():
    assert {"train_tokenizer", "train"} <= set(PRIMARY)


@pytest.mark.parametrize("name", PRIMARY)
def test_primary_config_composes(name):
    runtime_keys = [k for k in ("run_dir", "out_dir") if k in compose_config(name)]
    cfg = compose_config(name, [f"{k}=/tmp/x" for k in runtime_keys])
    OmegaConf.resolve(cfg)  # every interpolation resolves (run_dir/out_dir default to Hydra's runtime output dir)


@pytest.mark.parametrize("group", ["model", "trainer", "data", "logger", "optim", "callbacks"])
def test_every_group_option_composes_into_train(group):
    for option in sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")):
        cfg = compose_config("train", [f"{group}={option}"])
        assert cfg[group] is not None


def test_typical_overrides():
    cfg = compose_config("train", ["model=small", "trainer=ddp", "trainer.devices=4", "data.batch_size=16",
                                   "optim.lr=1e-3"])
    assert cfg.model.dim == 512 and cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 4
    assert cfg.data.batch_size == 16 and cfg.optim.lr == 1e-3


def test_misspelled_key_names_the_key():
    with pytest.raises(ConfigCompositionException) as err:
        compose_config("train", ["model.dimm=3"])
    assert "dimm" in str(err.value) or "dimm" in str(err.value.__cause__)


def test_cli_misspelled_key_exits_nonzero_naming_the_key(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "chameleon_lite.cli.train", "optim.lrr=1", f"hydra.run.dir={tmp_path}"],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "lrr" in proc.stderr


def test_cli_bad_value_exits_2_naming_the_key(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "chameleon_lite.cli.tokenizer", "tokenizer.vocab_size=-5",
                           f"tokenizer.dir={tmp_path}", f"hydra.run.dir={tmp_path}"],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "tokenizer.vocab_size" in proc.stderr
