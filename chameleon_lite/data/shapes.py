"""The shapes world: chameleon-lite's embedded, generated default data set.

Small RGB canvases with 1-4 hard-edged objects (colour x shape x size x position) and a caption
in the shapes-world grammar, drawn deterministically from (seed, split, index): any worker
process rebuilds any sample without shared state. Categories mirror GenEval (`CATEGORIES`);
some colour-shape pairs are held out of training to measure compositional generalisation: the
test pairs appear only in test, the val pairs only in val (so model selection can see composition
without looking at the test pairs).

This module is also the one import site of the shapes world: the scene vocabulary
(`shapes_scene`), the caption language (`shapes_captions`) and the detector (`shapes_detect`)
are re-exported here.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from chameleon_lite.data.shapes_captions import (
    CaptionParseError,
    canonical_caption,
    noun_phrase_scene,
    parse_caption,
    relation_caption,
    render_caption,
)
from chameleon_lite.data.shapes_detect import DetectedObject, detect_objects, scene_from_detections
from chameleon_lite.data.shapes_scene import (
    BACKGROUND_RGB,
    CATEGORIES,
    COLOURS,
    MAX_COUNT,
    RELATIONS,
    SHAPES,
    SIZES,
    ObjectInstance,
    ObjectKey,
    Relation,
    SceneSpec,
    SpecEntry,
    category_of,
    object_size_px,
    placement_satisfies,
    relation_holds,
    shape_mask,
)

__all__ = [
    "BACKGROUND_RGB",
    "CATEGORIES",
    "COLOURS",
    "DEFAULT_HOLDOUT_PAIRS",
    "DEFAULT_VAL_HOLDOUT_PAIRS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "CaptionParseError",
    "DetectedObject",
    "ObjectInstance",
    "ObjectKey",
    "Relation",
    "SceneSpec",
    "ShapesSample",
    "ShapesWorld",
    "SpecEntry",
    "canonical_caption",
    "category_of",
    "detect_objects",
    "noun_phrase_scene",
    "parse_caption",
    "relation_caption",
    "relation_holds",
    "render_caption",
    "render_scene",
    "scene_from_detections",
]

SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_HOLDOUT_PAIRS: tuple[tuple[str, str], ...] = (("red", "triangle"), ("blue", "diamond"))
#: A pair held out of training and shown only in val: its colour and shape differ from the test pairs'.
DEFAULT_VAL_HOLDOUT_PAIRS: tuple[tuple[str, str], ...] = (("green", "circle"),)
MIN_IMAGE_SIZE = 32
#: Position scenes are placed so the relation holds far beyond the detector's lenient check:
#: projections on the relation axis are disjoint and that axis dominates the other 2:1.
_CLEAR_SEPARATION, _CLEAR_DOMINANCE = 1.0, 2.0
#: Scenes of two different objects in the other categories (`layout="unambiguous"`) are laid out
#: diagonally: neither axis' centroid offset exceeds this multiple of the other's (38.7-51.3 degrees),
#: well clear of a position scene's 2:1 (<= 26.6 degrees). Their captions state no relation, so the
#: picture alone must show that none is meant; with free layouts 64% of them showed one clearly.
_DIAGONAL_DOMINANCE = 1.25
#: "unambiguous": a scene's caption is a function of its picture (a clear relation <=> position);
#: "free": any non-overlapping layout (the world before 2026-11-23; captions cannot be exact).
LAYOUTS: tuple[str, ...] = ("unambiguous", "free")
_POSITION_TRIES_PER_OBJECT = 50
_SCENE_TRIES = 200


@dataclass(eq=False)
class ShapesSample:
    """One shapes-world example (compared by identity: compare fields, the image with torch.equal).

    image: uint8 tensor (3, H, W), white background, exact palette colours.
    caption: an English caption; `parse_caption(caption) == spec`.
    spec: the canonical content (what the caption states).
    category: one of `CATEGORIES`.
    heldout: whether any object is a colour-shape pair held out of training: a test pair in test, a
        val pair in val (never True in train).
    objects: the drawn objects, in drawing order.
    """

    image: torch.Tensor
    caption: str
    spec: SceneSpec
    category: str
    heldout: bool
    objects: list[ObjectInstance]


def render_scene(objects: Iterable[ObjectInstance], image_size: int) -> np.ndarray:
    """Draw `objects` (each filling its bbox with its shape's mask) on a white canvas.

    Returns uint8 (image_size, image_size, 3); hard edges, exact `COLOURS` values.
    """
    canvas = np.full((image_size, image_size, 3), BACKGROUND_RGB, dtype=np.uint8)
    for obj in objects:
        x0, y0, x1, y1 = obj.bbox
        canvas[y0:y1, x0:x1][shape_mask(obj.shape, y1 - y0, x1 - x0)] = COLOURS[obj.colour]
    return canvas


def _category_combos(category: str) -> list[tuple[ObjectKey, ...]]:
    """All object kinds a category's scene may name (unordered; counting repeats its one kind)."""
    keys = [ObjectKey(colour, shape) for colour in COLOURS for shape in SHAPES]
    if category in ("single_object", "counting"):
        return [(key,) for key in keys]
    pair_rule = {
        "two_objects": lambda a, b: a.colour == b.colour and a.shape != b.shape,
        "colours": lambda a, b: a.shape == b.shape and a.colour != b.colour,
        "colour_attribution": lambda a, b: a.colour != b.colour and a.shape != b.shape,
        "position": lambda a, b: a.colour != b.colour and a.shape != b.shape,
    }[category]
    return [(a, b) for a, b in itertools.combinations(keys, 2) if pair_rule(a, b)]


class ShapesWorld(Dataset):
    """Map-style dataset of `ShapesSample`s, deterministic in (seed, split, index).

    Sample `index` of `split` is drawn from `numpy.random.default_rng([seed, split_id, index])`
    only, so it is identical in every process and every run; the three splits are independent
    streams. `holdout_pairs` never appear in train or val, `val_holdout_pairs` never in train or test;
    in test (val) a `heldout_fraction` of the samples (per category, where the category can include
    one) contain at least one of the test (val) pairs.
    Everything (object sizes, margins) scales with `image_size`.

    `layout="unambiguous"` (default) places only position scenes with a clear relation between two
    different objects; the other two-object categories are laid out diagonally, so whether a caption
    states where things are follows from the picture. `"free"` allows any layout: then 64% of those
    scenes look like position scenes, and no captioner can know which of the two captions is meant.

    Raises ValueError naming the argument for an unknown split, colour, shape or category, a
    negative weight, a pair held out for both val and test, or a holdout that leaves a weighted
    category with nothing to draw in train.
    """

    def __init__(
        self,
        seed: int = 0,
        image_size: int = 64,
        split: str = "train",
        holdout_pairs: Iterable[Sequence[str]] = DEFAULT_HOLDOUT_PAIRS,
        length: int = 10_000,
        category_weights: Mapping[str, float] | None = None,
        heldout_fraction: float = 0.25,
        layout: str = "unambiguous",
        val_holdout_pairs: Iterable[Sequence[str]] = DEFAULT_VAL_HOLDOUT_PAIRS,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if seed < 0 or length < 0:
            raise ValueError(f"seed and length must be >= 0, got seed={seed}, length={length}")
        if image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}")
        if not 0.0 <= heldout_fraction <= 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
        self.seed, self.image_size, self.split, self.length = seed, image_size, split, length
        self.heldout_fraction, self.layout = heldout_fraction, layout
        self.holdout_pairs = frozenset(ObjectKey(*pair) for pair in holdout_pairs)
        self.val_holdout_pairs = frozenset(ObjectKey(*pair) for pair in val_holdout_pairs)
        for name, pairs in (("holdout_pairs", self.holdout_pairs), ("val_holdout_pairs", self.val_holdout_pairs)):
            for colour, shape in pairs:
                if colour not in COLOURS or shape not in SHAPES:
                    raise ValueError(f"{name}: ({colour!r}, {shape!r}) is not a known colour and shape")
        if both := self.holdout_pairs & self.val_holdout_pairs:
            raise ValueError(f"pairs {sorted(both)} are in both holdout_pairs (test) and val_holdout_pairs: "
                             "a pair is held out for one split")
        weights = dict.fromkeys(CATEGORIES, 1.0) if category_weights is None else dict(category_weights)
        unknown = set(weights) - set(CATEGORIES)
        if unknown or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(
                f"category_weights must map categories {CATEGORIES} to weights >= 0 with a positive sum, "
                f"got {weights}"
            )
        self.categories = tuple(c for c in CATEGORIES if weights.get(c, 0) > 0)
        total = sum(weights[c] for c in self.categories)
        self._probabilities = np.array([weights[c] / total for c in self.categories])
        self._combos: dict[str, tuple[list[tuple[ObjectKey, ...]], list[tuple[ObjectKey, ...]]]] = {}
        # This split's own held-out pairs; the other split's pairs are never drawn here.
        shown, hidden = {"train": (frozenset(), self.holdout_pairs | self.val_holdout_pairs),
                         "val": (self.val_holdout_pairs, self.holdout_pairs),
                         "test": (self.holdout_pairs, self.val_holdout_pairs)}[split]
        self._shown_heldout = shown
        for category in self.categories:
            combos = [c for c in _category_combos(category) if not hidden.intersection(c)]
            seen = [c for c in combos if not shown.intersection(c)]
            held = [c for c in combos if shown.intersection(c)]
            if not seen:
                raise ValueError(f"holdout_pairs leave category {category!r} nothing to draw in training")
            self._combos[category] = (seen, held)
        self._split_id = SPLITS.index(split)
        self._border = max(1, round(0.05 * image_size))
        self._gap = max(2, round(0.06 * image_size))

    @property
    def has_heldout(self) -> bool:
        """Whether this split shows held-out pairs at all (test: the test pairs; val: the val pairs)."""
        return bool(self._shown_heldout) and self.heldout_fraction > 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> ShapesSample:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a ShapesWorld of length {self.length}")
        rng = np.random.default_rng([self.seed, self._split_id, int(index)])
        category = self.categories[rng.choice(len(self.categories), p=self._probabilities)]
        seen, held = self._combos[category]
        pool = seen
        if held and rng.random() < self.heldout_fraction:
            pool = held
        kinds = pool[rng.integers(len(pool))]
        objects, relation = self._place(category, kinds, rng)
        spec = SceneSpec.from_keys((obj.key for obj in objects), relation)
        image = torch.from_numpy(
            np.ascontiguousarray(render_scene(objects, self.image_size).transpose(2, 0, 1))
        )
        return ShapesSample(
            image=image,
            caption=render_caption(spec, rng),
            spec=spec,
            category=category,
            heldout=any(obj.key in self._shown_heldout for obj in objects),
            objects=objects,
        )

    def _place(
        self, category: str, kinds: tuple[ObjectKey, ...], rng: np.random.Generator
    ) -> tuple[list[ObjectInstance], Relation | None]:
        """Sizes and non-overlapping positions for the scene's objects (and its relation)."""
        if category == "counting":
            size = SIZES[rng.integers(len(SIZES))]
            keys = [kinds[0]] * int(rng.integers(2, MAX_COUNT + 1))
            sizes = [size] * len(keys)
        else:
            keys = [kinds[i] for i in rng.permutation(len(kinds))]
            sizes = [SIZES[rng.integers(len(SIZES))] for _ in keys]
        for attempt in range(_SCENE_TRIES):
            if attempt == _SCENE_TRIES // 2:  # crowded: fall back to small objects, which always fit
                sizes = ["small"] * len(keys)
            objects = self._try_layout(keys, sizes, rng)
            if objects is None:
                continue
            if category == "position":
                relation = _clear_relation(objects[0], objects[1])
                if relation is not None:
                    return objects, relation
            elif self.layout == "free" or not _shows_relation(objects):
                return objects, None
        raise RuntimeError(f"could not place {category} scene {keys} on a {self.image_size}px canvas")

    def _try_layout(
        self, keys: list[ObjectKey], sizes: list[str], rng: np.random.Generator
    ) -> list[ObjectInstance] | None:
        """Random positions keeping `_gap` between objects and `_border` from the edge, or None."""
        boxes: list[tuple[int, int, int, int]] = []
        for size in sizes:
            side = object_size_px(size, self.image_size)
            high = self.image_size - self._border - side + 1
            for _ in range(_POSITION_TRIES_PER_OBJECT):
                x0, y0 = (int(v) for v in rng.integers(self._border, high, size=2))
                box = (x0, y0, x0 + side, y0 + side)
                if all(_apart(box, other, self._gap) for other in boxes):
                    boxes.append(box)
                    break
            else:
                return None
        return [
            ObjectInstance.from_mask(
                shape_mask(key.shape, y1 - y0, x1 - x0), x0, y0, key.shape, key.colour, size
            )
            for key, size, (x0, y0, x1, y1) in zip(keys, sizes, boxes)
        ]


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    """Whether half-open boxes a and b are at least `gap` pixels apart on some axis."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _shows_relation(objects: Sequence[ObjectInstance]) -> bool:
    """Whether two different objects are laid out closer to an axis than a diagonal allows
    (`_DIAGONAL_DOMINANCE`), i.e. their picture could suggest a relation; False for any other scene."""
    if len(objects) != 2 or objects[0].key == objects[1].key:
        return False
    a, b = objects
    return any(placement_satisfies(subject, obj, rel, min_separation=0.0, min_dominance=_DIAGONAL_DOMINANCE)
               for rel in ("left of", "above") for subject, obj in ((a, b), (b, a)))


def _clear_relation(a: ObjectInstance, b: ObjectInstance) -> Relation | None:
    """The canonical relation that clearly holds between a and b, or None if none does."""
    for rel in ("left of", "above"):
        for subject, obj in ((a, b), (b, a)):
            if placement_satisfies(
                subject, obj, rel, min_separation=_CLEAR_SEPARATION, min_dominance=_CLEAR_DOMINANCE
            ):
                return Relation(subject.key, rel, obj.key)
    return None
