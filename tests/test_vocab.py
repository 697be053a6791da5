import json

import pytest
import torch

from chameleon_lite.vocab import UnifiedVocab, VocabError, VocabMismatchError


@pytest.fixture
def vocab():
    return UnifiedVocab(n_text=300, n_image=512, n_reserved=4)


def test_layout_blocks_are_contiguous_and_padded(vocab):
    assert vocab.n_special == 6 + 4
    assert vocab.text_offset == 10 and vocab.image_offset == 310
    assert vocab.size % 64 == 0 and vocab.size >= 310 + 512
    assert len({vocab.pad_id, vocab.bos_id, vocab.eos_id, vocab.boi_id, vocab.eoi_id, vocab.sep_id}) == 6
    assert vocab.special_id("<boi>") == vocab.boi_id
    with pytest.raises(VocabError, match="unknown special"):
        vocab.special_id("<nope>")


def test_text_and_image_round_trips(vocab):
    pieces = [0, 1, 299]
    ids = vocab.text_to_ids(pieces)
    assert ids == [10, 11, 309] and vocab.ids_to_text(ids) == pieces
    codes = torch.tensor([[0, 5], [511, 7]])
    img_ids = vocab.image_to_ids(codes)
    assert torch.equal(vocab.ids_to_image(img_ids), codes)
    assert bool(vocab.is_image_id(img_ids).all()) and not bool(vocab.is_text_id(img_ids).any())
    assert vocab.is_text_id(10) and not vocab.is_text_id(310) and vocab.is_image_id(310)
    assert vocab.is_special_id(vocab.eoi_id) and not vocab.is_special_id(10)


def test_masks_partition_the_used_ids(vocab):
    t, i = vocab.text_mask(), vocab.image_mask()
    assert t.shape == (vocab.size,) and i.shape == (vocab.size,)
    assert not bool((t & i).any())
    assert int(t.sum()) == 300 and int(i.sum()) == 512
    assert not bool(t[: vocab.n_special].any()) and not bool(i[vocab.image_offset + 512:].any())


@pytest.mark.parametrize("call, arg", [
    ("text_to_ids", [300]), ("text_to_ids", [-1]), ("image_to_ids", torch.tensor([512])),
    ("ids_to_text", [310]), ("ids_to_image", [309]), ("ids_to_image", torch.tensor([vocab_size := 10_000])),
])
def test_out_of_range_ids_raise_clear_errors(vocab, call, arg):
    with pytest.raises(VocabError, match="out of range"):
        getattr(vocab, call)(arg)


def test_check_ids_names_the_bad_ids(vocab):
    vocab.check_ids(torch.tensor([0, vocab.size - 1]))
    with pytest.raises(VocabError, match=str(vocab.size)):
        vocab.check_ids(torch.tensor([1, vocab.size]), what="row 3")


def test_json_round_trip_and_version(tmp_path, vocab):
    path = tmp_path / "vocab.json"
    vocab.save(path)
    assert UnifiedVocab.load(path) == vocab
    data = json.loads(path.read_text())
    data["format_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(VocabError, match="format_version"):
        UnifiedVocab.load(path)
    with pytest.raises(FileNotFoundError, match="chameleon-tokenizer"):
        UnifiedVocab.load(tmp_path / "missing.json")


def test_mismatch_names_both_layouts(vocab):
    other = UnifiedVocab(n_text=300, n_image=1024, n_reserved=4)
    with pytest.raises(VocabMismatchError) as err:
        vocab.check_compatible(other, "checkpoint", "tokenizers/shapes")
    assert "n_image=512" in str(err.value) and "n_image=1024" in str(err.value)
    assert "checkpoint" in str(err.value) and "tokenizers/shapes" in str(err.value)


def test_invalid_layout_arguments():
    with pytest.raises(VocabError, match="n_image"):
        UnifiedVocab(n_text=10, n_image=0)
