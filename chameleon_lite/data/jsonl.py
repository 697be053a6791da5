"""JSONL data source: your own captioned images and interleaved image-text documents.

One JSON object per line (blank lines are ignored); relative image paths are relative to the JSONL
file's folder::

    {"image": "img/0001.jpg", "text": "a red circle left of a blue square"}
    {"segments": [{"type": "text", "text": "Step 1:"}, {"type": "image", "path": "img/s1.png"}, ...]}

An ``image`` + ``text`` record becomes one text->image or image->text document per epoch, its task
drawn from ``data.tasks`` as for the shapes world; a ``segments`` record becomes one interleaved
document in its own order (every segment is a loss target).

Images are VQ-encoded once. Their codes live in a content-addressed store in ``data.cache_dir``
(:mod:`chameleon_lite.data.image_code_store`), one file per image tokenizer holding one row per
distinct image *file content*: editing the JSONL, adding or renaming files encodes only contents the
store has not seen, and a retrained VQ starts a new store. Its builders take turns (``build_lock``), so
a second process (a torchrun rank, a run sharing ``data.cache_dir``) waits, then finds the codes.
``data.max_pixels`` and ``data.min_side`` apply at every start, to stored images too (through their
stored sizes; a store written before sizes were stored learns them from the files' headers).
Unreadable images are not stored: they are checked (and reported) again on every start, so a fixed
file is picked up.

Bad records never stop a run by default: each is counted under its reason in the ``skipped``
Counter handed in by the data module (which reports it at every epoch end) and logged with its
``file:line``. With ``data.strict=true`` the first one raises :class:`JsonlRecordError` naming the
file, the line and the fix.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from chameleon_lite.config import ConfigError, resolve_path
from chameleon_lite.data.image_code_store import (
    ImageCodeStore,
    JsonlCacheError,  # noqa: F401 (re-exported: raised by read_store)
    read_store,
    store_path,
    write_store,
)
from chameleon_lite.data.records import (  # noqa: F401 (REASON_* re-exported: the skip reasons of this source)
    REASON_BAD_IMAGE,
    REASON_BAD_JSON,
    REASON_BAD_RECORD,
    REASON_EMPTY_TEXT,
    REASON_MISSING_IMAGE,
    REASON_NOT_UTF8,
    REASON_TOO_LONG,
    REASON_UNKNOWN_SEGMENT,
    SkipReport,
    check_text,
    image_reason,
    parse_segments,
)
from chameleon_lite.data.sequences import Document, ImageSegment, SequenceBuilder, TextSegment
from chameleon_lite.files import build_lock, file_digest
from chameleon_lite.multimodal_tokenizer import MultimodalTokenizer
from chameleon_lite.vq.image_io import ImageLoadError, check_image_size, load_image

log = logging.getLogger(__name__)

ENCODE_BATCH = 64

Part = tuple[str, str | int]  # ("text", text) or ("image", row of JsonlCache.codes)


class JsonlRecordError(ValueError):
    """A bad record under ``data.strict=true``: the message names ``file:line``, the problem and the fix."""


@dataclass(frozen=True)
class JsonlRecord:
    """One usable record: ``where`` is ``file:line``; a ``paired`` record's parts are ``(image, text)``."""

    where: str
    parts: tuple[Part, ...]
    paired: bool


@dataclass
class JsonlCache:
    """``codes`` (n_images, tokens_per_image) int64 VQ indices of the distinct images the ``records`` use."""

    codes: Tensor
    records: list[JsonlRecord]

    def __len__(self) -> int:
        return len(self.records)

    def documents(self, builder: SequenceBuilder, task_names: list[str], task_p: np.ndarray, seed: int,
                  epoch: int, shuffle: bool = True) -> list[Document]:
        """One document per record; pairs draw their task from ``task_names`` with probabilities ``task_p``.

        Order and tasks are a pure function of ``(seed, epoch)`` (as for the shapes world), so every
        process and every resumed run sees the same documents.
        """
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(self.records)) if shuffle else np.arange(len(self.records))
        choice = rng.choice(len(task_names), size=len(self.records), p=task_p)
        docs = []
        for i, t in zip(order.tolist(), choice.tolist()):
            record = self.records[i]
            if record.paired:
                (_, image), (_, text) = record.parts
                docs.append(builder.pair_document(task_names[t], text, self.codes[image]))
            else:
                docs.append(builder.document([TextSegment(v) if kind == "text" else ImageSegment(self.codes[v])
                                              for kind, v in record.parts]))
        return docs


@dataclass
class _Pending:
    """A parsed record whose images (resolved paths) are not encoded yet."""

    where: str
    parts: list[tuple[str, str | Path]]
    paired: bool
    digests: list[str] = field(default_factory=list)


def check_jsonl_config(data: DictConfig) -> None:
    """Raise :class:`ConfigError` naming the key if ``data=jsonl`` lacks what it needs."""
    path = OmegaConf.select(data, "train_path", throw_on_missing=False)
    if not isinstance(path, str) or not path:
        raise ConfigError("config key 'data.train_path' is required with data=jsonl: give the training file, "
                          "e.g. data.train_path=data/train.jsonl")
    for key in ("max_pixels", "min_side"):
        value = OmegaConf.select(data, key, throw_on_missing=False)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"config key 'data.{key}' = {value!r} is invalid: expected a positive int")


def load_or_build_jsonl_cache(cfg: DictConfig, path: str | Path, tok: MultimodalTokenizer,
                              tokenizer_dir: str | Path, skipped: Counter) -> JsonlCache:
    """Parse the JSONL file at ``path``, VQ-encode the images the store lacks, return the usable records.

    ``cfg`` is the ``data`` config (``strict``, ``max_pixels``, ``min_side``, ``seq_len``,
    ``overflow``, ``loss_on``, ``cache_dir``). Bad records are counted into ``skipped`` by reason (or
    raise :class:`JsonlRecordError` with ``cfg.strict``). Raises ``FileNotFoundError`` for a missing
    file and ``ValueError`` if no record is usable.
    """
    source = resolve_path(path)
    if not source.is_file():
        raise FileNotFoundError(f"JSONL data file {source} does not exist; fix data.train_path / data.val_path")
    report = SkipReport(skipped, bool(cfg.strict), JsonlRecordError)
    before = sum(skipped.values())
    pending = [p for p in (_parse_line(source, number, raw, report)
                           for number, raw in enumerate(source.read_bytes().splitlines(), start=1)) if p]
    _hash_images(pending, report)
    store_file = store_path(Path(cfg.cache_dir), Path(tokenizer_dir))
    # one builder at a time: another process building the same store (a torchrun rank, a run sharing
    # data.cache_dir) holds the lock while it encodes; this one then reads what it wrote
    with build_lock(store_file.with_suffix(".lock")):
        store = read_store(store_file, tok)
        n_stored = len(store.digests)
        if _check_and_encode(pending, store, tok, cfg, report):
            write_store(store_file, store)
            if len(store.digests) > n_stored:  # (else it only learnt the sizes of images stored without them)
                log.info("image-code store %s: encoded %d new images (%d in total)", store_file,
                         len(store.digests) - n_stored, len(store.digests))
    cache = _assemble(pending, dict(zip(store.digests, range(len(store.digests)))), store.codes, tok, cfg, report)
    n_skipped = sum(skipped.values()) - before
    if not cache.records:
        raise ValueError(f"{source}: no usable records ({n_skipped} skipped: "
                         f"{dict(skipped)}); fix the file (see the warnings above)")
    log.info("%s: %d records (%d skipped), %d distinct images", source, len(cache), n_skipped, len(cache.codes))
    return cache


# ---------------------------------------------------------------------------------------- parsing
def _parse_line(source: Path, number: int, raw: bytes, report: SkipReport) -> _Pending | None:
    """One line -> a pending record, or None (blank line, or a bad record that ``report`` counted)."""
    where = f"{source}:{number}"
    try:
        line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a byte order mark starts a file, no record
    except UnicodeDecodeError as err:
        report(where, REASON_NOT_UTF8, f"line is not valid UTF-8 ({err.reason} at byte {err.start})",
               "re-encode the file as UTF-8")
        return None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        report(where, REASON_BAD_JSON, f"not valid JSON ({err.msg} at column {err.colno})",
               "fix or remove the line (one JSON object per line)")
        return None
    if isinstance(record, dict) and "segments" in record:
        parts = parse_segments(where, record["segments"], report, lambda path: _resolve(source.parent, path))
        return _Pending(where, parts, paired=False) if parts is not None else None
    if isinstance(record, dict) and isinstance(record.get("image"), str) and isinstance(record.get("text"), str):
        text = check_text(where, record["text"], report)
        if text is None:
            return None
        return _Pending(where, [("image", _resolve(source.parent, record["image"])), ("text", text)], paired=True)
    report(where, REASON_BAD_RECORD, f"record {line.strip()[:80]!r} is neither an image+text pair nor a "
           "segments document", 'write {"image": path, "text": caption} or {"segments": [...]}')
    return None


def _resolve(folder: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else folder / p


# ---------------------------------------------------------------------------------------- images
def _hash_images(pending: list[_Pending], report: SkipReport) -> None:
    """Fill ``digests`` (content sha256) of every record's images; records with a missing file are dropped."""
    seen: dict[Path, str] = {}
    keep = []
    for record in pending:
        for kind, value in record.parts:
            if kind != "image":
                continue
            if value not in seen:
                if not value.is_file():
                    report(record.where, REASON_MISSING_IMAGE, f"image file not found: {value}",
                           "fix the path (relative paths are relative to the JSONL file's folder) or remove "
                           "the record")
                    break
                seen[value] = file_digest(value)
            record.digests.append(seen[value])
        else:
            keep.append(record)
    pending[:] = keep


def _check_and_encode(pending: list[_Pending], store: ImageCodeStore, tok: MultimodalTokenizer, cfg: DictConfig,
                      report: SkipReport) -> bool:
    """Apply ``data.max_pixels`` / ``data.min_side`` to every image the records use, and load + VQ-encode those
    the store lacks into it, ``ENCODE_BATCH`` files at a time.

    A stored image is checked against its stored size (read from the file's header where the store has
    none), so a store filled under other limits lets nothing past these. Records with an image that fails
    are dropped (reported, under the reason a fresh image gets). Returns whether ``store`` changed.
    """
    row_of = {digest: row for row, digest in enumerate(store.digests)}
    todo: dict[str, tuple[Path, str]] = {}  # digest -> (path, file:line) of its first use
    for record in pending:
        paths = [value for kind, value in record.parts if kind == "image"]
        for digest, image_path in zip(record.digests, paths):
            todo.setdefault(digest, (image_path, record.where))
    fix = "or drop the record from the JSONL file"
    failed: dict[str, tuple[str, str]] = {}  # digest -> (reason, message)

    def fail(digest: str, where: str, err: ImageLoadError) -> None:
        failed[digest] = (image_reason(str(err)), str(err))
        if report.strict:
            report(where, *failed[digest], fix)  # raises now rather than after encoding the rest

    changed = False
    to_load = []
    for digest, (image_path, where) in todo.items():
        row = row_of.get(digest)
        if row is not None and store.sizes[row] is None:
            store.sizes[row] = _header_size(image_path)
            changed |= store.sizes[row] is not None
        if row is None or store.sizes[row] is None:
            to_load.append((digest, image_path, where))
            continue
        try:
            check_image_size(*store.sizes[row], str(image_path), max_pixels=cfg.max_pixels, min_side=cfg.min_side)
        except ImageLoadError as err:
            fail(digest, where, err)
    new_codes = [store.codes]
    for start in tqdm(range(0, len(to_load), ENCODE_BATCH), desc=f"VQ-encoding {len(to_load)} images",
                      unit="batch", disable=not to_load):
        loaded = []
        for digest, image_path, where in to_load[start:start + ENCODE_BATCH]:
            try:
                image = load_image(image_path, max_pixels=cfg.max_pixels, min_side=cfg.min_side)
            except ImageLoadError as err:
                fail(digest, where, err)
                continue
            # the size after EXIF rotation: the limits (pixel count, short side) do not change with it
            if digest in row_of:  # stored, its header unreadable by itself
                store.sizes[row_of[digest]] = image.size
            else:
                loaded.append((digest, image))
            changed = True
        if loaded:
            with torch.inference_mode():
                new_codes.append(tok.encode_images([image for _, image in loaded]).to(torch.int32))
            store.digests.extend(digest for digest, _ in loaded)
            store.sizes.extend(image.size for _, image in loaded)
    store.codes = torch.cat(new_codes)
    keep = []
    for record in pending:
        bad = next((failed[d] for d in record.digests if d in failed), None)
        if bad is None:
            keep.append(record)
        else:
            report(record.where, *bad, fix)
    pending[:] = keep
    return changed


def _header_size(path: Path) -> tuple[int, int] | None:
    """An image file's (width, height) from its header (no pixel decoded); None if the header is unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.size
    except (OSError, Image.DecompressionBombError):  # (UnidentifiedImageError is an OSError)
        return None


# ---------------------------------------------------------------------------------------- records
def _assemble(pending: list[_Pending], rows: dict[str, int], store_codes: Tensor, tok: MultimodalTokenizer,
              cfg: DictConfig, report: SkipReport) -> JsonlCache:
    """Pending records -> a JsonlCache holding only the images they use; applies ``data.overflow=reject``."""
    builder = tok.builder(cfg.loss_on)
    image_len = tok.tokens_per_image + 2  # <boi> codes <eoi>
    used: dict[int, int] = {}  # store row -> cache row
    records = []
    for record in pending:
        length = 2 + sum(len(builder.text_ids(v)) if kind == "text" else image_len for kind, v in record.parts)
        if report.overlong(record.where, length, cfg.seq_len, cfg.overflow):
            continue
        digests = iter(record.digests)
        parts = tuple(("text", v) if kind == "text" else ("image", used.setdefault(rows[next(digests)], len(used)))
                      for kind, v in record.parts)
        records.append(JsonlRecord(record.where, parts, record.paired))
    order = sorted(used, key=used.get)
    codes = store_codes[order].long() if order else torch.empty(0, tok.tokens_per_image, dtype=torch.long)
    return JsonlCache(codes, records)
