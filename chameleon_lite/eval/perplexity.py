"""Per-modality perplexity on packed validation rows (text-target tokens vs image-target tokens)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from chameleon_lite.data.datamodule import cache_documents, caption_targets, check_caption_target
from chameleon_lite.data.packed_dataset import PackedDataset
from chameleon_lite.data.sequences import IGNORE_INDEX
from chameleon_lite.data.token_cache import load_or_build_shapes_cache
from chameleon_lite.model import ChameleonLM, lm_loss
from chameleon_lite.vocab import UnifiedVocab


def validation_loader(data_cfg, tok, seq_len: int, batch_size: int = 4) -> DataLoader:
    """Packed rows of the shapes val split (as in training, unshuffled), rows of ``seq_len``."""
    if data_cfg.source != "shapes":
        raise ValueError(f"task=perplexity supports data.source=shapes, got {data_cfg.source!r}")
    cache = load_or_build_shapes_cache(Path(data_cfg.cache_dir), Path(tok.source), tok.image, seed=data_cfg.seed,
                                       split="val", n=data_cfg.n_val, image_size=data_cfg.image_size,
                                       holdout_pairs=data_cfg.holdout_pairs, layout=data_cfg.layout,
                                       val_holdout_pairs=data_cfg.get("val_holdout_pairs", ()))
    builder = tok.builder(data_cfg.loss_on)
    captions = caption_targets(cache, check_caption_target(data_cfg))
    dataset = PackedDataset(lambda epoch: cache_documents(cache, builder, data_cfg.tasks, data_cfg.seed, epoch,
                                                          shuffle=False, captions=captions),
                            seq_len=seq_len, pad_id=tok.vocab.pad_id, overflow=data_cfg.overflow)
    return DataLoader(dataset, batch_size=batch_size)


@torch.inference_mode()
def evaluate_perplexity(model: ChameleonLM, vocab: UnifiedVocab, loader, max_batches: int | None = None) -> dict:
    """exp(mean CE) over all counted tokens, over text-target and over image-target tokens."""
    device = next(model.parameters()).device  # the loader yields CPU tensors (`chameleon-eval device=cuda`)
    image_ids = vocab.image_mask(device)
    sums = {"all": 0.0, "text": 0.0, "image": 0.0}
    counts = {"all": 0, "text": 0, "image": 0}
    for k, batch in enumerate(tqdm(loader, desc="perplexity", unit="batch", total=max_batches)):
        if max_batches is not None and k >= max_batches:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(batch["input_ids"], positions=batch["positions"], doc_lens=batch["doc_lens"])
        labels = batch["labels"]
        token_ce = lm_loss(logits, labels, 0.0, IGNORE_INDEX).token_ce
        counted = labels != IGNORE_INDEX
        is_image = image_ids[labels.clamp(min=0)] & counted
        for name, mask in (("all", counted), ("text", counted & ~is_image), ("image", is_image)):
            sums[name] += float(token_ce[mask].sum())
            counts[name] += int(mask.sum())
    result = {}
    for name, total in sums.items():
        if counts[name]:
            ce = total / counts[name]
            result[name] = {"ce": ce, "perplexity": math.exp(ce) if not ce >= 700 else math.inf, "tokens": counts[name]}
    return result
