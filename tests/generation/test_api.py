"""Generator.interleaved and split_segments on tiny untrained models (tests/conftest.py)."""

from __future__ import annotations

import logging

import pytest
import torch

from chameleon_lite.generation.api import INTERLEAVED_TEXT_TOKENS

PROMPT = "two green squares"


def _comparable(segments):
    return [(s.kind, s.text if s.kind == "text" else s.image.numpy().tobytes()) for s in segments]


def test_interleaved_default_budget_holds_an_image_and_a_smaller_one_warns(image_first_generator, caplog):
    gen = image_first_generator
    n = gen.tok.tokens_per_image
    with caplog.at_level(logging.WARNING, logger="chameleon_lite.generation.api"):
        segments = gen.interleaved(PROMPT, seed=1)
    assert [s.kind for s in segments] == ["image"] and segments[0].image.shape == (3, 64, 64)
    assert not caplog.records

    with caplog.at_level(logging.WARNING, logger="chameleon_lite.generation.api"):
        cut = gen.interleaved(PROMPT, max_new_tokens=n, seed=1)
    assert _comparable(cut) == [("text", f"[incomplete image: {n - 1}/{n} codes]")]
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert f"max_new_tokens={n} cannot hold one image" in message and f"max_new_tokens >= {n + 2}" in message
    assert str(INTERLEAVED_TEXT_TOKENS) in message

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="chameleon_lite.generation.api"):
        gen.interleaved(PROMPT, max_new_tokens=n + 2, seed=1)
    assert not caplog.records


def test_split_segments_drops_text_that_decodes_to_nothing(image_first_generator):
    gen = image_first_generator
    v, n = gen.vocab, gen.tok.tokens_per_image
    image = [v.boi_id, *v.image_to_ids(torch.arange(n) % v.n_image).tolist(), v.eoi_id]
    words = gen.builder.text_ids("a red circle")
    segments = gen.split_segments([*words, *image, v.sep_id, *image, v.eos_id])
    assert [s.kind for s in segments] == ["text", "image", "image"]
    assert segments[0].text == "a red circle"
    assert gen.split_segments([v.eos_id]) == []
    # the drawn document <boi> codes <eoi> <eos>: its <eos> is no trailing "" segment
    assert [s.kind for s in gen.interleaved(PROMPT)] == ["image"]


@pytest.mark.parametrize("filter_", [{"top_k": 1}, {"top_p": 1e-6}])
def test_interleaved_top_k_and_top_p_filter_each_modality(image_first_generator, random_generator, filter_):
    """A filter that keeps only the best id draws the greedy tokens at temperature 1, whatever the seed;
    unfiltered, the seeds draw other images (image-first model) and other text (random model)."""
    image_filter = {f"image_{k}": value for k, value in filter_.items()}
    gen = image_first_generator
    greedy = _comparable(gen.interleaved(PROMPT, image_temperature=0.0))
    for seed in (0, 1):
        filtered = gen.interleaved(PROMPT, image_temperature=1.0, seed=seed, **image_filter)
        assert _comparable(filtered) == greedy
    assert _comparable(gen.interleaved(PROMPT, image_temperature=1.0, seed=0)) != greedy

    text_filter = {f"text_{k}": value for k, value in filter_.items()}
    gen, budget = random_generator, {"max_new_tokens": 16, "image_temperature": 0.0}
    greedy = _comparable(gen.interleaved(PROMPT, text_temperature=0.0, **budget))
    for seed in (0, 1):
        filtered = gen.interleaved(PROMPT, text_temperature=1.0, seed=seed, **text_filter, **budget)
        assert _comparable(filtered) == greedy
    assert _comparable(gen.interleaved(PROMPT, text_temperature=1.0, **budget)) != greedy
