"""Shapes-GenEval: generate images for test-split prompts, read them back with the detector, score.

GenEval's protocol (Ghosh et al. 2023) on the shapes world: K images per prompt, each judged
correct when the detector finds exactly the objects the prompt names (colour, shape, count, no
extras) and the stated relation holds; accuracy per category, overall = mean over categories.
Prompts containing a held-out colour-shape pair are also reported on their own.

``negative_scale`` > 0 guides each image away from one of its prompt's neighbouring scenes (one edit
away: another colour, shape or count of one object kind, another relation; `scene_search.neighbours`),
taken in turn: for "a red triangle" the images see "a blue triangle", "a red square", ... as negative
prompts, so guidance pushes towards what only the prompt says.

Best-of-N (``candidates`` > 1) keeps the images the model itself rates best: ``rerank="caption"`` by
log p(prompt | image), the captioning direction; ``rerank="scene"`` by the posterior of the prompt's scene
against its one-edit neighbours under the image direction (`scene_reranker`). The detector never chooses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from chameleon_lite.data.shapes import SceneSpec, ShapesWorld, canonical_caption, detect_objects
from chameleon_lite.eval.scene_search import EDITS, neighbours
from chameleon_lite.eval.scoring import CLUSTER_OF_TASK, aggregate, score_generated_image
from chameleon_lite.generation.api import RerankFn


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def describe_detections(image: torch.Tensor, limit: int = 6) -> str:
    """The detector's reading in words, e.g. "red circle, blue square" (at most ``limit`` objects named)."""
    objs = detect_objects(image)
    words = [f"{o.colour} {o.shape}" for o in objs[:limit]]
    if len(objs) > limit:
        words.append(f"... ({len(objs)} objects)")
    return ", ".join(words) or "nothing"


#: How best-of-N candidates are ranked (module docstring).
RERANKS = ("caption", "scene")


def scene_reranker(gen, specs: Sequence[SceneSpec], edits: Sequence[str] = ("kind",)) -> RerankFn:
    """Score candidate images by how well they tell their prompt's scene from its neighbours.

    For an image drawn for scene s: log p(image | c(s)) - logsumexp over s' in {s} + neighbours(s, edits) of
    log p(image | c(s')), with c the canonical caption: the posterior of s under a uniform prior over that
    neighbourhood, a generative classifier in the image direction (the one that composes unseen colour-shape
    pairs; `scene_search`). Unlike log p(prompt | image) it carries no text prior of its own: an image of "a
    red triangle" is not marked down because "red" was never followed by "triangle" in training text.
    ``specs[i]``: the scene of prompt i. Costs 1 + len(neighbours) teacher-forced passes per candidate
    (``edits=("kind",)``: 9 for one object kind, 17 for two)."""
    def score(prompt_index: Sequence[int], codes: torch.Tensor) -> torch.Tensor:
        texts, rows, sizes = [], [], []
        for row, i in enumerate(prompt_index):
            scenes = [specs[i], *neighbours(specs[i], edits)]
            texts += [canonical_caption(scene) for scene in scenes]
            rows += [row] * len(scenes)
            sizes.append(len(scenes))
        loglik = gen.image_log_likelihood(texts, codes[torch.tensor(rows)])
        return torch.stack([group[0] - group.logsumexp(0) for group in loglik.split(sizes)])

    return score


def run_geneval(gen, world: ShapesWorld, n_prompts: int, images_per_prompt: int, cfg_scale: float | None,
                temperature: float, top_k: int, seed: int, batch_prompts: int = 4,
                candidates: int = 1, negative_scale: float = 0.0,
                negative_edits: Sequence[str] = EDITS, rerank: str = "caption",
                rerank_edits: Sequence[str] = ("kind",)) -> tuple[dict, list, list]:
    """Returns (summary, records, examples) where examples are (image, title) pairs for the grid.
    ``candidates``: best ``images_per_prompt`` of ``images_per_prompt * candidates`` by the model's own
    judgement, ``rerank`` (`RERANKS`, module docstring; ``rerank_edits``: the neighbours of ``scene``); the
    detector never chooses. ``negative_scale``: the weight of the neighbour-scene negatives (module docstring),
    ``negative_edits`` the kinds of edit that make them (`scene_search.EDITS`); 0 = plain classifier-free
    guidance."""
    if rerank not in RERANKS:
        raise ValueError(f"rerank={rerank!r} is not one of {', '.join(RERANKS)}")
    records, examples = [], []
    samples = [world[i] for i in range(n_prompts)]
    # Sampling seeds: `generate_images` seeds each batch with seed + its first row, so a chunk's base seed moves
    # by the rows drawn per prompt: every batch of the run gets its own seed (seed + start once gave 404 pairs of
    # different prompts the same noise stream at the defaults).
    rows = images_per_prompt * candidates
    for start in tqdm(range(0, n_prompts, batch_prompts), desc="geneval", unit="prompts"):
        chunk = samples[start:start + batch_prompts]
        negatives = None
        if negative_scale > 0:
            negatives = [[canonical_caption(n) for n in neighbours(s.spec, negative_edits) or [s.spec]]
                         for s in chunk]
        reranker = scene_reranker(gen, [s.spec for s in chunk], rerank_edits) if rerank == "scene" else None
        images = to_uint8(gen.generate_images([s.caption for s in chunk], n=images_per_prompt, cfg_scale=cfg_scale,
                                              temperature=temperature, top_k=top_k, seed=seed + start * rows,
                                              candidates=candidates, negative_prompts=negatives,
                                              negative_scale=negative_scale, rerank=reranker))
        for k, image in enumerate(images):
            sample = chunk[k // images_per_prompt]
            score = score_generated_image(image, sample.spec)
            records.append({"prompt": sample.caption, "category": sample.category, "heldout": sample.heldout,
                            "correct": bool(score["correct"]), "reading": describe_detections(image)})
            examples.append((image, f"{'OK' if score['correct'] else 'X'} {sample.caption}\nsaw: {records[-1]['reading']}"))
    return aggregate(records, key="category", cluster=CLUSTER_OF_TASK["geneval"]), records, examples
