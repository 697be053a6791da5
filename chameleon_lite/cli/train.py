"""`chameleon-train`: compose config -> data module + Lightning module -> ``trainer.fit``."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from chameleon_lite.checkpoint import export_weights, init_weights_from, safe_torch_load
from chameleon_lite.config import ConfigError, hydra_app, require, resolve_path
from chameleon_lite.data.datamodule import ChameleonDataModule, training_data_record
from chameleon_lite.model import ModelConfig
from chameleon_lite.multimodal_tokenizer import (
    MultimodalTokenizer,
    changed_tokenizer_files,
    tokenizer_digests,
)
from chameleon_lite.train.module import ChameleonLightningModule, trainer_settings
from chameleon_lite.train.trainer import build_trainer, resolve_ckpt_path
from chameleon_lite.vq.data import ShapesImages

log = logging.getLogger(__name__)

#: Training images whose codes `ImageTokenizer.code_appearance` measures for `model.image_code_embed=appearance`
#: (the first 1,024 of 80,000 shapes-world images hold 508 of the 511 codes the 80,000 use; the other three are
#: 1.4e-6 of their image tokens).
APPEARANCE_IMAGES = 1024


def recoloured_codes(data_cfg: DictConfig, image_tokenizer, n: int) -> torch.Tensor:
    """The codes (n, tokens_per_image) of the first ``n`` shapes-world training images with their palette colours
    swapped (`appearance_recolour=true`): a tokenizer trained on such images (`chameleon-train-vq data.recolour=true`)
    has codes for colour-shape pairs the training data holds out, and only images that use them can measure them."""
    if data_cfg.source != "shapes":
        raise ConfigError(f"appearance_recolour=true measures the image codes on recoloured shapes-world images; "
                          f"data={data_cfg.source} has no palette to swap: use data=shapes or appearance_recolour=false")
    images = ShapesImages(seed=data_cfg.seed, image_size=data_cfg.image_size, split="train", length=n, recolour=True)
    grids = torch.cat([image_tokenizer.encode(torch.stack([images[i] for i in range(first, min(first + 256, n))]))
                       for first in range(0, n, 256)])
    return grids.flatten(1)


def build_model_config(cfg: DictConfig, tokenizer: MultimodalTokenizer) -> ModelConfig:
    """`cfg.model` validated, with what the tokenizers fix filled in: the vocabulary size, the image code grid's
    side (`model.image_pos_embed`), the image codes' id block (that or `model.image_code_embed=appearance`) and
    the appearance features per code."""
    values = OmegaConf.to_container(cfg.model, resolve=True)
    vocab = tokenizer.vocab
    if values.get("vocab_size") is None:
        values["vocab_size"] = vocab.size
    elif values["vocab_size"] != vocab.size:  # sampling and export need the model's ids to be the vocab's
        raise ConfigError(f"model.vocab_size={values['vocab_size']} but the tokenizers in {cfg.tokenizer.dir} make a "
                          f"vocabulary of {vocab.size} ids ({vocab.layout.describe()}): set model.vocab_size=null "
                          "to take it from them, or point tokenizer.dir at the tokenizers of that vocabulary")
    if values.get("image_pos_embed") and values.get("image_grid") is None:
        values["image_grid"] = tokenizer.image.grid_size
    appearance = values.get("image_code_embed", "free") != "free"
    if (values.get("image_pos_embed") or appearance) and values.get("image_ids") is None:
        values["image_ids"] = [vocab.image_offset, vocab.image_offset + vocab.n_image]
    if appearance and values.get("image_code_features") is None:
        values["image_code_features"] = tokenizer.image.code_appearance_size()
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


#: Settings a resumed run may change without changing what it trains: how it runs, not what it computes
#: (the batch size at an epoch boundary; inside an epoch the loader refuses another global batch,
#: `ResumableDataLoader.load_state_dict`).
RESUME_FREE = {"model": {"attn_impl", "grad_checkpointing"},
               "data": {"num_workers", "cache_dir", "strict", "batch_size", "batch_tokens", "encode_batch",
                        "val_path", "val_shards", "n_val", "val_rows"}}


def setting_differences(old: Any, new: Any, prefix: str, free: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """Settings that differ, but for the `free` keys of the top level; a key the checkpoint does not record
    (written before the key existed) is not one."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in sorted(old, key=str) if key not in free
                for d in setting_differences(old[key], new.get(key), f"{prefix}.{key}")]
    return [] if old == new else [f"{prefix}: {old!r} in the checkpoint, {new!r} now"]


def check_resume(ckpt_file: str, module: ChameleonLightningModule, dm: ChameleonDataModule, mode: str,
                 trainer: L.Trainer) -> str | None:
    """A resumed run must train what the checkpoint's run trained: ``chameleon-train run_name=x ckpt_path=last``
    without the run's overrides (``experiment=shapes_cpu``) would otherwise continue another recipe (other rows,
    task mix, loss, optimizer) on its weights. ``resume_check=error`` (default) raises listing every setting that
    differs from the checkpoint's hyper-parameters and gradient clipping (`trainer_settings`), except
    `RESUME_FREE`; ``warn`` logs them and goes on. A new ``trainer.max_steps`` (a run extended or shortened) is
    logged: the LR schedule is rebuilt over it; so is another ``trainer.accumulate_grad_batches`` (another global
    batch, free like the batch size). Returns the checkpoint's ``init_from``, the run's record of its start."""
    if mode not in ("error", "warn"):
        raise ConfigError(f"resume_check={mode!r} is invalid: use error or warn")
    saved = safe_torch_load(ckpt_file, mmap=True)
    old = {**saved.get("hyper_parameters", {}), **saved.get("datamodule_hyper_parameters", {})}
    new = {**module.hparams, **dm.hparams}
    if isinstance(old.get("optim"), dict):  # (a checkpoint from before optim.name trained with AdamW)
        old["optim"] = {"name": "adamw", **old["optim"]}
    differences = []
    for key in ("model", "optim", "training_data", "data", "seed"):  # the seed draws the task mix and row order
        if key in old:  # (a checkpoint from before the key was recorded has none)
            differences += setting_differences(old[key], new.get(key), key, RESUME_FREE.get(key, frozenset()))
    if changed := changed_tokenizer_files(old.get("tokenizers"), module.tokenizer_dir):
        differences.append(f"tokenizer.dir={module.tokenizer_dir}: its {' / '.join(changed)} are not those the run "
                           f"trained with (in tokenizer.dir={saved.get('tokenizer_dir')} then)")
    if "trainer_settings" in saved:  # (checkpoints of session 17 on)
        was, now = dict(saved["trainer_settings"]), trainer_settings(trainer)
        if was.pop("accumulate_grad_batches", None) not in (None, now["accumulate_grad_batches"]):
            log.warning("resuming %s with trainer.accumulate_grad_batches=%s (the run used %s): another global batch",
                        ckpt_file, now["accumulate_grad_batches"], saved["trainer_settings"]["accumulate_grad_batches"])
        differences += setting_differences(was, now, "trainer")
    if old.get("train_rows_digest") not in (None, new.get("train_rows_digest")):
        log.warning("resuming %s: the training data changed since the checkpoint under the same settings (a data "
                    "file or image edited?): the epoch it continues is re-packed from the new data, so some of its "
                    "rows may be read twice or not at all; later epochs read the new data in full", ckpt_file)
    if old.get("total_steps") not in (None, new["total_steps"]):
        log.warning("resuming %s (trained for trainer.max_steps=%s) with trainer.max_steps=%s: the LR schedule is "
                    "rebuilt over the new length", ckpt_file, old["total_steps"], new["total_steps"])
    started_from = old.get("init_from")
    if not differences:
        return started_from
    listing = "; ".join(differences)
    if mode == "warn":
        log.warning("resume_check=warn: resuming %s with changed settings: %s", ckpt_file, listing)
        return started_from
    raise ConfigError(f"ckpt_path={ckpt_file} was trained with other settings than this run's: {listing}. Resume "
                      "with the run's original overrides (e.g. chameleon-train experiment=shapes_cpu run_name=x "
                      "ckpt_path=last), or set resume_check=warn to continue it with the new settings")


def train(cfg: DictConfig) -> dict:
    """Run one training job; returns final metrics and the paths it wrote."""
    L.seed_everything(cfg.seed, workers=True)
    run_dir = resolve_path(cfg.run_dir)
    ckpt_file = resolve_ckpt_path(cfg.ckpt_path, run_dir)
    init_from = cfg.get("init_from")
    init_from = None if init_from is None else resolve_path(init_from)
    if ckpt_file is None and init_from is not None and not init_from.exists():  # (a resume does not read it)
        raise FileNotFoundError(f"init_from={init_from} does not exist: give an exported model directory "
                                "(runs/<run>/model), a .ckpt file or a Hugging Face Chameleon directory")
    trainer = build_trainer(cfg)  # first: a bad trainer setting fails before any data is prepared
    resolve_batch_tokens(cfg, trainer)
    dm = ChameleonDataModule(cfg.data, tokenizer_dir=cfg.tokenizer.dir, seed=cfg.seed)
    model_cfg = build_model_config(cfg, dm.load_tokenizer())  # before the data: a bad model.* fails before encoding
    vocab = dm.tokenizer.vocab
    dm.prepare_data()
    dm.setup("fit")
    packed = getattr(dm, "train_set", None)  # (streamed shards pack as they go: no epoch statistics)
    if model_cfg.image_pos_embed and packed is not None and packed.stats[0].split_documents:
        raise ConfigError(f"model.image_pos_embed=true counts each image code's cell from its image's start, but "
                          f"{packed.stats[0].split_documents} documents are longer than data.seq_len={cfg.data.seq_len} "
                          "and split across rows (data.overflow=split), where a continued image would restart at "
                          "cell 0: raise data.seq_len, set data.overflow=reject, or model.image_pos_embed=false")
    max_steps = require(cfg, "trainer.max_steps", lambda v: isinstance(v, int) and v > 0, "a positive int")
    module = ChameleonLightningModule(model=model_cfg.__dict__, optim=OmegaConf.to_container(cfg.optim, resolve=True),
                                      vocab=vocab.to_dict(), total_steps=max_steps,
                                      tokenizer_dir=str(resolve_path(cfg.tokenizer.dir)), compile=cfg.compile,
                                      training_data=training_data_record(cfg.data),
                                      init_from=None if init_from is None else str(init_from),
                                      tokenizers=tokenizer_digests(resolve_path(cfg.tokenizer.dir)))
    if cfg.get("appearance_recolour", False) and model_cfg.image_code_embed == "free":
        log.warning("appearance_recolour=true has no effect with model.image_code_embed=free (no code appearance is "
                    "measured): set model.image_code_embed=free+appearance, or appearance_recolour=false")
    if model_cfg.image_code_embed != "free" and ckpt_file is None:  # (a resume loads the checkpoint's features)
        codes = dm.train_image_codes()
        sample = codes[:APPEARANCE_IMAGES]
        measured_on = f"{len(sample)} of {len(codes)} training images"
        if cfg.get("appearance_recolour", False):
            sample = torch.cat([sample, recoloured_codes(cfg.data, dm.tokenizer.image, len(sample))])
            measured_on += " and on them recoloured (appearance_recolour=true)"
        used = torch.bincount(codes.flatten(), minlength=dm.tokenizer.image.codebook_size)
        unmeasured = used[torch.bincount(sample.flatten(), minlength=used.numel()) == 0].sum().item()
        log.info("model.image_code_embed=%s: measuring the image codes on %s (codes absent there have all-zero "
                 "features: %.4f%% of the training image tokens)", model_cfg.image_code_embed, measured_on,
                 100 * unmeasured / max(used.sum().item(), 1))
        module.model.image_codes.set_features(dm.tokenizer.image.code_appearance(sample))
    log.info("model: %.2fM parameters (%.2fM without embeddings)", module.model.num_params() / 1e6,
             module.model.num_params(exclude_embeddings=True) / 1e6)
    if ckpt_file is not None:
        started_from = check_resume(ckpt_file, module, dm, cfg.get("resume_check", "error"), trainer)
        module.hparams["init_from"] = started_from  # the run's record, whatever this command says
        if init_from is not None:
            log.info("resuming %s: its weights, not init_from=%s, are trained on (the run started from %s)",
                     ckpt_file, init_from, started_from)
    elif init_from is not None:
        source = init_weights_from(module.model, init_from, vocab)
        if changed := changed_tokenizer_files(source.get("tokenizers"), cfg.tokenizer.dir):
            log.warning("init_from=%s was trained with other %s than tokenizer.dir=%s holds (it recorded %s): the "
                        "ids keep their layout but not their meaning; fine-tune with the tokenizers it was trained "
                        "with unless this is meant", init_from, " / ".join(changed), cfg.tokenizer.dir,
                        source.get("tokenizer_dir"))
        log.info("initialised the model from %s (a new run: fresh optimizer state and LR schedule)", init_from)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_file)
    result = {"run_dir": str(run_dir), "global_step": trainer.global_step,
              "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}}
    if cfg.export_weights:
        # on every rank: under FSDP the full weights are gathered from the shards, a collective (rank 0 alone hangs)
        state = trainer.strategy.lightning_module_state_dict()
        if trainer.is_global_zero:
            result["weights"] = str(export_weights(module, run_dir / "model", cfg.tokenizer.dir, state))
    return result


@hydra_app("train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
