"""`chameleon-train`: compose config -> data module + Lightning module -> ``trainer.fit``."""

from __future__ import annotations

import logging

import lightning as L
from omegaconf import DictConfig, OmegaConf

from chameleon_lite.checkpoint import export_weights
from chameleon_lite.config import ConfigError, hydra_app, require, resolve_path
from chameleon_lite.data.datamodule import ChameleonDataModule, training_data_record
from chameleon_lite.model import ModelConfig
from chameleon_lite.multimodal_tokenizer import MultimodalTokenizer
from chameleon_lite.train.module import ChameleonLightningModule
from chameleon_lite.train.trainer import build_trainer, resolve_ckpt_path

log = logging.getLogger(__name__)


def build_model_config(cfg: DictConfig, tokenizer: MultimodalTokenizer) -> ModelConfig:
    """`cfg.model` validated, with what the tokenizers fix filled in: the vocabulary size and, for
    `model.image_pos_embed`, the image code grid's side and the image codes' id block."""
    values = OmegaConf.to_container(cfg.model, resolve=True)
    vocab = tokenizer.vocab
    if values.get("vocab_size") is None:
        values["vocab_size"] = vocab.size
    if values.get("image_pos_embed"):
        if values.get("image_grid") is None:
            values["image_grid"] = tokenizer.image.grid_size
        if values.get("image_ids") is None:
            values["image_ids"] = [vocab.image_offset, vocab.image_offset + vocab.n_image]
    mc = ModelConfig.from_dict(values)
    seq_len = require(cfg, "data.seq_len", lambda v: isinstance(v, int) and v >= 2, "an int >= 2")
    if seq_len > mc.max_seq_len:
        raise ConfigError(f"data.seq_len={seq_len} exceeds model.max_seq_len={mc.max_seq_len}; "
                          "lower data.seq_len or raise model.max_seq_len")
    return mc


def resolve_batch_tokens(cfg: DictConfig, trainer: L.Trainer) -> None:
    """``data.batch_tokens`` (tokens per optimizer step, over all processes and accumulated micro-batches)
    -> ``data.batch_size`` (rows per micro-batch per process), so that one setting gives the same global
    batch on 1 CPU, 4 GPUs or 2 nodes. No-op when ``data.batch_tokens`` is null."""
    tokens = cfg.data.get("batch_tokens")
    if tokens is None:
        return
    require(cfg, "data.batch_tokens", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
            "a positive int, or null (then data.batch_size rows per process)")
    require(cfg, "data.seq_len", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 2, "an int >= 2")
    world, accumulate = trainer.world_size, trainer.accumulate_grad_batches
    per_row = cfg.data.seq_len * world * accumulate
    if tokens % per_row:
        near = sorted({max(1, tokens // per_row) * per_row, (tokens // per_row + 1) * per_row})
        raise ConfigError(f"data.batch_tokens={tokens} is not a multiple of data.seq_len={cfg.data.seq_len} x "
                          f"{world} process(es) x trainer.accumulate_grad_batches={accumulate} = {per_row}: use "
                          f"{' or '.join(map(str, near))}")
    cfg.data.batch_size = tokens // per_row
    log.info("data.batch_tokens=%d: %d rows of %d tokens per micro-batch per process (%d process(es), %d "
             "micro-batch(es) per step)", tokens, cfg.data.batch_size, cfg.data.seq_len, world, accumulate)


def train(cfg: DictConfig) -> dict:
    """Run one training job; returns final metrics and the paths it wrote."""
    L.seed_everything(cfg.seed, workers=True)
    run_dir = resolve_path(cfg.run_dir)
    trainer = build_trainer(cfg)  # first: a bad trainer setting fails before any data is prepared
    resolve_batch_tokens(cfg, trainer)
    dm = ChameleonDataModule(cfg.data, tokenizer_dir=cfg.tokenizer.dir, seed=cfg.seed)
    dm.prepare_data()
    dm.setup("fit")
    vocab = dm.tokenizer.vocab
    model_cfg = build_model_config(cfg, dm.tokenizer)
    max_steps = require(cfg, "trainer.max_steps", lambda v: isinstance(v, int) and v > 0, "a positive int")
    module = ChameleonLightningModule(model=model_cfg.__dict__, optim=OmegaConf.to_container(cfg.optim, resolve=True),
                                      vocab=vocab.to_dict(), total_steps=max_steps,
                                      tokenizer_dir=str(resolve_path(cfg.tokenizer.dir)), compile=cfg.compile,
                                      training_data=training_data_record(cfg.data))
    log.info("model: %.2fM parameters (%.2fM without embeddings)", module.model.num_params() / 1e6,
             module.model.num_params(exclude_embeddings=True) / 1e6)
    trainer.fit(module, datamodule=dm, ckpt_path=resolve_ckpt_path(cfg.ckpt_path, run_dir))
    result = {"run_dir": str(run_dir), "global_step": trainer.global_step,
              "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}}
    if trainer.is_global_zero and cfg.export_weights:
        result["weights"] = str(export_weights(module, run_dir / "model", cfg.tokenizer.dir))
    return result


@hydra_app("train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
