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
VQ-encoding the skipped rows (:class:`_Replay`) and goes on with exactly the rows of an uninterrupted
run (for the same number of processes and workers).

*Bad samples* are counted by reason each time a stream meets them and logged with ``shard:key``
(jsonl.py's :class:`SkipReport`); the counts travel with the batches from the workers to
``ChameleonDataModule.skipped``. ``data.strict=true`` raises :class:`ShardSampleError` instead. An unreadable
shard is such a skip too: a stream whose shards give nothing reads other shards (``ShardStream._rows``); it
raises, naming the shards, only when none of the shards it can read gives a usable sample.
"""

from __future__ import annotations

import json
import logging
import re
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain, count, islice

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from chameleon_lite.config import ConfigError, resolve_path
from chameleon_lite.data.jsonl import (
    REASON_BAD_JSON,
    REASON_MISSING_IMAGE,
    REASON_NOT_UTF8,
    REASON_TOO_LONG,
    SkipReport,
    check_text,
    image_reason,
    parse_segments,
)
from chameleon_lite.data.packing import REASON_NO_LOSS, PackedRow, PackingStats, pack_documents
from chameleon_lite.data.sequences import Document, ImageSegment, TextSegment
from chameleon_lite.multimodal_tokenizer import MultimodalTokenizer
from chameleon_lite.vq.image_io import ImageLoadError, load_image

try:
    import webdataset as wds
except ImportError:  # the optional `data` extra
    wds = None

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Skip reasons this source adds to ``ChameleonDataModule.skipped`` (besides jsonl.py's).
REASON_NO_IMAGE = "sample has no image (jpg/jpeg/png/webp)"
REASON_NO_CAPTION = "sample has no caption (txt)"
REASON_BAD_SHARD = "unreadable shard (missing, truncated or not a tar)"
INSTALL_HINT = "data=webdataset needs the webdataset package: pip install 'chameleon-lite[data]'"
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # pipe:, file:, http:, s3: ... (not a drive letter)


class ShardSampleError(ValueError):
    """A bad sample or shard under ``data.strict=true``: the message names ``shard:key``, the problem and the fix."""


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


class ShardStream(IterableDataset):
    """This process's share of an epoch: ``batches`` batches of ``(batch dict, skip counts)``.

    ``epoch`` and ``start`` (batches of the epoch already consumed) are set by :class:`ShardLoader`.
    Batch ``b`` of the epoch comes from worker stream ``b % workers``.
    """

    def __init__(self, urls: list[str], key: str, tok: MultimodalTokenizer, tasks: tuple[list[str], np.ndarray],
                 cfg: DictConfig, *, seed: int, rank: int, world_size: int, batches: int):
        self.urls, self.key, self.tok = urls, key, tok
        self.seed, self.rank, self.world_size, self.batches = seed, rank, world_size, batches
        self.epoch = self.start = 0
        self.builder = tok.builder(cfg.loss_on)
        self.task_names, self.task_p = tasks
        self.batch_size, self.seq_len, self.overflow = int(cfg.batch_size), int(cfg.seq_len), str(cfg.overflow)
        self.lookahead, self.resample, self.strict = int(cfg.lookahead), bool(cfg.resample), bool(cfg.strict)
        self.shuffle_buffer, self.encode_batch = int(cfg.shuffle_buffer), int(cfg.encode_batch)
        self.max_pixels, self.min_side = int(cfg.max_pixels), int(cfg.min_side)
        # Rows are collated to one shape; a row holds at most seq_len documents (1-token split tails).
        self.max_docs = self.seq_len

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[tuple[dict[str, Tensor], dict[str, int]]]:
        info = get_worker_info()
        workers = info.num_workers if info else 1
        # The DataLoader asks its worker 0 first, also after a resume at batch `start`: rotate so that
        # batch b of the epoch still comes from stream b % workers.
        stream = ((info.id if info else 0) + self.start) % workers
        mine, done = len(range(stream, self.batches, workers)), len(range(stream, self.start, workers))
        counts: Counter = Counter()
        report = SkipReport(counts, self.strict, ShardSampleError)
        rows = self._rows(self.rank * workers + stream, self.world_size * workers, done * self.batch_size, report)
        for _ in range(mine - done):
            batch = default_collate([next(rows).to_tensors(self.max_docs) for _ in range(self.batch_size)])
            yield batch, dict(counts)
            counts.clear()

    # ------------------------------------------------------------------ one stream
    def _rows(self, slot: int, n_slots: int, skip: int, report: SkipReport) -> Iterator[PackedRow]:
        """Endless packed rows of stream ``slot``, pass after pass, the first ``skip`` rows left out.

        A pass that gives no row (its shards unreadable, or all their samples bad) is counted, not fatal:
        the next pass draws other shards, and a ``data.resample=false`` stream whose whole share gave nothing
        goes on with the other streams' shards (repeating their samples this epoch). Raises only when every
        shard the stream can read has been read since its last row without giving one.
        """
        replay = _Replay(skip)
        barren: set[str] = set()  # shards read since this stream's last row, none giving one
        no_loss_since_row = 0
        borrowing = False
        for pass_index in count():
            rng = np.random.default_rng([self.seed, self.epoch, slot, pass_index])
            shards = self._pass_shards(rng, slot, n_slots, borrowing)
            stats, no_loss = PackingStats(), 0
            for row in pack_documents(self._documents(shards, rng, report, replay), self.seq_len,
                                      self.tok.vocab.pad_id, self.overflow, self.lookahead, stats):
                if stats.no_loss_documents > no_loss:  # counted with the row that follows them
                    report.skipped[REASON_NO_LOSS] += stats.no_loss_documents - no_loss
                    no_loss = stats.no_loss_documents
                if replay.active:
                    replay.row_skipped()
                else:
                    yield row
            if stats.rows:
                barren.clear()
                no_loss_since_row = 0
                continue
            barren.update(shards)
            no_loss_since_row += stats.no_loss_documents
            if barren.issuperset(self.urls):
                raise ValueError(self._no_progress_message(barren, no_loss_since_row))
            if not self.resample and not borrowing:
                borrowing = True
                log.warning("data.%s: stream %d of %d got no usable sample from its shards (%s); it reads the other "
                            "streams' shards for the rest of the epoch, repeating their samples", self.key, slot,
                            n_slots, _some(sorted(shards)))

    def _no_progress_message(self, shards: set[str], no_loss: int) -> str:
        why = (f"{no_loss} documents without a loss token (data.loss_on={self.builder.loss_on})" if no_loss
               else "the skipped-sample warnings")
        return (f"data.{self.key}: none of the {len(shards)} shards this stream reads ({_some(sorted(shards))}) gave "
                f"a usable sample (see {why}); fix or replace the shards")

    def _pass_shards(self, rng: np.random.Generator, slot: int, n_slots: int, borrowing: bool = False) -> list[str]:
        """The shards of one pass: drawn with replacement (``resample``), else the slot's share of the epoch's
        permutation, or, ``borrowing``, the other slots' shares; in a fresh order every pass."""
        if self.resample:
            return [self.urls[i] for i in rng.integers(len(self.urls), size=max(1, len(self.urls) // n_slots))]
        epoch_order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.urls))
        share = np.delete(epoch_order, np.s_[slot::n_slots]) if borrowing else epoch_order[slot::n_slots]
        return [self.urls[i] for i in rng.permutation(share)]

    def _documents(self, shards: list[str], rng: np.random.Generator, report: SkipReport,
                   replay: _Replay) -> Iterator[Document]:
        samples = chain.from_iterable(wds.tarfile_samples([{"url": url}], handler=self._shard_handler(url, report))
                                      for url in shards)
        if self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                                  seed=int(rng.integers(2**62)))(samples)
        while raw := list(islice(samples, self.encode_batch)):
            group = self._decode([s for s in (self._parse(r, rng, report) for r in raw) if s is not None], report)
            for sample in group.samples:
                # Built when the packer asks for it: a replay that ends mid-group gets real codes from here on.
                doc = self._document(sample, group.placeholder() if replay.active else group.codes())
                if self.overflow == "reject" and len(doc) > self.seq_len:
                    report(sample.where, REASON_TOO_LONG, f"document of {len(doc)} tokens is longer than "
                           f"data.seq_len={self.seq_len}", "raise data.seq_len or set data.overflow=split")
                    continue
                if replay.active:
                    replay.hold(doc, lambda s=sample, g=group: self._document(s, g.codes()))
                yield doc

    # ------------------------------------------------------------------ samples
    def _parse(self, raw: dict, rng: np.random.Generator, report: SkipReport) -> _Sample | None:
        """A webdataset sample (extension -> bytes) -> a sample with image bytes and text, or None (reported)."""
        where = f"{raw['__url__']}:{raw['__key__']}"
        members = sorted(k for k in raw if not k.startswith("__"))
        record = None
        if "json" in raw:
            try:
                record = json.loads(raw["json"].decode("utf-8"))
            except UnicodeDecodeError as err:
                report(where, REASON_NOT_UTF8, f"json member is not valid UTF-8 ({err.reason} at byte {err.start})",
                       "re-encode it as UTF-8")
                return None
            except json.JSONDecodeError as err:
                report(where, REASON_BAD_JSON, f"json member is not valid JSON ({err.msg} at column {err.colno})",
                       "fix the member or remove the sample")
                return None
        if isinstance(record, dict) and "segments" in record:
            parts = parse_segments(where, record["segments"], report, str.lower)  # webdataset lower-cases extensions
            if parts is None:
                return None
            for kind, member in parts:
                if kind == "image" and member not in raw:
                    report(where, REASON_MISSING_IMAGE, f"image segment names member {member!r}, which the sample "
                           f"lacks (members: {members})", "name the member by its extension after the key, e.g. "
                           "'a.png' for <key>.a.png")
                    return None
            return _Sample(where, [(kind, (v, raw[v]) if kind == "image" else v) for kind, v in parts], task=None)
        image = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
        if image is None:
            report(where, REASON_NO_IMAGE, f"no image member among {members}", "add <key>.jpg (or .png, .webp) or "
                   "remove the sample")
            return None
        if "txt" not in raw:
            report(where, REASON_NO_CAPTION, f"no caption member among {members}", "add <key>.txt or remove the sample")
            return None
        try:
            # a .txt member's BOM and trailing newline are file artefacts, not caption: prompts carry neither
            text = raw["txt"].decode("utf-8-sig").strip()
        except UnicodeDecodeError as err:
            report(where, REASON_NOT_UTF8, f"caption is not valid UTF-8 ({err.reason} at byte {err.start})",
                   "re-encode the caption as UTF-8")
            return None
        if check_text(where, text, report) is None:
            return None
        task = self.task_names[rng.choice(len(self.task_names), p=self.task_p)]
        return _Sample(where, [("image", (image, raw[image])), ("text", text)], task=task)

    def _decode(self, samples: list[_Sample], report: SkipReport) -> _EncodeGroup:
        """Decode the samples' images; a sample with an unloadable image is reported and left out."""
        images: list[Image.Image] = []
        kept = []
        for sample in samples:
            members = [value for kind, value in sample.parts if kind == "image"]
            try:
                loaded = [load_image(data, self.max_pixels, self.min_side, name=f"{sample.where}.{member}")
                          for member, data in members]
            except ImageLoadError as err:
                report(sample.where, image_reason(str(err)), str(err), "or drop the sample from its shard")
                continue
            index = iter(range(len(images), len(images) + len(loaded)))
            sample.parts = [(kind, next(index) if kind == "image" else v) for kind, v in sample.parts]
            images.extend(loaded)
            kept.append(sample)
        return _EncodeGroup(self.tok, images, kept)

    def _document(self, sample: _Sample, codes: Tensor) -> Document:
        """``codes`` (images of the group, tokens_per_image) are indexed by the sample's image parts."""
        if sample.task is not None:
            (_, image), (_, text) = sample.parts
            return self.builder.pair_document(sample.task, text, codes[image])
        return self.builder.document([TextSegment(v) if kind == "text" else ImageSegment(codes[v])
                                      for kind, v in sample.parts])

    def _shard_handler(self, url: str, report: SkipReport) -> Callable[[Exception], bool]:
        """webdataset's error handler for ``url``: report the error and go on with what can still be read."""
        def handle(err: Exception) -> bool:
            report(url, REASON_BAD_SHARD, f"cannot read the shard ({err})",
                   f"check it with `tar -tf` or remove it from data.{self.key}")
            return True

        return handle


def _some(names: list[str], n: int = 3) -> str:
    """The first ``n`` of ``names`` and how many more, for messages."""
    more = f", and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


@dataclass
class _Sample:
    """``parts``: ("text", text) / ("image", (member, bytes)), after decoding ("image", index in the group)."""

    where: str  # shard:key
    parts: list[tuple[str, object]]
    task: str | None  # one of PAIR_TASKS for an image-caption pair, None for an interleaved document


class _EncodeGroup:
    """Up to ``data.encode_batch`` consecutive samples whose images are VQ-encoded in one call, when first needed.

    A group is always encoded whole, also when a resumed run needs only some of it, so its codes are
    bit-identical to those of an uninterrupted run.
    """

    def __init__(self, tok: MultimodalTokenizer, images: list[Image.Image], samples: list[_Sample]):
        self.tok, self.images, self.samples = tok, images, samples
        self.n_images = len(images)
        self._codes: Tensor | None = None

    def codes(self) -> Tensor:
        """(n_images, tokens_per_image) int64 codebook indices."""
        if self._codes is None:
            with torch.inference_mode():
                self._codes = (self.tok.encode_images(self.images).long() if self.images
                               else torch.empty(0, self.tok.tokens_per_image, dtype=torch.long))
            self.images = []
        return self._codes

    def placeholder(self) -> Tensor:
        """Codes of the right shape for documents that are only counted (a replay), never trained on."""
        return torch.zeros(self.n_images, self.tok.tokens_per_image, dtype=torch.long)


class _Replay:
    """Leaves out the first ``rows`` rows of a stream (a resumed epoch) without VQ-encoding their images.

    While rows are left out, documents carry placeholder codes: their length, all the packer looks
    at, is the real one, and images are still decoded (a bad one changes the stream). Once the last
    row is out, the documents the packer still holds (tracked through weak references to their token
    arrays, which split chunks share) get their real tokens, so the rows that follow are exact.
    """

    def __init__(self, rows: int):
        self.rows = rows
        self._held: dict[int, tuple[weakref.ref, Callable[[], Document]]] = {}

    @property
    def active(self) -> bool:
        return self.rows > 0

    def hold(self, doc: Document, real: Callable[[], Document]) -> None:
        key = id(doc.input_ids)
        self._held[key] = (weakref.ref(doc.input_ids, lambda _: self._held.pop(key, None)), real)

    def row_skipped(self) -> None:
        self.rows -= 1
        if self.rows:
            return
        for ref, real in list(self._held.values()):
            ids = ref()
            if ids is not None:
                ids[:] = real().input_ids
        self._held.clear()
