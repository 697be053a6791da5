"""Build the Lightning Trainer, callbacks and loggers from the composed Hydra config."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from chameleon_lite.config import ConfigError, resolve_path
from chameleon_lite.train.checkpoint_io import AtomicCheckpointIO

log = logging.getLogger(__name__)


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    """``last`` -> ``<run_dir>/checkpoints/last.ckpt`` (None when no checkpoint exists yet: a fresh start)."""
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "last":
        last = run_dir / "checkpoints" / "last.ckpt"
        if not last.is_file():
            log.warning("ckpt_path=last but %s does not exist: starting from scratch", last)
            return None
        return str(last)
    path = resolve_path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    return str(path)


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """``cfg.callbacks`` is a mapping name -> callback config; ``null`` entries are switched off."""
    return [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]


def build_loggers(cfg: DictConfig) -> list[Any]:
    loggers = cfg.get("logger") or []
    return [instantiate(c) for c in loggers if c is not None]


def build_strategy(strategy: Any) -> Any:
    """``fsdp`` becomes an FSDPStrategy that wraps and activation-checkpoints each decoder block."""
    if strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        from chameleon_lite.model.transformer import Block

        return FSDPStrategy(auto_wrap_policy={Block}, activation_checkpointing_policy={Block},
                            sharding_strategy="FULL_SHARD")
    return strategy


def build_trainer(cfg: DictConfig, **overrides: Any) -> L.Trainer:
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    if not isinstance(trainer_cfg, dict) or trainer_cfg.pop("_target_", None) != "lightning.Trainer":
        raise ConfigError("trainer config must be a lightning.Trainer node (conf/trainer/*.yaml)")
    strategy = trainer_cfg.get("strategy", "auto")
    trainer_cfg["strategy"] = build_strategy(strategy)
    if strategy != "fsdp":  # FSDP writes sharded checkpoints through its own IO
        trainer_cfg.setdefault("plugins", []).append(AtomicCheckpointIO())
    trainer_cfg.update(overrides)
    try:
        return L.Trainer(callbacks=build_callbacks(cfg), logger=build_loggers(cfg) or False, **trainer_cfg)
    except TypeError as err:
        raise ConfigError(f"invalid trainer.* setting: {err}") from None
