"""Captioning accuracy: caption test images, parse the captions with the grammar, score the scene.

Exact match and per-attribute accuracy (shape, colour, count, relation) per category, with the
rules of :func:`chameleon_lite.eval.scoring.score_caption`.
"""

from __future__ import annotations

from tqdm.auto import tqdm

from chameleon_lite.data.shapes import ShapesWorld
from chameleon_lite.eval.scoring import aggregate, score_caption


def run_captioning(gen, world: ShapesWorld, n_images: int, temperature: float, seed: int,
                   cfg_scale: float | None = None, batch_size: int = 32, candidates: int = 1,
                   candidate_temperature: float = 1.0) -> tuple[dict, list, list]:
    """``candidates``: rerank that many captions per image by log p(image | caption) (`Generator.caption`)."""
    records, examples = [], []
    samples = [world[i] for i in range(n_images)]
    for start in tqdm(range(0, n_images, batch_size), desc="captioning", unit="batch"):
        chunk = samples[start:start + batch_size]
        captions = gen.caption([s.image for s in chunk], temperature=temperature, seed=seed + start,
                               cfg_scale=cfg_scale, candidates=candidates,
                               candidate_temperature=candidate_temperature)
        for sample, caption in zip(chunk, captions):
            score = score_caption(caption, sample)
            records.append({"truth": sample.caption, "caption": caption, "category": sample.category,
                            "heldout": sample.heldout, **{k: v for k, v in score.items() if isinstance(v, bool)}})
            examples.append((sample.image, f"{'OK' if score['exact'] else 'X'} {caption}"))
    return aggregate(records, key="category"), records, examples
