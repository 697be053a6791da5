"""Captioning accuracy: caption test images, parse the captions with the grammar, score the scene.

Exact match and per-attribute accuracy (shape, colour, count, relation) per category, with the
rules of :func:`chameleon_lite.eval.scoring.score_caption`. Optionally the sampled captions are
the start of a noisy-channel scene search (:mod:`chameleon_lite.eval.scene_search`).
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from chameleon_lite.data.shapes import (
    CaptionParseError,
    ShapesWorld,
    canonical_caption,
    noun_phrase_scene,
    parse_caption,
)
from chameleon_lite.eval.scene_search import search_scenes
from chameleon_lite.eval.scoring import CLUSTER_OF_TASK, aggregate, score_caption

log = logging.getLogger(__name__)


#: The scene search's weight on log p(caption | image), chosen on the val split with its held-out pair
#: (0 / 0.25 / 0.5 / 1: caption exact 0.537 / 0.7479 / 0.7482 / 0.739, README Results, session 11).
SEARCH_CAPTION_WEIGHT = 0.5


def run_captioning(gen, world: ShapesWorld, n_images: int, temperature: float, seed: int,
                   cfg_scale: float | None = None, batch_size: int = 32, candidates: int = 1,
                   candidate_temperature: float = 1.0, search_rounds: int = 0,
                   search_caption_weight: float = SEARCH_CAPTION_WEIGHT) -> tuple[dict, list, list]:
    """``candidates``: rerank that many captions per image by log p(image | caption) (`Generator.caption`).
    ``search_rounds`` > 0: then search the scene space from each caption (`search_captions`)."""
    samples = [world[i] for i in range(n_images)]
    sampled = []
    for start in tqdm(range(0, n_images, batch_size), desc="captioning", unit="batch"):
        chunk = samples[start:start + batch_size]
        sampled += gen.caption([s.image for s in chunk], temperature=temperature, seed=seed + start,
                               cfg_scale=cfg_scale, candidates=candidates,
                               candidate_temperature=candidate_temperature)
    captions = sampled
    if search_rounds:
        captions = search_captions(gen, [s.image for s in samples], sampled, search_rounds, search_caption_weight)
    records, examples = [], []
    for sample, caption, first in zip(samples, captions, sampled):
        score = score_caption(caption, sample)
        records.append({"truth": sample.caption, "caption": caption, "category": sample.category,
                        "heldout": sample.heldout, **{k: v for k, v in score.items() if isinstance(v, bool)}})
        if search_rounds:
            records[-1]["sampled"] = first
        examples.append((sample.image, f"{'OK' if score['exact'] else 'X'} {caption}"))
    return aggregate(records, key="category", cluster=CLUSTER_OF_TASK["caption"]), records, examples


def search_captions(gen, images, captions: list[str], rounds: int, caption_weight: float = SEARCH_CAPTION_WEIGHT,
                    batch_size: int = 256) -> list[str]:
    """Per image, the canonical caption of the scene found by `search_scenes` from its parsed caption,
    scored by log p(image | caption) + ``caption_weight`` * log p(caption | image) under the model
    (the first term alone composes unseen colour-shape pairs but barely counts; the second is the
    captioner's own score). A caption outside the grammar starts from the scene of its noun phrases
    (`noun_phrase_scene`); one naming none is kept as it is (counted in the log)."""
    if rounds < 0 or caption_weight < 0:
        raise ValueError(f"scene search needs rounds >= 0 and caption_weight >= 0, got {rounds}, {caption_weight}")
    codes = torch.cat([gen.tok.encode_images(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    starts = [_start(caption) for caption in captions]
    if unread := sum(not s for s in starts):
        log.info("scene search: %d of %d captions name no scene and stay as sampled", unread, len(starts))

    def score(pairs):
        texts = [canonical_caption(spec) for _, spec in pairs]
        rows = codes[torch.tensor([i for i, _ in pairs])]
        total = gen.image_log_likelihood(texts, rows)
        if caption_weight:
            total = total + caption_weight * gen.prompt_log_likelihood(texts, rows)
        return total.tolist()

    with tqdm(total=rounds, desc="scene search", unit="round") as bar:
        specs, _ = search_scenes(starts, score, rounds=rounds, progress=lambda _: bar.update())
    return [caption if spec is None else canonical_caption(spec) for spec, caption in zip(specs, captions)]


def _start(caption: str) -> list:
    """The caption's scene; off-grammar ("a red circle and a red circle"), the scene of its noun phrases."""
    try:
        return [parse_caption(caption)]
    except CaptionParseError:
        scene = noun_phrase_scene(caption)
        return [] if scene is None else [scene]
