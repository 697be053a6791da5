"""Every primary config composes with its defaults and with typical overrides; bad keys fail clearly."""

import subprocess
import sys

import pytest
import torch
from conftest import compose_config
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf

from chameleon_lite.config import CONF_DIR, ConfigError
from chameleon_lite.model import ModelConfig

PRIMARY = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))


def test_there_is_a_primary_config_per_console_script():
    assert {"train_tokenizer", "train"} <= set(PRIMARY)


@pytest.mark.parametrize("name", PRIMARY)
def test_primary_config_composes(name):
    runtime_keys = [k for k in ("run_dir", "out_dir") if k in compose_config(name)]
    cfg = compose_config(name, [f"{k}=/tmp/x" for k in runtime_keys])
    OmegaConf.resolve(cfg)  # every interpolation resolves (run_dir/out_dir default to Hydra's runtime output dir)


GROUPS = ["model", "trainer", "data", "logger", "optim", "callbacks"]


def train_defaults() -> dict[str, str]:
    """group -> the option conf/train.yaml's defaults list picks."""
    return {k: v for entry in OmegaConf.load(CONF_DIR / "train.yaml").defaults if isinstance(entry, DictConfig)
            for k, v in entry.items()}


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes_into_train(group):
    default_option = train_defaults()[group]
    options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    assert default_option in options
    default = OmegaConf.to_container(compose_config("train", []))  # unresolved: ${run_dir} needs Hydra's runtime
    for option in options:
        cfg = OmegaConf.to_container(compose_config("train", [f"{group}={option}"]))
        assert cfg[group] is not None
        # the group holds the option's own settings (on top of those it inherits), and only that group moves
        own = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"))
        if isinstance(own, dict):  # (logger options are lists)
            own.pop("defaults", None)
            assert {k: cfg[group].get(k) for k in own} == own, option
        else:
            assert cfg[group] == own, option
        assert {k: v for k, v in cfg.items() if k != group} == {k: v for k, v in default.items() if k != group}
        # every option but the default one changes the group (optim and callbacks have the default alone)
        assert (cfg[group] == default[group]) == (option == default_option), option


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")))
def test_every_model_preset_builds_a_valid_model_config(preset):
    values = OmegaConf.to_container(compose_config("train", [f"model={preset}"]).model, resolve=True)
    # vocab_size is null until the training code fills it from the tokenizers (chameleon_7b fixes Meta's 65536)
    mc = ModelConfig.from_dict(values, vocab_size=values["vocab_size"] or 1024)
    mc.validate()
    assert mc.vocab_size == (65536 if preset == "chameleon_7b" else 1024)
    assert ModelConfig.from_preset(preset, vocab_size=mc.vocab_size) == mc  # the preset loader agrees


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


class _FailingRows(torch.utils.data.Dataset):
    def __init__(self, error: type[ValueError]) -> None:
        self.error = error

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        raise self.error("data.train_shards: no shard gave a usable sample;\nfix or replace the shards")


@pytest.mark.parametrize("error", [ValueError, ConfigError])  # a builtin, and a class named with its module
def test_an_error_raised_in_a_dataloader_worker_is_shown_with_its_own_message(error):
    from chameleon_lite.config import user_message

    loader = torch.utils.data.DataLoader(_FailingRows(error), num_workers=1)
    with pytest.raises(error) as caught:
        next(iter(loader))
    name = error.__name__
    assert str(caught.value).startswith(f"Caught {name} in DataLoader worker process 0")
    assert user_message(caught.value) == ("data.train_shards: no shard gave a usable sample;\nfix or replace the "
                                          f"shards ({name} in DataLoader worker process 0)")
    assert user_message(ValueError("plain")) == "plain"
