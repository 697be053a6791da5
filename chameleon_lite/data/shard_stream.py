"""One process's share of a webdataset epoch as packed rows: :class:`ShardStream`.

Which shards each loader worker's stream reads, pass after pass; how a sample (an image and its
caption, or an interleaved document) becomes a :class:`Document`, its images VQ-encoded a group at a
time; and how a resumed epoch replays its streams without encoding the rows it leaves out. The
contract (shard format, streams, equal batches, resume, bad samples) is in
:mod:`chameleon_lite.data.webdataset`, whose :class:`ShardLoader` drives the stream.
"""

from __future__ import annotations

import json
import logging
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain, count, islice

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torch import Tensor
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from chameleon_lite.data.packing import REASON_NO_LOSS, PackedRow, PackingStats, pack_documents
from chameleon_lite.data.records import (
    REASON_BAD_JSON,
    REASON_MISSING_IMAGE,
    REASON_NOT_UTF8,
    SkipReport,
    check_text,
    image_reason,
    parse_segments,
)
from chameleon_lite.data.sequences import Document, ImageSegment, TextSegment
from chameleon_lite.multimodal_tokenizer import MultimodalTokenizer
from chameleon_lite.vq.image_io import ImageLoadError, load_image

try:
    import webdataset as wds
except ImportError:  # the optional `data` extra (checked by check_webdataset_config)
    wds = None

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Skip reasons this source adds to ``ChameleonDataModule.skipped`` (besides jsonl.py's).
REASON_NO_IMAGE = "sample has no image (jpg/jpeg/png/webp)"
REASON_NO_CAPTION = "sample has no caption (txt)"
REASON_BAD_SHARD = "unreadable shard (missing, truncated or not a tar)"


class ShardSampleError(ValueError):
    """A bad sample or shard under ``data.strict=true``: the message names ``shard:key``, the problem and the fix."""


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
                if report.overlong(sample.where, len(doc), self.seq_len, self.overflow):
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
