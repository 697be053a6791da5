"""Best-of-N reranking by the model's own likelihood (Generator.log_likelihood and its two uses)."""

import pytest
import torch

from chameleon_lite.data.sequences import IGNORE_INDEX
from chameleon_lite.model import lm_loss

pytestmark = pytest.mark.slow

PROMPTS = ["a red circle", "a green square left of a blue triangle"]


@pytest.fixture
def gen(tiny_generator):
    return tiny_generator


def test_log_likelihood_is_the_training_loss_of_the_completion_and_ignores_padding(gen):
    codes = gen.generate_image_codes(PROMPTS[:1], n=1, seed=0)[0]
    doc = gen.builder.text_to_image(PROMPTS[1], codes)  # <bos> text <boi> codes <eoi> <eos>
    n_prompt = len(gen.builder.t2i_prompt(PROMPTS[1]))
    ids = torch.as_tensor(doc.input_ids)[None]
    labels = torch.as_tensor(doc.labels())[None].clone()
    labels[0, : n_prompt - 1] = IGNORE_INDEX  # count the codes, <eoi> and <eos> only
    with torch.inference_mode():
        expected = -lm_loss(gen.model(ids), labels, 0.0, IGNORE_INDEX).token_ce.sum()
    prompt, completion = ids[0, :n_prompt].tolist(), ids[0, n_prompt:].tolist()
    alone = gen.log_likelihood([prompt], [completion])
    # beside a longer row, this one is right-padded: same value
    batched = gen.log_likelihood([prompt, [*prompt, *completion[:5]]], [completion, completion])
    assert alone.shape == (1,) and float(alone) < 0
    torch.testing.assert_close(alone[0], expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(batched[0], alone[0], rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        gen.log_likelihood([prompt, prompt], [completion])


def test_image_candidates_keep_the_images_that_best_explain_the_prompt(gen):
    n, candidates = 2, 3
    pool = gen.generate_image_codes(PROMPTS, n=n * candidates, seed=5)  # the draws reranking chooses from
    kept = gen.generate_image_codes(PROMPTS, n=n, seed=5, candidates=candidates)
    assert kept.shape == (len(PROMPTS) * n, *pool.shape[1:])
    scores = gen.prompt_log_likelihood([p for p in PROMPTS for _ in range(n * candidates)], pool)
    for i in range(len(PROMPTS)):
        block = slice(i * n * candidates, (i + 1) * n * candidates)
        best = sorted(scores[block].topk(n).indices.tolist())
        assert torch.equal(kept[i * n:(i + 1) * n], pool[block][best])
    plain = gen.generate_image_codes(PROMPTS, n=n, seed=5)
    assert torch.equal(gen.generate_image_codes(PROMPTS, n=n, seed=5, candidates=1), plain)
    images = gen.generate_images(PROMPTS, n=n, seed=5, candidates=candidates)
    assert torch.equal(images, gen.tok.decode_images(kept))


def test_a_custom_reranker_chooses_and_a_wrong_shaped_one_is_a_clear_error(gen):
    n, candidates = 2, 3
    pool = gen.generate_image_codes(PROMPTS, n=n * candidates, seed=5)
    seen = []

    def by_first_code(prompt_index, codes):  # any deterministic score of the codes
        seen.append(list(prompt_index))
        return codes[:, 0].float()

    kept = gen.generate_image_codes(PROMPTS, n=n, seed=5, candidates=candidates, rerank=by_first_code)
    assert seen == [[0] * 6 + [1] * 6]
    for i in range(len(PROMPTS)):
        block = pool[i * n * candidates:(i + 1) * n * candidates]
        best = sorted(block[:, 0].float().topk(n).indices.tolist())
        assert torch.equal(kept[i * n:(i + 1) * n], block[best])
    with pytest.raises(ValueError, match="one score per candidate"):
        gen.generate_image_codes(PROMPTS, n=n, seed=5, candidates=candidates, rerank=lambda i, c: torch.zeros(2))


def test_scene_reranker_is_the_posterior_of_the_prompt_scene_among_its_neighbours(gen):
    from chameleon_lite.data.shapes import canonical_caption, parse_caption
    from chameleon_lite.eval.geneval import scene_reranker
    from chameleon_lite.eval.scene_search import neighbours

    specs = [parse_caption(p) for p in PROMPTS]
    codes = gen.generate_image_codes(PROMPTS, n=2, seed=3)
    index = [0, 0, 1, 1]
    scores = scene_reranker(gen, specs)(index, codes)
    assert scores.shape == (4,) and bool((scores <= 0).all())
    for row, i in enumerate(index):
        scenes = [specs[i], *neighbours(specs[i], ("kind",))]
        assert len(scenes) == (9 if i == 0 else 17)  # 5 colours + 3 shapes per object kind, and the scene
        ll = gen.image_log_likelihood([canonical_caption(s) for s in scenes], codes[row:row + 1].expand(len(scenes), -1))
        torch.testing.assert_close(scores[row], ll[0] - ll.logsumexp(0), rtol=1e-4, atol=1e-4)
        # the posteriors of the whole neighbourhood sum to one: a classifier, not a likelihood
        assert abs(float((ll - ll.logsumexp(0)).exp().sum()) - 1) < 1e-4


def test_caption_candidates_never_explain_the_image_worse_than_the_greedy_caption(gen):
    images = gen.generate_images(PROMPTS, n=2, seed=1)
    codes = gen.tok.encode_images(images)
    greedy = gen.caption(images)
    reranked = gen.caption(images, candidates=6, candidate_temperature=1.0)
    assert len(reranked) == len(greedy) == 4
    before, after = gen.image_log_likelihood(greedy, codes), gen.image_log_likelihood(reranked, codes)
    assert bool((after >= before - 1e-4).all())
    assert bool((after > before + 1e-3).any()), "six candidates all tied with greedy"
    assert gen.caption(images, candidates=1) == greedy


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_candidates_are_a_clear_error(gen, bad):
    with pytest.raises(ValueError, match="candidates"):
        gen.generate_images(PROMPTS[:1], candidates=bad)
    with pytest.raises(ValueError, match="candidates"):
        gen.caption(torch.zeros(1, 3, 64, 64), candidates=bad)


def test_a_model_trained_with_xformers_samples_and_scores_with_sdpa(gen, tiny_checkpoint, tmp_path):
    # xformers is a CUDA training backend: a model trained with it must still rank candidates on CPU
    # (the scoring forward has no KV cache, so it would otherwise take the xformers path and fail)
    import dataclasses
    import json

    from safetensors.torch import save_file

    from chameleon_lite.generation.api import Generator

    out = tmp_path / "xformers_model"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in gen.model.state_dict().items()}, str(out / "model.safetensors"))
    meta = {"model": dataclasses.asdict(dataclasses.replace(gen.model.cfg, attn_impl="xformers")),
            "vocab": gen.vocab.to_dict(), "tokenizer_dir": gen.meta["tokenizer_dir"]}
    (out / "config.json").write_text(json.dumps(meta))
    xf = Generator.load(out)
    assert xf.model.cfg.attn_impl == "sdpa"
    prompt, completion = gen.builder.t2i_prompt(PROMPTS[0]), [gen.vocab.image_offset + 3] * 4
    torch.testing.assert_close(xf.log_likelihood([prompt], [completion]), gen.log_likelihood([prompt], [completion]))
    codes = xf.generate_image_codes(PROMPTS[:1], n=1, seed=0, candidates=2)
    assert codes.shape[0] == 1
