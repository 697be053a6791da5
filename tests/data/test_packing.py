import numpy as np
import pytest

from chameleon_lite.data.packing import PackingStats, pack_documents
from chameleon_lite.data.sequences import IGNORE_INDEX, Document


def make_docs(lengths, start=1000):
    docs, nxt = [], start
    for n in lengths:
        docs.append(Document(np.arange(nxt, nxt + n), np.r_[False, np.ones(n - 1, bool)]))
        nxt += n
    return docs


@pytest.mark.parametrize("lookahead", [1, 8, 64])
def test_every_token_exactly_once_and_boundaries(lookahead):
    rng = np.random.default_rng(0)
    docs = make_docs(rng.integers(5, 60, size=300))
    stats = PackingStats()
    rows = list(pack_documents(docs, seq_len=128, pad_id=0, lookahead=lookahead, stats=stats))
    seen = np.concatenate([r.input_ids[r.input_ids != 0] for r in rows])
    expected = np.concatenate([d.input_ids for d in docs])
    assert sorted(seen.tolist()) == sorted(expected.tolist())  # each token once (ids are unique)
    by_first = {int(d.input_ids[0]): d for d in docs}
    for r in rows:
        assert r.input_ids.shape == (128,) and sum(r.doc_lens) == 128
        start = 0
        for n in r.doc_lens:
            seg = r.input_ids[start:start + n]
            assert (r.positions[start:start + n] == np.arange(n)).all()
            if seg[0] != 0:  # a real document, copied whole and contiguous
                doc = by_first[int(seg[0])]
                assert np.array_equal(seg, doc.input_ids)
                assert np.array_equal(r.labels[start:start + n], doc.labels())  # no label crosses a boundary
            else:
                assert (r.labels[start:start + n] == IGNORE_INDEX).all()
            start += n
    assert stats.documents == 300 and stats.rows == len(rows)
    assert stats.real_tokens == expected.size


def test_best_fit_beats_greedy_on_shapes_like_lengths():
    rng = np.random.default_rng(1)
    docs = make_docs(rng.integers(72, 86, size=3000))
    greedy, best = PackingStats(), PackingStats()
    list(pack_documents(docs, 1024, 0, lookahead=1, stats=greedy))
    list(pack_documents(docs, 1024, 0, lookahead=64, stats=best))
    assert best.real_fraction > greedy.real_fraction
    assert best.real_fraction >= 0.98


def test_overflow_split_and_reject_are_counted():
    docs = make_docs([10, 300, 20])
    split = PackingStats()
    rows = list(pack_documents(docs, 128, 0, overflow="split", stats=split))
    assert split.split_documents == 1 and split.real_tokens == 330
    assert sum(int((r.input_ids != 0).sum()) for r in rows) == 330
    rej = PackingStats()
    rows = list(pack_documents(docs, 128, 0, overflow="reject", stats=rej))
    assert rej.rejected_documents == 1 and rej.rejected_lengths == [300] and rej.real_tokens == 30


def test_bad_arguments():
    with pytest.raises(ValueError, match="overflow"):
        list(pack_documents(make_docs([3]), 16, 0, overflow="drop"))
    with pytest.raises(ValueError, match="seq_len"):
        list(pack_documents(make_docs([3]), 1, 0))


def test_to_tensors_pads_doc_lens():
    rows = list(pack_documents(make_docs([5, 6]), 16, 0))
    t = rows[0].to_tensors(max_docs=4)
    assert t["doc_lens"].tolist() == [6, 5, 5, 0] or t["doc_lens"].sum() == 16
    with pytest.raises(ValueError, match="max_docs"):
        rows[0].to_tensors(max_docs=1)


def test_chunks_and_documents_without_a_loss_token_are_left_out_and_counted():
    # A caption document under loss_on=completion: a 300-token prompt (no loss) then a 20-token completion,
    # split at 128 -> two all-prompt chunks and one chunk holding the completion; plus an all-prompt document.
    prompt_then_answer = Document(np.arange(1000, 1320), np.r_[np.zeros(300, bool), np.ones(20, bool)])
    all_prompt = Document(np.arange(2000, 2010), np.zeros(10, bool))
    plain = make_docs([30], start=3000)[0]
    stats = PackingStats()
    rows = list(pack_documents([prompt_then_answer, all_prompt, plain], 128, 0, overflow="split", stats=stats))
    assert stats.no_loss_documents == 3 and stats.split_documents == 1
    assert all((r.labels != IGNORE_INDEX).any() for r in rows)  # no row without a loss token
    kept = np.concatenate([r.input_ids[r.input_ids != 0] for r in rows])
    assert sorted(kept.tolist()) == list(range(1256, 1320)) + list(range(3000, 3030))
    labels = np.concatenate([r.labels for r in rows])
    assert sorted(labels[labels != IGNORE_INDEX].tolist()) == list(range(1300, 1320)) + list(range(3001, 3030))
    # whole documents without loss tokens only: nothing to pack, everything counted
    none = PackingStats()
    assert list(pack_documents([all_prompt, all_prompt], 128, 0, stats=none)) == []
    assert none.no_loss_documents == 2 and none.rows == 0
