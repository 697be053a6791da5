"""Build the Lightning Trainer, callbacks and loggers from the composed Hydra config."""

from __future__ import annotations

import logging
import platform
from pathlib import Path
from typing import Any

import lightning as L
import torch
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


def build_strategy(strategy: Any, model_checkpoints: bool = False) -> Any:
    """``fsdp`` becomes an FSDPStrategy that wraps and activation-checkpoints each decoder block, and writes its
    (full, rank-0) checkpoints through `AtomicCheckpointIO` like every other strategy. With
    ``model_checkpoints`` (``model.grad_checkpointing=true``) the model already checkpoints each block, and
    FSDP's own checkpoint wrapper would recompute every block's forward a second time: it is left out."""
    if strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        from chameleon_lite.model.transformer import Block

        if model_checkpoints:
            log.info("trainer=fsdp with model.grad_checkpointing=true: the blocks are checkpointed by the model, "
                     "not also by FSDP")
        return FSDPStrategy(auto_wrap_policy={Block}, activation_checkpointing_policy=None if model_checkpoints
                            else {Block}, sharding_strategy="FULL_SHARD", checkpoint_io=AtomicCheckpointIO())
    return strategy


CPU_BF16_MODES = ("auto", "keep")


def cpu_has_native_bf16() -> bool | None:
    """Whether this x86 CPU multiplies bf16 in hardware (AVX512-BF16 or AMX tiles); None where torch cannot
    tell (other architectures: Arm's bf16 extensions are not checked, so their setting is left alone)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    if platform.machine().lower() not in ("x86_64", "amd64") or not all(checks):
        return None
    return any(check() for check in checks)


def cpu_precision(trainer_cfg: dict[str, Any], mode: str) -> None:
    """``cpu_bf16=auto``: bf16 precision for CPU training on an x86 CPU without native bf16 becomes
    ``32-true``, with a warning. There oneDNN emulates bf16 matmuls: 80x slower than fp32 on a 2-core AVX2
    EPYC (a 1024^3 matmul, 2.4 s vs 31 ms), so the demo's minutes would become hours. ``keep``: as configured."""
    if mode not in CPU_BF16_MODES:
        raise ConfigError(f"cpu_bf16={mode!r} is invalid: use one of {', '.join(CPU_BF16_MODES)}")
    precision = str(trainer_cfg.get("precision", ""))
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if mode == "auto" and on_cpu and precision.startswith("bf16") and cpu_has_native_bf16() is False:
        log.warning("trainer.precision=%s on a CPU without native bf16 (no AVX512-BF16, no AMX): its bf16 "
                    "matmuls are emulated, ~80x slower than fp32; training in 32-true instead "
                    "(cpu_bf16=keep insists on bf16)", precision)
        trainer_cfg["precision"] = "32-true"


def build_trainer(cfg: DictConfig, **overrides: Any) -> L.Trainer:
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    if not isinstance(trainer_cfg, dict) or trainer_cfg.pop("_target_", None) != "lightning.Trainer":
        raise ConfigError("trainer config must be a lightning.Trainer node (conf/trainer/*.yaml)")
    cpu_precision(trainer_cfg, cfg.get("cpu_bf16", "auto"))
    accumulate = trainer_cfg.get("accumulate_grad_batches", 1)
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise ConfigError(f"trainer.accumulate_grad_batches={accumulate!r} is invalid: expected an int >= 1 "
                          "(micro-batches per optimizer step)")
    strategy = trainer_cfg.get("strategy", "auto")
    trainer_cfg["strategy"] = build_strategy(strategy, bool(OmegaConf.select(cfg, "model.grad_checkpointing")))
    if strategy != "fsdp":  # (FSDP's strategy object carries it)
        trainer_cfg.setdefault("plugins", []).append(AtomicCheckpointIO())
    trainer_cfg.update(overrides)
    try:
        return L.Trainer(callbacks=build_callbacks(cfg), logger=build_loggers(cfg) or False, **trainer_cfg)
    except TypeError as err:
        raise ConfigError(f"invalid trainer.* setting: {err}") from None
