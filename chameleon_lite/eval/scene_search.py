"""Noisy-channel scene search: the caption whose scene best explains an image under the model.

A left-to-right captioner writes the colour before the shape, and its text prior has learnt which
pairs follow each other: for a held-out pair it never saw ("a red triangle") it reads the shape
right after any other colour word but not after the true one (README Results, session 9). The same
model scores the image under a caption, log p(image | caption), and that direction composes: the
held-out pair's caption explains its image better than its seen neighbours do.

`search_scenes` hill-climbs over shapes-world scenes: from a start scene (the parsed caption), score
every scene one edit away (`neighbours`: another colour or shape for one object kind, another
count, a relation added, removed, reversed or changed) and move to the best while it improves. The
score is the caller's; the captioning eval (`chameleon_lite.eval.captioning.search_captions`) uses
log p(image | caption) + w log p(caption | image) of the scene's canonical caption: the channel
composes but barely counts, the captioner counts but vetoes unseen pairs. The answer is a scene of the grammar, so this is captioning as
maximum-likelihood classification over the scene space (a generative classifier), not free text:
the README reports it apart from sampled captions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from chameleon_lite.data.shapes_captions import NUMBER_WORDS
from chameleon_lite.data.shapes_scene import COLOURS, RELATIONS, SHAPES, ObjectKey, Relation, SceneSpec

#: The kinds of one-edit moves `neighbours` makes: an object kind's colour or shape, its count, the relation.
EDITS = ("kind", "count", "relation")

#: (item index, scene) -> score; called with a batch of pairs, returns one float per pair.
ScoreFn = Callable[[Sequence[tuple[int, SceneSpec]]], Sequence[float]]


def _spec(entries: Sequence[tuple[str, str, int]], relation: Relation | None) -> SceneSpec | None:
    try:
        return SceneSpec(tuple(entries), relation)
    except ValueError:  # two entries of one kind, a relation between equal kinds, ...
        return None


def _rekey(key: ObjectKey, old: ObjectKey, new: ObjectKey) -> ObjectKey:
    return new if key == old else key


def neighbours(spec: SceneSpec, edits: Sequence[str] = EDITS) -> list[SceneSpec]:
    """Every valid scene one edit from ``spec`` (no duplicates, ``spec`` itself excluded).

    Edits (``edits``, a subset of `EDITS`): ``kind``, one object kind's colour or shape (the relation
    follows the kind); ``count``, its count (1-4, only in scenes without a relation); ``relation``, a
    relation added between two single objects, removed, reversed or changed to the other axis.
    """
    unknown = set(edits) - set(EDITS)
    if unknown:
        raise ValueError(f"unknown edits {sorted(unknown)}: use some of {', '.join(EDITS)}")
    out: dict[SceneSpec, None] = {}
    entries = list(spec.objects)
    rel = spec.relation

    def add(candidate: SceneSpec | None) -> None:
        if candidate is not None and candidate != spec:
            out.setdefault(candidate)

    for i, entry in enumerate(entries):
        kinds = []
        if "kind" in edits:
            kinds = [(c, entry.shape) for c in COLOURS if c != entry.colour]
            kinds += [(entry.colour, s) for s in SHAPES if s != entry.shape]
        for colour, shape in kinds:
            new_entries = [*entries[:i], (colour, shape, entry.count), *entries[i + 1:]]
            new_rel = None
            if rel is not None:
                new_key = ObjectKey(colour, shape)
                try:
                    new_rel = Relation(_rekey(rel.subject, entry.key, new_key), rel.rel,
                                       _rekey(rel.obj, entry.key, new_key))
                except ValueError:
                    continue
            add(_spec(new_entries, new_rel))
        if rel is None and "count" in edits:
            for count in NUMBER_WORDS:
                if count != entry.count:
                    add(_spec([*entries[:i], (entry.colour, entry.shape, count), *entries[i + 1:]], None))
    singles = [e.key for e in entries if e.count == 1]
    if len(entries) == 2 and len(singles) == 2 and "relation" in edits:
        a, b = singles
        for r in RELATIONS:
            for subject, obj in ((a, b), (b, a)):
                add(_spec(entries, Relation(subject, r, obj)))
        if rel is not None:
            add(_spec(entries, None))
    return list(out)


def search_scenes(starts: Sequence[Sequence[SceneSpec]], score: ScoreFn, rounds: int = 3,
                  progress: Callable[[int], None] | None = None) -> tuple[list[SceneSpec | None], list[float]]:
    """Per item, the highest-scoring scene found by hill-climbing from its best start scene.

    ``starts[i]``: the candidate scenes of item ``i`` (e.g. its parsed sampled captions; may be
    empty: that item gets ``None`` and score ``-inf``). Each round scores all neighbours of every
    item's current scene in one ``score`` call and moves to the best if it beats the current one;
    an item whose scene did not move is done. Scores are cached per (item, scene).
    ``rounds``: at most that many moves per item (0 = just pick the best start).
    """
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    cache: dict[tuple[int, SceneSpec], float] = {}

    def scored(pairs: list[tuple[int, SceneSpec]]) -> None:
        todo = list(dict.fromkeys(p for p in pairs if p not in cache))
        if todo:
            cache.update(zip(todo, (float(s) for s in score(todo))))

    scored([(i, s) for i, specs in enumerate(starts) for s in specs])
    current: list[SceneSpec | None] = [max(specs, key=lambda s, i=i: cache[(i, s)]) if specs else None
                                       for i, specs in enumerate(starts)]
    active = [i for i, spec in enumerate(current) if spec is not None]
    for round_ in range(rounds):
        if not active:
            break
        options = {i: neighbours(current[i]) for i in active}
        scored([(i, s) for i, specs in options.items() for s in specs])
        moved = []
        for i, specs in options.items():
            best = max(specs, key=lambda s, i=i: cache[(i, s)], default=None)
            if best is not None and cache[(i, best)] > cache[(i, current[i])]:
                current[i] = best
                moved.append(i)
        active = moved
        if progress is not None:
            progress(round_)
    scores = [cache[(i, s)] if s is not None else float("-inf") for i, s in enumerate(current)]
    return current, scores
