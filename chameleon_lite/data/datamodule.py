"""LightningDataModule: sources -> documents -> packed rows -> resumable loaders.

``prepare_data`` (rank 0 only, Lightning's contract) VQ-encodes images into the token cache;
``setup`` loads the tokenizers and caches and builds the packed datasets. ``data=webdataset``
caches nothing: its loaders stream, encode and pack tar shards as they go (``webdataset.py``).
Records that cannot be used are counted with their reason in ``self.skipped`` (validation records in
``self.val_skipped``; both reported by the training module at the end of every epoch); with
``data.strict=true`` the first one raises instead.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from chameleon_lite.config import ConfigError
from chameleon_lite.data.jsonl import JsonlCache, check_jsonl_config, load_or_build_jsonl_cache
from chameleon_lite.data.packed_dataset import (
    PackedDataset,
    ResumableDataLoader,
    ResumableRowSampler,
    rows_digest,
)
from chameleon_lite.data.packing import REASON_NO_LOSS
from chameleon_lite.data.sequences import PAIR_TASKS, Document, SequenceBuilder
from chameleon_lite.data.shapes import CATEGORIES, CaptionParseError, canonical_caption, parse_caption
from chameleon_lite.data.token_cache import TokenCache, load_or_build_shapes_cache
from chameleon_lite.data.webdataset import ShardLoader, check_webdataset_config, shard_loader, shard_urls
from chameleon_lite.multimodal_tokenizer import MultimodalTokenizer

log = logging.getLogger(__name__)

SOURCES = ("shapes", "jsonl", "webdataset")
CAPTION_TARGETS = ("as_is", "canonical", "relation")


PACKING_WARN_BELOW = 0.9


def _tighter_seq_len(seq_len: int, mean_doc_len: float) -> int:
    """The nearest row length to ``seq_len`` that holds a whole number of mean-length documents, plus 2%
    slack for their spread, rounded up to a multiple of 8."""
    docs = max(1, round(seq_len / mean_doc_len))
    return int(-(-docs * mean_doc_len * 1.02 // 8) * 8)


def shapes_category_weights(data: DictConfig) -> dict[str, float] | None:
    """``data.category_weights`` over the default of 1.0 for every shapes category: the categories it names
    get its weights, the others keep 1.0 (0 drops one). None when unset (all equal)."""
    given = data.get("category_weights")
    if given is None:
        return None
    unknown = sorted(set(given) - set(CATEGORIES))
    if unknown:
        raise ConfigError(f"data.category_weights names unknown categories {unknown}: use some of {list(CATEGORIES)}")
    return {c: float(given.get(c, 1.0)) for c in CATEGORIES}


#: The settings that define which shapes-world scenes a model was trained on and which are held out.
WORLD_KEYS = ("seed", "image_size", "holdout_pairs", "val_holdout_pairs", "layout")


def training_data_record(data: DictConfig) -> dict:
    """What a checkpoint records about its training data: the source and, for the shapes world, the
    settings that decide which colour-shape pairs it never saw (`WORLD_KEYS`), so evaluation can warn
    when it scores the model against another world."""
    record = {"source": str(data.source)}
    if data.source == "shapes":
        plain = OmegaConf.to_container(data, resolve=True)
        record |= {k: plain.get(k, []) for k in WORLD_KEYS}
    return record


def check_caption_target(data: DictConfig) -> str:
    """``data.caption_target``: ``as_is`` (captioning documents end in the record's own caption),
    ``canonical`` (shapes only: the scene's one phrasing-free caption, ``canonical_caption``) or
    ``relation`` (shapes only: a two-object scene's caption also states where the objects are,
    ``relation_caption``; text-to-image prompts keep their own captions)."""
    target = data.get("caption_target", "as_is")
    if target not in CAPTION_TARGETS:
        raise ConfigError(f"data.caption_target={target!r} is invalid: use one of {', '.join(CAPTION_TARGETS)}")
    if target != "as_is" and data.source != "shapes":
        raise ConfigError(f"data.caption_target={target} rewrites shapes-world captions; data.source="
                          f"{data.source!r} has free-text captions: use data.caption_target=as_is")
    return target


def caption_targets(cache: TokenCache, target: str) -> list[str]:
    """The caption each cached image's captioning document ends in (``check_caption_target``)."""
    if target == "as_is":
        return list(cache.texts)
    if target == "relation":
        if not all("relation_caption" in m for m in cache.meta):
            raise ConfigError("data.caption_target=relation needs a token cache built with relation captions; "
                              "this one was not (delete its shapes-* files in data.cache_dir to rebuild)")
        return [m["relation_caption"] for m in cache.meta]
    try:
        return [canonical_caption(parse_caption(text)) for text in cache.texts]
    except CaptionParseError as err:
        raise ConfigError(f"data.caption_target=canonical needs shapes-world captions, but the token cache holds "
                          f"one outside the grammar ({err}); delete the shapes-* files in data.cache_dir to "
                          f"rebuild it, or use data.caption_target=as_is") from err


def task_weights(tasks: dict) -> tuple[list[str], np.ndarray]:
    names = [t for t, w in tasks.items() if w]
    unknown = [t for t in names if t not in PAIR_TASKS]
    if unknown or not names:
        raise ConfigError(f"data.tasks={dict(tasks)} is invalid: weights for tasks among {PAIR_TASKS}, at least one > 0")
    w = np.asarray([float(tasks[t]) for t in names])
    if (w < 0).any():
        raise ConfigError(f"data.tasks={dict(tasks)}: weights must be >= 0")
    return names, w / w.sum()


def cache_documents(cache: TokenCache, builder: SequenceBuilder, tasks: dict, seed: int, epoch: int,
                    shuffle: bool = True, captions: list[str] | None = None) -> list[Document]:
    """One document per cached image, its task drawn from ``tasks`` with an (seed, epoch) RNG.

    Text-to-image documents are prompted with ``cache.texts``; captioning documents end in
    ``captions`` (default: the same texts; see ``caption_targets``).
    """
    captions = cache.texts if captions is None else captions
    if len(captions) != len(cache):
        raise ValueError(f"{len(captions)} caption targets for {len(cache)} cached images")
    names, p = task_weights(tasks)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(cache)) if shuffle else np.arange(len(cache))
    choice = rng.choice(len(names), size=len(cache), p=p)
    docs = []
    for i, t in zip(order.tolist(), choice.tolist()):
        text = cache.texts[i] if names[t] == "t2i" else captions[i]  # prompts as cached, captioning targets
        docs.append(builder.pair_document(names[t], text, cache.codes[i]))
    return docs


class ChameleonDataModule(L.LightningDataModule):
    def __init__(self, data: DictConfig, tokenizer_dir: str | Path, seed: int = 0):
        super().__init__()
        self.cfg = data
        self.tokenizer_dir = Path(tokenizer_dir)
        self.seed = seed
        self.skipped: Counter[str] = Counter()
        #: streamed shards (``source=webdataset``) are counted by each process for its own shards (the module
        #: sums them over processes); the other sources load all records in every process
        self.skipped_per_process = data.source == "webdataset"
        #: validation records left out of every validation pass: a data.val_path file's skips, or streamed
        #: validation rows' (each batch's counted once)
        self.val_skipped: Counter[str] = Counter()
        self.val_split_over_processes = False  # whether each process validates on its own val shards
        self.tokenizer: MultimodalTokenizer | None = None
        self.train_set: PackedDataset | None = None
        self.val_set: PackedDataset | None = None
        self._loaded_caches: tuple[TokenCache | JsonlCache, TokenCache | JsonlCache] | None = None
        if data.source not in SOURCES:
            raise ConfigError(f"data.source={data.source!r} is invalid: use 'shapes', 'jsonl' or 'webdataset'")
        if data.source == "jsonl":
            check_jsonl_config(data)
        if data.source == "webdataset":
            check_webdataset_config(data)
        task_weights(data.tasks)
        self.caption_target = check_caption_target(data)
        if data.source == "shapes":
            shapes_category_weights(data)
        # The data settings as trained (``data.batch_size`` as ``data.batch_tokens`` re-derived it, which Hydra's
        # .hydra/config.yaml, written before, cannot show): Lightning logs them beside the module's hparams
        # (hparams.yaml, TensorBoard, W&B) and keeps them in checkpoints.
        self.save_hyperparameters({"data": OmegaConf.to_container(data, resolve=True), "seed": seed})

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        if self.cfg.source != "webdataset":
            self._caches(self.load_tokenizer())

    def setup(self, stage: str | None = None) -> None:
        if self.cfg.source == "webdataset":
            self.load_tokenizer()
            shard_urls(self.cfg.train_shards, "train_shards")  # a missing shard fails before training starts
            if self.cfg.val_shards:
                shard_urls(self.cfg.val_shards, "val_shards")
            return
        if self.train_set is not None:
            return
        tok = self.load_tokenizer()
        train_cache, val_cache = self._caches(tok)
        builder = tok.builder(self.cfg.loss_on)
        cfg = self.cfg

        def packed(cache: TokenCache | JsonlCache, shuffle: bool) -> PackedDataset:
            captions = None if isinstance(cache, JsonlCache) else caption_targets(cache, self.caption_target)

            def make_documents(epoch: int) -> list[Document]:
                if isinstance(cache, JsonlCache):
                    return cache.documents(builder, *task_weights(cfg.tasks), self.seed, epoch, shuffle)
                return cache_documents(cache, builder, cfg.tasks, self.seed, epoch, shuffle, captions)

            return PackedDataset(make_documents,
                                 seq_len=cfg.seq_len, pad_id=tok.vocab.pad_id, overflow=cfg.overflow,
                                 lookahead=cfg.lookahead)

        self.train_set = packed(train_cache, shuffle=True)
        self.val_set = packed(val_cache, shuffle=False)
        # what epoch 0 trains, recorded in checkpoints: a resume can tell that the data changed under its settings
        # (a JSONL file or image edited), which re-packs the epoch it continues (`cli.train.check_resume`)
        self.hparams["train_rows_digest"] = rows_digest(self.train_set.rows(0))
        stats = self.train_set.stats[0]
        log.info("packed %d documents into %d rows of %d tokens (%.1f%% real tokens, %d split, %d rejected)",
                 stats.documents, stats.rows, cfg.seq_len, 100 * stats.real_fraction, stats.split_documents,
                 stats.rejected_documents)
        if stats.real_fraction < PACKING_WARN_BELOW and stats.documents > stats.rows:
            mean = stats.real_tokens / stats.documents
            log.warning("rows of data.seq_len=%d tokens are only %.0f%% real tokens: documents average %.0f tokens "
                        "and a row's leftover is shorter than the next document. A seq_len a few tokens above a "
                        "multiple of the mean document length packs tighter (e.g. %d)", cfg.seq_len,
                        100 * stats.real_fraction, mean, _tighter_seq_len(cfg.seq_len, mean))
        if stats.rejected_documents:
            self.skipped["document longer than seq_len (data.overflow=reject)"] += stats.rejected_documents
        if stats.no_loss_documents:
            self.skipped[REASON_NO_LOSS] += stats.no_loss_documents
            log.warning("%d documents or split chunks hold no loss token (all prompt under data.loss_on=%s) and are "
                        "left out; with data.overflow=split a long prompt can fill a whole chunk: raise data.seq_len "
                        "or use data.loss_on=all", stats.no_loss_documents, cfg.loss_on)

    def train_dataloader(self) -> ResumableDataLoader | ShardLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        if self.cfg.source == "webdataset":
            return self._shard_loader("train_shards", "rows_per_epoch", rank, world, self.cfg.num_workers,
                                      self._fit_epoch)
        sampler = ResumableRowSampler(len(self.train_set), rank=rank, world_size=world)
        if len(sampler) < self.cfg.batch_size:
            lower = "data.batch_tokens" if self.cfg.get("batch_tokens") is not None else "data.batch_size"
            raise ConfigError(f"data.batch_size={self.cfg.batch_size} is larger than the {len(sampler)} packed "
                              f"rows per process; lower {lower} or add data")
        return ResumableDataLoader(self.train_set, sampler, batch_size=self.cfg.batch_size,
                                   num_workers=self.cfg.num_workers, persistent_workers=self.cfg.num_workers > 0)

    def val_dataloader(self) -> ResumableDataLoader | ShardLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        if self.cfg.source == "webdataset":  # the same rows at every validation: always epoch 0
            key = "val_shards" if self.cfg.val_shards else "train_shards"
            if not self.cfg.resample and len(shard_urls(self.cfg[key], key)) < world:
                log.info("data.%s has fewer shards than the %d processes: every process validates on all %d "
                         "rows (the same mean, computed %d times)", key, world, self.cfg.val_rows, world)
                rank, world = 0, 1
            self.val_split_over_processes = world > 1
            return self._shard_loader(key, "val_rows", rank, world, 0, lambda: 0, self.val_skipped, count_once=True)
        # the same rows at every validation (Lightning hands the training epoch to this sampler too), none dropped
        sampler = ResumableRowSampler(len(self.val_set), rank=rank, world_size=world, fixed_epoch=True)
        return ResumableDataLoader(self.val_set, sampler, batch_size=min(self.cfg.batch_size, len(sampler)),
                                   drop_last=False)

    # ------------------------------------------------------------------ helpers
    def _shard_loader(self, key: str, rows_key: str, rank: int, world: int, num_workers: int,
                      epoch_of: Callable[[], int], skipped: Counter | None = None,
                      count_once: bool = False) -> ShardLoader:
        return shard_loader(self.cfg, key, self.load_tokenizer(), task_weights(self.cfg.tasks), rows_key=rows_key,
                            seed=self.seed, rank=rank, world_size=world, num_workers=num_workers,
                            epoch_of=epoch_of, skipped=self.skipped if skipped is None else skipped,
                            count_once=count_once)

    def _fit_epoch(self) -> int:
        """The epoch Lightning hands to samplers' ``set_epoch`` (a streaming loader has no sampler)."""
        return self.trainer.fit_loop.epoch_progress.current.processed if self.trainer else 0

    def load_tokenizer(self) -> MultimodalTokenizer:
        """The tokenizers of ``tokenizer_dir`` (loaded once; no data is read)."""
        if self.tokenizer is None:
            limits = {k: self.cfg[k] for k in ("max_pixels", "min_side") if self.cfg.get(k) is not None}
            self.tokenizer = MultimodalTokenizer.from_dir(self.tokenizer_dir, **limits)  # the loaders' own limits
        return self.tokenizer

    def train_image_codes(self) -> torch.Tensor:
        """The code grids (n, tokens_per_image) of the training images in the token cache, in cache order (for
        `ImageTokenizer.code_appearance`)."""
        if self.cfg.source == "webdataset":
            raise ConfigError("model.image_code_embed=appearance measures the codes on the training images of a token "
                              "cache, which data=webdataset streams past: use data=shapes or data=jsonl, or "
                              "model.image_code_embed=free")
        train, _ = self._caches(self.load_tokenizer())
        return train.codes

    def _caches(self, tok: MultimodalTokenizer) -> tuple[TokenCache | JsonlCache, TokenCache | JsonlCache]:
        """(train, val) caches, loaded once per process: ``prepare_data`` and ``setup`` both ask for them,
        and loading a JSONL source twice would count its skipped records twice."""
        if self._loaded_caches is None:
            self._loaded_caches = self._load_caches(tok)
        return self._loaded_caches

    def _load_caches(self, tok: MultimodalTokenizer) -> tuple[TokenCache | JsonlCache, TokenCache | JsonlCache]:
        cfg = self.cfg
        if cfg.source == "shapes":
            common = {"cache_dir": Path(cfg.cache_dir), "vq_dir": self.tokenizer_dir, "image_tokenizer": tok.image,
                      "seed": cfg.seed, "image_size": cfg.image_size, "holdout_pairs": cfg.holdout_pairs,
                      "layout": cfg.layout, "val_holdout_pairs": cfg.get("val_holdout_pairs", ())}
            common["relation_captions"] = self.caption_target == "relation"
            return (load_or_build_shapes_cache(split="train", n=cfg.n_train,
                                               category_weights=shapes_category_weights(cfg), **common),
                    load_or_build_shapes_cache(split="val", n=cfg.n_val, **common))
        train = load_or_build_jsonl_cache(cfg, cfg.train_path, tok, self.tokenizer_dir, self.skipped)
        val = (load_or_build_jsonl_cache(cfg, cfg.val_path, tok, self.tokenizer_dir, self.val_skipped)
               if cfg.val_path else train)
        return train, val
