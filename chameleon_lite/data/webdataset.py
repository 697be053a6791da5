"""Webdataset source: captioned images and interleaved documents streamed from tar shards (data beyond memory).

A shard is a standard webdataset tar; the members of one sample share a key::

    0001.jpg   0001.txt                  an image (jpg / jpeg / png / webp) and its caption
    0002.json  0002.a.png  0002.b.png    {"segments": [...]} in jsonl.py's format; an image segment's
                                         "path" names a member of the same sample ("a.png")

Other members (img2dataset's metadata ``json``, say) are ignored. Nothing is cached: every epoch reads
the shards through webdataset, decodes images with :func:`load_image` (the guards of every source),
VQ-encodes them ``data.encode_batch`` at a time, builds documents with :class:`SequenceBuilder` (a pair
draws its task from ``data.tasks``) and packs them with :func:`pack_documents` and its look-ahead buffer.

*Streams.* Each loader worker of each process runs one stream, slot ``rank * workers + worker`` of
``S``. With ``data.resample=false`` an epoch permutes the shards (alike in every process) and slot ``s``
reads shards ``s::S``, disjoint from all other slots, in a fresh order every pass, for as many passes
as its quota needs (fewer shards than slots is a ConfigError); with ``true`` every pass draws shards
with replacement. Rows are packed per pass (a pass ends with a padded row), so one pass holds every
usable sample of its shards exactly once.

*Equal batches.* An epoch is nominal: ``data.rows_per_epoch`` rows over all processes, so every process
yields ``rows_per_epoch // (world_size * batch_size)`` batches whatever its shards hold, repeating
or resampling them rather than running dry: DDP ranks always step together.

*Resume.* A stream is a pure function of (seed, epoch, slot). :class:`ShardLoader` saves the epoch and
the batches consumed in Lightning checkpoints; a resumed epoch replays its streams up to there without
VQ-encoding the skipped rows (``shard_stream._Replay``) and goes on with exactly the rows of an
uninterrupted run (for the same number of processes and workers).

*Bad samples* are counted by reason each time a stream meets them and logged with ``shard:key``
(records.py's :class:`SkipReport`); the counts travel with the batches from the workers to
``ChameleonDataModule.skipped``. ``data.strict=true`` raises :class:`ShardSampleError` instead. An unreadable
shard is such a skip too: a stream whose shards give nothing reads other shards
(``shard_stream.ShardStream._rows``); it raises, naming the shards, only when none of the shards it can
read gives a usable sample.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import DataLoader

from chameleon_lite.config import ConfigError, resolve_path
from chameleon_lite.data.shard_stream import (  # the names besides ShardStream moved there: re-exported
    IMAGE_EXTENSIONS,  # noqa: F401
    REASON_BAD_SHARD,  # noqa: F401
    REASON_NO_CAPTION,  # noqa: F401
    REASON_NO_IMAGE,  # noqa: F401
    ShardSampleError,  # noqa: F401
    ShardStream,
)
from chameleon_lite.multimodal_tokenizer import MultimodalTokenizer

try:
    import webdataset as wds
except ImportError:  # the optional `data` extra
    wds = None

log = logging.getLogger(__name__)

INSTALL_HINT = "data=webdataset needs the webdataset package: pip install 'chameleon-lite[data]'"
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # pipe:, file:, http:, s3: ... (not a drive letter)


def check_webdataset_config(data: DictConfig) -> None:
    """Raise :class:`ConfigError` naming the key if ``data=webdataset`` lacks what it needs."""
    if wds is None:
        raise ConfigError(INSTALL_HINT)
    spec = OmegaConf.select(data, "train_shards", throw_on_missing=False)
    if not spec:
        raise ConfigError("config key 'data.train_shards' is required with data=webdataset: give the shards, "
                          "e.g. data.train_shards='shards/train-{000000..000099}.tar'")
    for key, low in (("rows_per_epoch", 1), ("val_rows", 1), ("encode_batch", 1), ("max_pixels", 1),
                     ("min_side", 1), ("shuffle_buffer", 0)):
        value = OmegaConf.select(data, key, throw_on_missing=False)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"config key 'data.{key}' = {value!r} is invalid: expected an int >= {low}")
    if not isinstance(data.resample, bool):
        raise ConfigError(f"config key 'data.resample' = {data.resample!r} is invalid: expected true or false")


def shard_urls(spec: str | list[str] | ListConfig, key: str) -> list[str]:
    """``data.<key>`` -> shard URLs. ``spec`` is a brace pattern (``shards/train-{000000..000099}.tar``;
    ``::`` joins several) or a list of them; local paths are made absolute and must exist."""
    items = [spec] if isinstance(spec, str) else list(spec) if isinstance(spec, (list, ListConfig)) else []
    if not items or not all(isinstance(item, str) and item for item in items):
        raise ConfigError(f"config key 'data.{key}' = {spec!r} is invalid: expected a brace pattern such as "
                          "'shards/train-{000000..000099}.tar' or a list of shard paths/URLs")
    urls = []
    for url in (u for item in items for u in wds.shardlists.expand_urls(item)):
        if not _URL_SCHEME.match(url):
            path = resolve_path(url)
            if not path.is_file():
                raise FileNotFoundError(f"shard {path} (from data.{key}) does not exist; fix data.{key}")
            url = str(path)
        urls.append(url)
    return urls


def shard_loader(cfg: DictConfig, key: str, tok: MultimodalTokenizer, tasks: tuple[list[str], np.ndarray], *,
                 rows_key: str, seed: int, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 epoch_of: Callable[[], int] = lambda: 0, skipped: Counter | None = None,
                 count_once: bool = False) -> ShardLoader:
    """The loader of this process over the shards of ``cfg[key]`` (``cfg`` is the ``data`` config).

    ``tasks`` are the task names and probabilities of image-caption pairs; ``cfg[rows_key]`` packed
    rows per epoch over all ``world_size`` processes; ``epoch_of()`` says the epoch when an iteration
    starts; skipped samples are counted into ``skipped`` (``count_once``: once per batch of the epoch, for a
    loader that reads the same rows at every pass). Raises
    :class:`ConfigError` for too few rows for one batch, or fewer shards than streams without
    ``data.resample``.
    """
    urls = shard_urls(cfg[key], key)
    rows = cfg[rows_key]
    batches = rows // (world_size * cfg.batch_size)
    if batches < 1:
        raise ConfigError(f"data.{rows_key}={rows} is less than one batch per process ({world_size} processes x "
                          f"data.batch_size={cfg.batch_size}); raise data.{rows_key}")
    streams = world_size * max(1, num_workers)
    if not cfg.resample and len(urls) < streams:
        raise ConfigError(f"data.{key} has {len(urls)} shards but {world_size} processes x {max(1, num_workers)} "
                          f"loader workers read {streams} disjoint streams; split the data into at least {streams} "
                          "shards, lower data.num_workers, or set data.resample=true (draw shards with replacement)")
    stream = ShardStream(urls, key, tok, tasks, cfg, seed=seed, rank=rank, world_size=world_size, batches=batches)
    log.info("data.%s: %d shards, %d batches of %d rows per process per epoch (%d streams%s)", key, len(urls),
             batches, cfg.batch_size, streams, ", resampled" if cfg.resample else "")
    return ShardLoader(stream, epoch_of, Counter() if skipped is None else skipped, num_workers, count_once)


class ShardLoader(DataLoader):
    """Loader of a :class:`ShardStream`: ``len(self)`` batches per epoch, position saved in checkpoints.

    The stream yields ``(batch, skip counts)``; the counts go to ``skipped`` and the batch dict (the
    format of the other sources' loaders) to the trainer. Workers are started anew every epoch, so the
    epoch and resume position reach them. Like ``ResumableDataLoader``, it draws worker seeds from a
    private generator so that starting an iterator never shifts the global torch RNG.
    """

    def __init__(self, stream: ShardStream, epoch_of: Callable[[], int], skipped: Counter, num_workers: int = 0,
                 count_once: bool = False):
        super().__init__(stream, batch_size=None, num_workers=num_workers, generator=torch.Generator())
        self.epoch_of = epoch_of
        self.skipped = skipped
        self.count_once = count_once  # validation: every pass reads the same rows, count their skips once
        self._counted: set[tuple[int, int]] = set()  # (epoch, batch) whose skips are counted (count_once)
        self._batches = 0

    def __iter__(self):
        stream: ShardStream = self.dataset
        epoch = self.epoch_of()
        if epoch != stream.epoch:
            stream.epoch, stream.start = epoch, 0
        self._batches = stream.start
        for batch, skips in super().__iter__():
            # per batch, not per finished pass: Lightning stops a validation pass at len(loader) or
            # limit_val_batches without exhausting the iterator
            if not self.count_once or (key := (stream.epoch, self._batches)) not in self._counted:
                self.skipped.update(skips)
                if self.count_once:
                    self._counted.add(key)
            self._batches += 1
            yield batch
        stream.start = 0  # a completed epoch; the next one starts from its beginning

    def state_dict(self) -> dict:
        stream: ShardStream = self.dataset
        return {"epoch": stream.epoch, "batches": self._batches, "world_size": stream.world_size,
                "batch_size": stream.batch_size}

    def load_state_dict(self, state: dict) -> None:
        """The saved position; refused when it was saved with another process count or batch size, since each
        process streams its own shards and a position inside them does not carry over to another split."""
        stream: ShardStream = self.dataset
        saved = (int(state.get("world_size", stream.world_size)), int(state.get("batch_size", stream.batch_size)))
        if saved != (stream.world_size, stream.batch_size):
            raise ConfigError(f"the checkpoint's webdataset position was saved by {saved[0]} process(es) x "
                              f"data.batch_size={saved[1]}; this run has {stream.world_size} x {stream.batch_size}. "
                              "Streamed shards cannot be re-split mid-epoch: resume with the same trainer.devices / "
                              "num_nodes and batch size, or start a new run from the weights (ckpt_path=null)")
        stream.epoch = int(state["epoch"])
        stream.start = self._batches = int(state["batches"])
