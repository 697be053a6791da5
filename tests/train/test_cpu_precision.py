"""bf16 precision on CPUs without native bf16: trained in fp32 with a warning (cpu_bf16=auto), or kept."""

import logging

import pytest
from conftest import compose_config

from chameleon_lite.config import ConfigError
from chameleon_lite.train import trainer as trainer_mod
from chameleon_lite.train.trainer import build_trainer, cpu_precision


@pytest.mark.parametrize(("native", "mode", "precision", "expected"), [
    (False, "auto", "bf16-mixed", "32-true"),
    (False, "auto", "bf16-true", "32-true"),
    (False, "keep", "bf16-mixed", "bf16-mixed"),
    (True, "auto", "bf16-mixed", "bf16-mixed"),
    (None, "auto", "bf16-mixed", "bf16-mixed"),  # cannot tell (e.g. Arm): left alone
    (False, "auto", "32-true", "32-true"),
])
def test_cpu_bf16_falls_back_to_fp32_only_where_bf16_is_emulated(monkeypatch, caplog, native, mode, precision,
                                                                  expected):
    monkeypatch.setattr(trainer_mod, "cpu_has_native_bf16", lambda: native)
    cfg = {"accelerator": "cpu", "precision": precision}
    with caplog.at_level(logging.WARNING, logger=trainer_mod.__name__):
        cpu_precision(cfg, mode)
    assert cfg["precision"] == expected
    assert ("cpu_bf16=keep insists" in caplog.text) == (expected != precision)


def test_gpu_training_keeps_bf16(monkeypatch):
    monkeypatch.setattr(trainer_mod, "cpu_has_native_bf16", lambda: False)
    cfg = {"accelerator": "gpu", "precision": "bf16-mixed"}
    cpu_precision(cfg, "auto")
    assert cfg["precision"] == "bf16-mixed"


def test_the_trainer_gets_the_fallback_and_a_bad_mode_is_named(monkeypatch, tmp_path):
    monkeypatch.setattr(trainer_mod, "cpu_has_native_bf16", lambda: False)
    cfg = compose_config("train", [f"run_dir={tmp_path}", "trainer.precision=bf16-mixed", "logger=[]"])
    assert build_trainer(cfg).precision == "32-true"
    monkeypatch.setattr(trainer_mod, "cpu_has_native_bf16", lambda: True)
    assert build_trainer(cfg).precision == "bf16-mixed"
    with pytest.raises(ConfigError, match="cpu_bf16='always' is invalid"):
        build_trainer(compose_config("train", [f"run_dir={tmp_path}", "cpu_bf16=always"]))

