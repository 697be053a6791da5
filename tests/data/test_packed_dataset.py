"""ResumableDataLoader: a resumed epoch reads exactly the rows not yet read, also on another process count."""

from __future__ import annotations

import logging

import pytest
import torch

from chameleon_lite.data.packed_dataset import ResumableDataLoader, ResumableRowSampler

N_ROWS = 48


class RowIds(torch.utils.data.Dataset):
    """Item (epoch, row) -> the row id, so batches show which rows were read."""

    def __len__(self) -> int:
        return N_ROWS

    def __getitem__(self, key):
        return torch.tensor(key[1])


def _loaders(world: int, batch_size: int) -> list[ResumableDataLoader]:
    return [ResumableDataLoader(RowIds(), ResumableRowSampler(N_ROWS, rank, world), batch_size)
            for rank in range(world)]


def _read(loader: ResumableDataLoader, batches: int | None = None) -> list[int]:
    rows = []
    for i, batch in enumerate(loader):
        rows += batch.tolist()
        if batches is not None and i + 1 == batches:
            break
    return rows


@pytest.mark.parametrize("before, after", [((1, 4), (1, 4)), ((1, 4), (2, 2)), ((2, 2), (4, 1)), ((2, 3), (3, 2)),
                                           ((2, 3), (1, 6))])
def test_resume_reads_each_remaining_row_once_on_other_processes_at_the_same_global_batch(before, after):
    (world, batch), (new_world, new_batch) = before, after
    old = _loaders(world, batch)
    read = [row for loader in old for row in _read(loader, batches=3)]
    state = old[0].state_dict()  # what the checkpoint holds (rank 0's; every rank is at the same batch)
    resumed = _loaders(new_world, new_batch)
    for loader in resumed:
        loader.load_state_dict(state)
    rest = [row for loader in resumed for row in _read(loader)]
    assert sorted(read) == list(range(len(read)))  # ranks interleave: the epoch's first rows were read
    assert len(set(rest)) == len(rest)
    assert len(set(rest) & set(read)) == len(read) % new_world  # an uneven split rereads its remainder only
    assert not set(range(max(rest) + 1)) - set(read) - set(rest)  # nothing skipped
    assert N_ROWS // new_world * new_world - max(rest) - 1 < new_world * new_batch  # read to the epoch's end

@pytest.mark.parametrize("after", [(1, 8), (2, 4), (1, 3)])
def test_another_global_batch_inside_an_epoch_is_refused_and_any_resumes_at_its_end(after):
    """Lightning restores how many batches of the epoch were drawn and stops at len(loader): with a larger
    global batch the resumed epoch would end before its last rows (seen with a real Trainer: 48 rows, 3 steps
    of 4, resumed with 8: rows 36-47 never read)."""
    old = _loaders(1, 4)
    _read(old[0], batches=3)
    resumed = _loaders(*after)
    with pytest.raises(ValueError, match=r"global batch of 1 process\(es\) x data.batch_size=4 rows"):
        resumed[0].load_state_dict(old[0].state_dict())
    _read(old[0])  # the epoch read to its end (the state a checkpoint after its last batch holds)
    for loader in resumed:
        loader.load_state_dict(old[0].state_dict())
    assert [row for loader in resumed for row in _read(loader)] == []  # nothing of epoch 0 is left
    for loader in resumed:
        loader.sampler.set_epoch(1)  # the next starts from row 0, whatever the batch
    assert sorted(row for loader in resumed for row in _read(loader)) == list(range(N_ROWS // after[0] // after[1]
                                                                                     * after[0] * after[1]))


def test_validation_reads_the_same_rows_every_epoch_and_drops_none():
    sampler = ResumableRowSampler(10, fixed_epoch=True)
    loader = ResumableDataLoader(RowIds(), sampler, batch_size=4, drop_last=False)
    sampler.set_epoch(3)  # Lightning hands the training epoch to the validation sampler too
    assert list(sampler) == [(0, r) for r in range(10)] and _read(loader) == list(range(10))
    training = ResumableRowSampler(10)
    training.set_epoch(3)
    assert next(iter(training)) == (3, 0)


@pytest.mark.parametrize("n_rows, world", [(11, 2), (10, 4), (1, 2)])
def test_validation_over_processes_reads_every_row_once_with_equal_shares(n_rows, world):
    """Shares of equal length (every process runs as many validation steps); rows that even them out are -1,
    which `PackedDataset` serves without labels."""
    shares = [list(ResumableRowSampler(n_rows, rank, world, fixed_epoch=True)) for rank in range(world)]
    assert len({len(share) for share in shares}) == 1
    rows = [row for share in shares for _, row in share]
    assert sorted(r for r in rows if r >= 0) == list(range(n_rows))
    assert rows.count(-1) == -(-n_rows // world) * world - n_rows


def test_an_uneven_split_of_an_old_state_rereads_rather_than_skips_and_warns(caplog):
    old = _loaders(1, 5)
    read = _read(old[0], batches=1)  # rows 0-4: 5 rows do not split over 2 processes
    resumed = _loaders(2, 2)
    state = {k: v for k, v in old[0].state_dict().items() if k != "batch_size"}  # written before it was recorded
    with caplog.at_level(logging.WARNING):
        for loader in resumed:
            loader.load_state_dict(state)
    assert "the last 1 are read again" in caplog.text
    first = [_read(loader, batches=1) for loader in resumed]
    assert sorted(row for rows in first for row in rows) == [4, 5, 6, 7]  # row 4 again, nothing skipped
    assert read == [0, 1, 2, 3, 4]


def test_states_from_before_rows_were_recorded_still_load():
    loader = _loaders(1, 4)[0]
    loader.load_state_dict({"epoch": 0, "batches": 2})
    assert _read(loader, batches=1) == [8, 9, 10, 11]


def test_any_epoch_collates_however_many_documents_its_rows_pack_and_padding_rows_have_no_labels():
    """Epoch 0 packs 2 documents per row; epoch 1's (other tasks drawn, say) 16 short ones: the padded
    ``doc_lens`` still fits (it once was sized by epoch 0 and stopped the run in epoch 1)."""
    import numpy as np

    from chameleon_lite.data.packed_dataset import PackedDataset
    from chameleon_lite.data.sequences import IGNORE_INDEX, Document

    def documents(epoch: int) -> list[Document]:
        length, count = (32, 8) if epoch == 0 else (4, 64)
        return [Document(np.arange(length, dtype=np.int64) + 1, np.ones(length, dtype=bool)) for _ in range(count)]

    dataset = PackedDataset(documents, seq_len=64, pad_id=0)
    batch = torch.utils.data.default_collate([dataset[(1, row)] for row in range(len(dataset))])
    assert batch["doc_lens"].shape[1] == 64 and (batch["doc_lens"] > 0).sum(1).max() == 16
    assert (batch["doc_lens"].sum(1) == 64).all()
    padding = dataset[(0, -1)]
    assert (padding["labels"] == IGNORE_INDEX).all() and (dataset[(0, 0)]["labels"] != IGNORE_INDEX).any()
