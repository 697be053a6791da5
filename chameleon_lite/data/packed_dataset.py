"""Packed rows as a map-style dataset, with a sampler and loader that resume mid-epoch exactly.

Epoch ``e`` re-derives its documents (``make_documents(e)``: shuffled, tasks re-drawn) and packs
them; row ``r`` of epoch ``e`` is therefore a pure function of (seed, e, r) in every process and
worker. :class:`ResumableDataLoader` is *stateful* in Lightning's sense (``state_dict`` /
``load_state_dict``): Lightning stores how many batches of the current epoch were consumed in
every checkpoint, and on ``ckpt_path=...`` the sampler starts right after them. DDP sharding is
done here (row ``r`` goes to rank ``r % world_size``), so the trainer runs with
``use_distributed_sampler=False``.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from chameleon_lite.data.packing import PackedRow, PackingStats, pack_documents
from chameleon_lite.data.sequences import IGNORE_INDEX, Document

log = logging.getLogger(__name__)


class PackedDataset(Dataset):
    """Items are ``(epoch, row)`` keys -> dict of fixed-shape tensors (see ``PackedRow.to_tensors``)."""

    def __init__(self, make_documents: Callable[[int], list[Document]], seq_len: int, pad_id: int,
                 overflow: str = "split", lookahead: int = 64):
        self.make_documents = make_documents
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.overflow = overflow
        self.lookahead = lookahead
        self.stats: dict[int, PackingStats] = {}
        self._rows: dict[int, list[PackedRow]] = {}
        rows0 = self.rows(0)
        if not rows0:
            no_loss = self.stats[0].no_loss_documents
            raise ValueError(f"the data produced no rows: all {no_loss} documents hold no loss token (check "
                             "data.loss_on and data.tasks)" if no_loss else
                             "the training data produced no documents: check data.* (empty dataset?)")
        # `doc_lens` padded to the most documents a row can hold, so any epoch's rows collate: a later epoch's
        # shuffle can pack more short documents into one row than epoch 0 did
        self.max_docs = seq_len

    def rows(self, epoch: int) -> list[PackedRow]:
        """The packed rows of ``epoch``, built once; kept: epoch 0 (it sizes the epoch) and the latest other.
        (A per-instance cache: a method-level ``lru_cache`` would be shared by the train and val sets and
        evict one for the other at every validation.)

        Every epoch trains ``len(rows(0))`` rows: another epoch's documents (other tasks drawn) may pack into a
        few rows more or fewer, and the difference is logged (rows left out, or the first rows read twice)."""
        if epoch not in self._rows:
            stats = PackingStats()
            rows = list(pack_documents(self.make_documents(epoch), self.seq_len, self.pad_id, self.overflow,
                                       self.lookahead, stats))
            self.stats[epoch] = stats
            if epoch != 0 and 0 in self._rows and len(rows) != len(self._rows[0]):
                n0 = len(self._rows[0])
                log.info("epoch %d packs %d rows, epoch 0 %d: every epoch trains %d rows, so %d rows of this "
                         "epoch are %s", epoch, len(rows), n0, n0, abs(len(rows) - n0),
                         "left out" if len(rows) > n0 else "its first rows, read twice")
            for old in [e for e in self._rows if e != 0]:
                del self._rows[old]
            self._rows[epoch] = rows
        return self._rows[epoch]

    def rows_per_epoch(self) -> int:
        return len(self.rows(0))

    def __len__(self) -> int:
        return self.rows_per_epoch()

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, torch.Tensor]:
        """``(epoch, row)``; a row past the epoch's last: the epoch's rows again from its first (another epoch
        may pack fewer rows than epoch 0); past the last of a fixed epoch (validation): a row without labels,
        which evens out the processes' shares (`ResumableRowSampler`)."""
        epoch, row = key if isinstance(key, tuple) else (0, key)
        rows = self.rows(epoch)
        tensors = rows[row % len(rows)].to_tensors(self.max_docs)
        if row < 0:
            tensors["labels"] = torch.full_like(tensors["labels"], IGNORE_INDEX)
        return tensors


def rows_digest(rows: list[PackedRow]) -> str:
    """A digest of packed rows' tokens, labels and document boundaries (16 hex digits)."""
    digest = hashlib.sha256()
    for row in rows:
        for part in (row.input_ids, row.labels, np.asarray(row.doc_lens, dtype=np.int64)):
            digest.update(np.ascontiguousarray(part).tobytes())
    return digest.hexdigest()[:16]


class ResumableRowSampler(Sampler):
    """Yields ``(epoch, row)`` for this rank's share of one epoch, starting at ``start``."""

    def __init__(self, n_rows: int, rank: int = 0, world_size: int = 1, fixed_epoch: bool = False):
        self.n_rows = n_rows
        self.rank = rank
        self.world_size = world_size
        self.fixed_epoch = fixed_epoch  # validation: the same rows (epoch 0's documents) at every pass
        self.epoch = 0
        self.start = 0  # samples of this rank's share already consumed in ``epoch``

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this on the training *and* validation samplers with the training epoch."""
        if epoch != self.epoch and not self.fixed_epoch:
            self.epoch, self.start = epoch, 0

    def __len__(self) -> int:
        if self.fixed_epoch:  # every row once: the last ranks' shares end with an unlabelled row (-1) if need be
            return math.ceil(self.n_rows / self.world_size)
        return self.n_rows // self.world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        mine = range(self.rank, len(self) * self.world_size, self.world_size)
        for row in mine[self.start:]:
            yield self.epoch, row if row < self.n_rows else -1


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`ResumableRowSampler` whose position is saved in checkpoints.

    It draws its worker seed from a private generator: a DataLoader otherwise takes one number
    from the global torch RNG each time an iterator starts (every epoch, every validation, and
    once more after a resume), which would shift the dropout stream of a resumed run against an
    uninterrupted one. The rows themselves never depend on any RNG.
    """

    def __init__(self, dataset: PackedDataset, sampler: ResumableRowSampler, batch_size: int,
                 drop_last: bool = True, **kwargs):
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **kwargs)
        self._rows = 0  # rows of this rank's share of the epoch consumed so far

    def __iter__(self):
        self._rows = self.sampler.start
        for batch in super().__iter__():
            self._rows += self.batch_size
            yield batch
        self.sampler.start = 0  # a completed epoch; the next one starts from its beginning

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "rows": self._rows, "world_size": self.sampler.world_size,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue the saved epoch where it stopped, also on another number of processes.

        Ranks take rows round-robin, so after ``rows`` rows per rank on ``world_size`` processes exactly the
        epoch's first ``rows * world_size`` rows are consumed; each rank of the resumed run continues at its
        share of that count. When the count does not split evenly over the new processes it is rounded down
        (a few rows are seen twice, never skipped) and a warning says so. The global batch (processes x
        batch size) must stay the same inside an epoch: Lightning restores how many batches of the epoch
        were drawn and ends the epoch when that count reaches ``len(loader)``, so a larger batch would end it
        before its last rows (a `ValueError` says so; at an epoch boundary any batch size resumes).
        """
        saved_world = int(state.get("world_size", self.sampler.world_size))
        rows = int(state["rows"]) if "rows" in state else int(state["batches"]) * self.batch_size  # states written before "rows"
        consumed, world = rows * saved_world, self.sampler.world_size
        if "batch_size" in state:  # (not recorded before 2026-11-24: not checked)
            saved_batch = int(state["batch_size"])
            share = self.sampler.n_rows // saved_world // saved_batch * saved_batch  # rows per rank of a whole epoch
            inside = 0 < rows < share  # a state saved after the epoch's last batch: any batch size goes on from there
            if inside and saved_world * saved_batch != world * self.batch_size:
                    raise ValueError(f"the checkpoint stopped inside epoch {int(state['epoch'])} with a global batch of "
                                 f"{saved_world} process(es) x data.batch_size={saved_batch} rows; this run has "
                                 f"{world} x {self.batch_size}. Resume with the same global batch (data.batch_tokens "
                                 "keeps it when trainer.devices changes), or from a checkpoint at an epoch boundary: "
                                 "Lightning counts the epoch's batches in the old size and would end it early")
        self.sampler.epoch = int(state["epoch"])
        self.sampler.start = consumed // world
        if saved_world != world:
            log.info("resuming epoch %d on %d processes (checkpoint: %d): %d rows were consumed, each rank "
                     "continues at row %d of its share", self.sampler.epoch, world, saved_world, consumed,
                     self.sampler.start)
            if consumed % world:  # (only from a state that does not record its batch size)
                log.warning("the %d consumed rows do not split over %d processes: the last %d are read again",
                            consumed, world, consumed % world)
