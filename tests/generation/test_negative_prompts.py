"""Negative prompts through the Generator: texts per prompt, taken in turn by its images."""

import pytest
import torch

from chameleon_lite.generation import SamplingConfig

pytestmark = pytest.mark.slow

PROMPTS = ["a red circle", "two blue squares"]


def test_each_image_is_guided_away_from_its_prompts_next_negative(tiny_generator):
    """Prompt 0's four images take its two negatives in turn; prompt 1's all take its one text. The result is
    the sampler's negative guidance on exactly those rows."""
    gen = tiny_generator
    negative_prompts = [["a blue circle", "a red square"], "a green square"]
    codes = gen.generate_image_codes(PROMPTS, n=4, seed=3, negative_prompts=negative_prompts, negative_scale=40.0)
    per_image = ["a blue circle", "a red square"] * 2 + ["a green square"] * 4
    cfg = SamplingConfig(max_new_tokens=gen.tok.tokens_per_image + 1, image_temperature=0.6, cfg_scale=2.0,
                         negative_scale=40.0, stop_ids=(gen.vocab.eoi_id,), seed=3)
    out = gen.sampler.generate([gen.builder.t2i_prompt(p) for p in PROMPTS for _ in range(4)], cfg,
                               [gen.builder.t2i_prompt(t) for t in per_image])
    expected = torch.stack([gen.vocab.ids_to_image(torch.tensor(o[:-1])) for o in out])
    assert torch.equal(codes, expected)
    plain = gen.generate_image_codes(PROMPTS, n=4, seed=3)
    assert not torch.equal(codes, plain)  # (the 20-step model barely reads its prompt: a large scale)
    same = gen.generate_image_codes(PROMPTS, n=4, seed=3, negative_prompts=negative_prompts, negative_scale=0.0)
    assert torch.equal(same, plain)  # + 0 * (c - n) is exact


@pytest.mark.parametrize(("negative_prompts", "match"), [
    ("a blue circle", "one entry per prompt"),
    (["a blue circle"], r"one entry per prompt \(2\)"),
    (["a blue circle", []], r"negative_prompts\[1\]"),
    (["a blue circle", [3]], r"negative_prompts\[1\]"),
])
def test_bad_negative_prompts_name_the_entry(tiny_generator, negative_prompts, match):
    gen = tiny_generator
    with pytest.raises(ValueError, match=match):
        gen.generate_images(PROMPTS, negative_prompts=negative_prompts)


def test_negative_prompts_need_classifier_free_guidance(tiny_generator):
    gen = tiny_generator
    with pytest.raises(ValueError, match="negative_scale needs cfg_scale"):
        gen.generate_images(PROMPTS, cfg_scale=None, negative_prompts=["a", "b"])


def test_one_string_as_prompts_is_refused_not_read_per_character(tiny_generator):
    with pytest.raises(TypeError, match=r"one string: pass a list of prompts, e.g. \['a red circle'\]"):
        tiny_generator.generate_images("a red circle")
    for kwargs, match in (({"prompts": []}, "prompts is empty"), ({"prompts": ["a"], "n": 0}, r"n=0 must be an int"),
                          ({"prompts": ["a"], "batch_size": 0}, r"batch_size=0 must be an int")):
        with pytest.raises(ValueError, match=match):  # not torch.stack's "expects a non-empty TensorList"
            tiny_generator.generate_images(**kwargs)
