import numpy as np
import pytest
import torch

from chameleon_lite.data.sequences import IGNORE_INDEX, ImageSegment, SequenceBuilder, TextSegment
from chameleon_lite.vocab import UnifiedVocab

VOCAB = UnifiedVocab(n_text=50, n_image=16, n_reserved=2)


def fake_encode(text: str) -> list[int]:
    return [ord(c) % 50 for c in text]


@pytest.fixture
def builder():
    return SequenceBuilder(VOCAB, fake_encode)


def test_text_to_image_layout(builder):
    codes = torch.arange(4)
    doc = builder.text_to_image("ab", codes)
    ids = doc.input_ids.tolist()
    v = VOCAB
    assert ids == [v.bos_id, *v.text_to_ids(fake_encode("ab")), v.boi_id, *v.image_to_ids([0, 1, 2, 3]), v.eoi_id, v.eos_id]
    assert not doc.loss_mask[0] and doc.loss_mask[1:].all()


def test_image_to_text_layout_and_completion_mask():
    b = SequenceBuilder(VOCAB, fake_encode, loss_on="completion")
    doc = b.image_to_text(torch.tensor([[1, 2], [3, 4]]), "xy")
    v = VOCAB
    assert doc.input_ids.tolist()[:7] == [v.bos_id, v.boi_id, *v.image_to_ids([1, 2, 3, 4]), v.eoi_id]
    # only the caption and <eos> are targets
    assert doc.loss_mask.tolist() == [False] * 7 + [True, True, True]
    labels = doc.labels()
    assert labels[-1] == IGNORE_INDEX and (labels[:6] == IGNORE_INDEX).all()
    assert labels[6] == doc.input_ids[7]


def test_no_prompt_text_trains_images_everywhere_and_captions_after_their_image():
    b = SequenceBuilder(VOCAB, fake_encode, loss_on="no_prompt_text")
    t2i = b.text_to_image("ab", torch.arange(4))
    # <bos> and the prompt text are context; <boi> codes <eoi> <eos> are targets
    assert t2i.loss_mask.tolist() == [False] * 3 + [True] * 7
    i2t = b.image_to_text(torch.arange(4), "xy")
    # the image of a captioning document stays a target (the unconditional image model of CFG)
    assert i2t.loss_mask.tolist() == [False] + [True] * 9
    assert (i2t.loss_mask == SequenceBuilder(VOCAB, fake_encode).image_to_text(torch.arange(4), "xy").loss_mask).all()


@pytest.mark.parametrize("loss_on", ["all", "completion", "no_prompt_text"])
def test_a_pair_makes_each_task_s_document_and_uncond_is_cfg_s_unconditional_row(loss_on):
    """``uncond`` drops the caption: <bos> <boi> codes <eoi> <eos>, the image a target under every loss_on, its
    prefix the sampler's unconditional row; under completion it is the only document that trains p(image)."""
    b = SequenceBuilder(VOCAB, fake_encode, loss_on=loss_on)
    codes = torch.arange(4)
    assert b.pair_document("t2i", "ab", codes).input_ids.tolist() == b.text_to_image("ab", codes).input_ids.tolist()
    caption = b.pair_document("caption", "xy", codes)
    assert caption.loss_mask.tolist() == b.image_to_text(codes, "xy").loss_mask.tolist()
    uncond = b.pair_document("uncond", "ab", codes)
    v = VOCAB
    assert uncond.input_ids.tolist() == [v.bos_id, v.boi_id, *v.image_to_ids([0, 1, 2, 3]), v.eoi_id, v.eos_id]
    assert uncond.input_ids.tolist()[:2] == b.unconditional_image_prompt()
    assert uncond.loss_mask.tolist() == [False] + [True] * 7
    images_trained = caption.loss_mask[1:7].all()
    assert images_trained == (loss_on != "completion")
    with pytest.raises(ValueError, match="'i2i' is not one of t2i, caption, uncond"):
        b.pair_document("i2i", "ab", codes)


def test_interleaved_any_order(builder):
    segs = [ImageSegment(torch.tensor([5])), TextSegment("a"), ImageSegment(torch.tensor([6, 7])), TextSegment("b")]
    doc = builder.document(segs)
    ids = doc.input_ids
    assert int(VOCAB.is_image_id(torch.from_numpy(ids)).sum()) == 3
    assert (ids == VOCAB.boi_id).sum() == 2 and (ids == VOCAB.eoi_id).sum() == 2
    assert builder.interleaved_prompt(segs) == ids[:-1].tolist()


def test_prompts(builder):
    v = VOCAB
    assert builder.t2i_prompt("a")[-1] == v.boi_id and builder.t2i_prompt("a")[0] == v.bos_id
    assert builder.unconditional_image_prompt() == [v.bos_id, v.boi_id]
    assert builder.caption_prompt(torch.tensor([1, 2]))[-1] == v.eoi_id


def test_errors(builder):
    with pytest.raises(ValueError, match="at least one segment"):
        builder.document([])
    with pytest.raises(ValueError, match="no loss tokens"):
        SequenceBuilder(VOCAB, fake_encode, loss_on="completion").document([TextSegment("a")], n_prompt_segments=1)
    with pytest.raises(ValueError, match="loss_on"):
        SequenceBuilder(VOCAB, fake_encode, loss_on="some")
    with pytest.raises(ValueError, match="out of range"):
        builder.text_to_image("a", torch.tensor([16]))
    with pytest.raises(TypeError, match="segment type"):
        builder.document(["raw string"])


def test_labels_shift():
    b = SequenceBuilder(VOCAB, fake_encode)
    doc = b.document([TextSegment("abc")])
    labels = doc.labels()
    np.testing.assert_array_equal(labels[:-1], doc.input_ids[1:])
    assert labels[-1] == IGNORE_INDEX
