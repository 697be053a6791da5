"""`chameleon-train-vq`: compose ``conf/train_vq.yaml`` -> image data + VQModule -> ``trainer.fit`` -> export.

    chameleon-train-vq                                  # shapes world, CPU -> tokenizers/shapes/vq.*
    chameleon-train-vq data.folder=/path/to/images vq.name=mine trainer.max_steps=20000
    chameleon-train-vq vq=chameleon_512 trainer=gpu data.jsonl=images.jsonl
"""

from __future__ import annotations

import logging
import shlex
import time
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from chameleon_lite.checkpoint import safe_torch_load
from chameleon_lite.cli.train import setting_differences
from chameleon_lite.config import ConfigError, hydra_app, require, resolve_path
from chameleon_lite.train.trainer import build_trainer, resolve_ckpt_path
from chameleon_lite.vocab import UnifiedVocab
from chameleon_lite.vq.data import VQDataModule
from chameleon_lite.vq.module import VQModule

log = logging.getLogger(__name__)


def build_vq_module(cfg: DictConfig) -> VQModule:
    """The LightningModule described by ``cfg.vq`` (model + loss) and ``cfg.optim``."""
    container = OmegaConf.to_container(cfg, resolve=True)
    return VQModule(model=container["vq"]["model"], loss=container["vq"].get("loss") or {},
                    usage_window=cfg.usage_window, grid_images=cfg.grid_images, **container["optim"])


def check_vq_resume(ckpt_file: str, module: VQModule) -> None:
    """A resumed VQ must have the checkpoint's architecture: with another ``vq.model.*`` Lightning would stop on
    a tensor size mismatch. Raises a `ConfigError` listing each setting that differs."""
    saved = safe_torch_load(ckpt_file, mmap=True).get("hyper_parameters", {})
    differences = setting_differences(saved.get("model", {}), dict(module.hparams["model"]), "vq.model")
    if differences:
        raise ConfigError(f"ckpt_path={ckpt_file} was trained with another VQ: {'; '.join(differences)}. Resume with "
                          "the run's original overrides, or start a new run (another run_name)")


def train_vq(cfg: DictConfig) -> dict[str, Any]:
    """Train one image tokenizer; returns ``{"run_dir", "global_step", "metrics", "wall_time_s", "out_dir"}``.

    ``out_dir`` (the exported ``vq.safetensors`` + ``vq.yaml``) is written by global rank 0 only,
    and only when ``cfg.export`` is true.
    """
    L.seed_everything(cfg.seed, workers=True)
    run_dir = resolve_path(cfg.run_dir)
    require(cfg, "trainer.max_steps", lambda v: isinstance(v, int) and v > 0, "a positive int")
    existing = resolve_path(cfg.out_dir) / "vq.safetensors"
    if cfg.export and existing.exists() and not cfg.get("overwrite", False):
        # checked first: every model trained on that tokenizer would decode with the new codebook
        resuming = "resuming or extending a run exports there again: " if cfg.get("ckpt_path") else ""
        raise ConfigError(f"out_dir={cfg.out_dir} already holds a VQ ({existing}), which this run would replace; "
                          f"{resuming}name the new one (vq.name=mine, exported to tokenizers/mine) or set "
                          f"out_dir=..., or overwrite=true to replace it")
    module = build_vq_module(cfg)
    vocab_path = resolve_path(cfg.out_dir) / "vocab.json"
    if cfg.export and vocab_path.is_file():  # the tokenizer dir's id layout: its image block must fit this VQ
        n_image = UnifiedVocab.load(vocab_path).n_image
        if n_image != module.config.codebook_size:
            raise ConfigError(f"{vocab_path} gives images {n_image} ids, but vq.model.codebook_size="
                              f"{module.config.codebook_size}: train vq.model.codebook_size={n_image}, or export this VQ "
                              "to a tokenizer dir of its own (out_dir=...) and build its vocab.json there")
    datamodule = VQDataModule(image_size=module.config.image_size, seed=cfg.seed,
                              **OmegaConf.to_container(cfg.data, resolve=True))
    trainer = build_trainer(cfg)
    log.info("VQ %s: %.2fM parameters, %d px -> %dx%d codes from %d", cfg.vq.name,
             sum(p.numel() for p in module.model.parameters()) / 1e6, module.config.image_size,
             module.config.grid_size, module.config.grid_size, module.config.codebook_size)
    start = time.time()
    ckpt_file = resolve_ckpt_path(cfg.ckpt_path, run_dir)
    if ckpt_file is not None:
        check_vq_resume(ckpt_file, module)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_file)
    wall = time.time() - start
    result: dict[str, Any] = {"run_dir": str(run_dir), "global_step": trainer.global_step, "wall_time_s": wall,
                              "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}}
    if trainer.is_global_zero and cfg.export:
        if trainer.global_step == 0:  # never overwrite a tokenizer (the shipped one by default) with untrained weights
            raise RuntimeError(f"training took no step (see the log above), so nothing is exported to "
                               f"{resolve_path(cfg.out_dir)}")
        provenance = {"command": _command_line(),
                      "steps": trainer.global_step, "fit_wall_time_s": round(wall, 1),
                      "final_metrics": {k: round(v, 4) for k, v in result["metrics"].items()}}
        out_dir = module.tokenizer(name=cfg.vq.name).save_pretrained(resolve_path(cfg.out_dir), extra=provenance)
        result["out_dir"] = str(out_dir)
        log.info("exported %s", Path(out_dir))
    return result


def _command_line() -> str:
    """The console command that reproduces this run (overrides as given), for the artifact's provenance."""
    from hydra.core.hydra_config import HydraConfig

    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # composed from Python (tests, demo): no command line to record
        return "composed programmatically (no command line)"
    return " ".join(["chameleon-train-vq", *map(shlex.quote, overrides)])


@hydra_app("train_vq")
def main(cfg: DictConfig) -> None:
    train_vq(cfg)


if __name__ == "__main__":
    main()
