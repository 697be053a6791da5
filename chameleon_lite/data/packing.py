"""Packer: documents -> fixed-length rows with document boundaries (no cross-document attention).

Rows are filled by *best fit over a look-ahead buffer*: documents wait in a buffer of
``lookahead`` entries and each free slot of a row takes a buffered document chosen so that the
row ends full (see ``_choose``). Compared with greedy
first-come packing this leaves far fewer padding tokens at row ends (measured by
``benchmarks/bench_packing.py``) while staying deterministic for a given input order.

Every input token lands in exactly one row (but see below). A document longer than ``seq_len`` is either split
into ``seq_len`` chunks (``overflow="split"``; each chunk restarts its positions) or rejected
(``overflow="reject"``); both are counted in :class:`PackingStats`, never dropped silently.
A document or split chunk without a single loss token (``Document.has_loss``: all prompt, e.g. the
image half of a caption document split at ``seq_len`` under ``data.loss_on=completion``) is left out
and counted: attention never crosses documents, so it could only cost compute, and a micro-batch of
such rows would have no loss to take.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from chameleon_lite.data.sequences import IGNORE_INDEX, Document

Overflow = Literal["split", "reject"]
#: The skip reason data sources report for `PackingStats.no_loss_documents`.
REASON_NO_LOSS = "document or split chunk without a loss token (all prompt; see data.loss_on, data.overflow)"


class DocumentTooLongError(ValueError):
    """A document exceeds seq_len and overflow='reject' with strict data handling."""


@dataclass
class PackingStats:
    documents: int = 0
    rows: int = 0
    real_tokens: int = 0
    total_tokens: int = 0
    split_documents: int = 0
    rejected_documents: int = 0
    rejected_lengths: list[int] = field(default_factory=list)
    no_loss_documents: int = 0  # documents or split chunks left out: no loss token in them

    @property
    def real_fraction(self) -> float:
        return self.real_tokens / max(1, self.total_tokens)


@dataclass
class PackedRow:
    """One training row. ``doc_lens`` sums to ``seq_len``; the padding tail is its own document."""

    input_ids: np.ndarray  # (seq_len,) int64
    labels: np.ndarray  # (seq_len,) int64, IGNORE_INDEX where no loss
    positions: np.ndarray  # (seq_len,) int64, restart at 0 in every document
    doc_lens: list[int]

    def to_tensors(self, max_docs: int) -> dict[str, torch.Tensor]:
        """Fixed-shape tensors for the default collate; ``doc_lens`` zero-padded to ``max_docs``."""
        if len(self.doc_lens) > max_docs:
            raise ValueError(f"row has {len(self.doc_lens)} documents > max_docs={max_docs}")
        lens = np.zeros(max_docs, dtype=np.int64)
        lens[: len(self.doc_lens)] = self.doc_lens
        return {"input_ids": torch.from_numpy(self.input_ids), "labels": torch.from_numpy(self.labels),
                "positions": torch.from_numpy(self.positions), "doc_lens": torch.from_numpy(lens)}


def _chunks(doc: Document, seq_len: int) -> list[Document]:
    return [Document(doc.input_ids[i:i + seq_len], doc.loss_mask[i:i + seq_len])
            for i in range(0, len(doc), seq_len)]


def _assemble(docs: list[Document], seq_len: int, pad_id: int) -> PackedRow:
    ids = np.full(seq_len, pad_id, dtype=np.int64)
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros(seq_len, dtype=np.int64)
    lens: list[int] = []
    start = 0
    for doc in docs:
        n = len(doc)
        ids[start:start + n] = doc.input_ids
        labels[start:start + n] = doc.labels()
        positions[start:start + n] = np.arange(n)
        lens.append(n)
        start += n
    if start < seq_len:
        positions[start:] = np.arange(seq_len - start)
        lens.append(seq_len - start)
    return PackedRow(ids, labels, positions, lens)


def _choose(buffer: list[Document], free: int) -> int | None:
    """Index of the buffered document to place into ``free`` slots (None: nothing fits).

    Preference: a document that fills the row exactly; one of a pair that does; else the one
    closest to ``free / k``, where ``k`` is the whole number of average documents that fill ``free``.
    """
    lengths = [len(d) for d in buffer]
    by_length: dict[int, int] = {}
    for k, n in enumerate(lengths):
        by_length.setdefault(n, k)
    if free in by_length:
        return by_length[free]
    for k, n in enumerate(lengths):
        rest = free - n
        if rest > 0 and rest in by_length and (rest != n or lengths.count(n) > 1):
            return k
    # Aim every pick at the average length that lets a whole number of buffered documents fill the row.
    fitting = [k for k, n in enumerate(lengths) if n <= free]
    if not fitting:
        return None
    mean = sum(lengths) / len(lengths)
    target = free / max(1, round(free / mean))
    return min(fitting, key=lambda k: (abs(lengths[k] - target), -lengths[k]))


def pack_documents(docs: Iterable[Document], seq_len: int, pad_id: int, overflow: Overflow = "split",
                   lookahead: int = 64, stats: PackingStats | None = None) -> Iterator[PackedRow]:
    """Pack ``docs`` into rows of exactly ``seq_len`` tokens (see module docstring).

    ``stats`` (optional, updated in place) counts documents, rows, real tokens, splits and
    rejections. With ``lookahead=1`` this is plain greedy packing.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if overflow not in ("split", "reject"):
        raise ValueError(f"data.overflow={overflow!r} is invalid: use 'split' or 'reject'")
    stats = stats if stats is not None else PackingStats()
    buffer: list[Document] = []
    row: list[Document] = []
    free = seq_len

    def emit() -> PackedRow:
        nonlocal row, free
        packed = _assemble(row, seq_len, pad_id)
        stats.rows += 1
        stats.total_tokens += seq_len
        stats.real_tokens += seq_len - free
        row, free = [], seq_len
        return packed

    def place_from_buffer() -> Iterator[PackedRow]:
        nonlocal free
        best = _choose(buffer, free)
        if best is None:
            yield emit()
            return
        doc = buffer.pop(best)
        row.append(doc)
        free -= len(doc)
        if free == 0:
            yield emit()

    for doc in docs:
        stats.documents += 1
        if len(doc) > seq_len:
            if overflow == "reject":
                stats.rejected_documents += 1
                stats.rejected_lengths.append(len(doc))
                continue
            stats.split_documents += 1
            pieces = _chunks(doc, seq_len)
        else:
            pieces = [doc]
        for piece in pieces:
            if piece.has_loss():
                buffer.append(piece)
            else:
                stats.no_loss_documents += 1
        while len(buffer) >= lookahead:
            yield from place_from_buffer()
    while buffer:
        yield from place_from_buffer()
    if row:
        yield emit()
