"""GenEval's sampling seeds: every batch the run draws has its own noise stream."""

from __future__ import annotations

from collections import Counter

from chameleon_lite.data.shapes import ShapesWorld
from chameleon_lite.eval.geneval import run_geneval


def test_no_two_batches_of_a_geneval_run_share_a_seed(tiny_generator, monkeypatch):
    gen = tiny_generator
    vocab, n_codes = gen.vocab, gen.tok.tokens_per_image
    seeds = []

    def fake_generate(prompts, cfg, negatives=None):  # the sampler's contract, without the model
        seeds.append(cfg.seed)
        return [list(range(vocab.image_offset, vocab.image_offset + n_codes)) + [vocab.eoi_id] for _ in prompts]

    monkeypatch.setattr(gen.sampler, "generate", fake_generate)
    world = ShapesWorld(seed=0, image_size=gen.tok.image.config.image_size, split="test", length=24)
    # 6 chunks of 4 prompts x 4 images x 2 candidates = 32 rows = 2 batches of 16 each; with seed + chunk start,
    # chunk 4's first batch (seed + 16) drew chunk 0's second batch's noise
    run_geneval(gen, world, n_prompts=24, images_per_prompt=4, cfg_scale=2.0, temperature=0.6, top_k=0, seed=7,
                batch_prompts=4, candidates=2)
    assert len(seeds) == 12
    assert not [s for s, n in Counter(seeds).items() if n > 1]
