"""What a shapes-world scene *is*: its vocabulary, its geometry and its canonical description.

Everything else in the shapes world builds on this module: the generator (`shapes.py`) draws
scenes, `shapes_captions.py` turns a `SceneSpec` into English and back, and the detector
(`shapes_detect.py`) reads objects back out of pixels. Keeping the vocabulary, the shape masks
and the relation predicate in one place guarantees that the generator and the detector agree
on what "a triangle" or "left of" means.

Coordinates: pixel `(x, y)` = (column, row); `y` grows downwards, so "above" means smaller `y`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from typing_extensions import Self

#: Saturated, well separated RGB values (the closest pair, yellow/orange, is ~95 apart).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 20, 35),
    "green": (25, 155, 60),
    "blue": (35, 75, 225),
    "yellow": (240, 220, 0),
    "purple": (140, 40, 185),
    "orange": (250, 125, 0),
}
BACKGROUND_RGB: tuple[int, int, int] = (255, 255, 255)


def _circle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25


def _square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.ones(np.broadcast_shapes(u.shape, v.shape), dtype=bool)


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Apex at the top centre, base along the bottom edge: widest at the bottom.
    return np.abs(u - 0.5) <= v / 2


def _diamond(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # A square rotated by 45 degrees: widest in the middle row.
    return np.abs(u - 0.5) + np.abs(v - 0.5) <= 0.5


#: Shape name -> indicator on normalised coordinates (u, v) in [0, 1] of its box. The renderer
#: draws and the detector's shape fit synthesises from these, so adding a shape is one entry here.
_SHAPE_INDICATORS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "diamond": _diamond,
}
SHAPES: tuple[str, ...] = tuple(_SHAPE_INDICATORS)
SHAPE_PLURALS: dict[str, str] = {shape: shape + "s" for shape in SHAPES}
SIZES: tuple[str, ...] = ("small", "large")
_SIZE_FRACTIONS: dict[str, float] = {"small": 0.2, "large": 0.3}
#: Canonical relations first; "right of"/"below" are stored as their mirrored canonical form.
RELATIONS: tuple[str, ...] = ("left of", "above", "right of", "below")
_MIRRORED: dict[str, str] = {"right of": "left of", "below": "above"}
CATEGORIES: tuple[str, ...] = (
    "single_object",
    "two_objects",
    "counting",
    "colours",
    "colour_attribution",
    "position",
)
MAX_COUNT = 4


def shape_indicator(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether points (u, v) (broadcastable arrays; the shape's box is [0, 1]^2, v downwards)
    lie inside `shape`; False outside the box."""
    if shape not in _SHAPE_INDICATORS:
        raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")
    in_box = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    return in_box & _SHAPE_INDICATORS[shape](u, v)


@functools.lru_cache(maxsize=1024)
def shape_mask(shape: str, height: int, width: int) -> np.ndarray:
    """Hard-edged boolean mask (height, width) of `shape` filling a height x width box.

    Sampled at pixel centres, no anti-aliasing; odd sizes give symmetric masks with a one-pixel
    apex. The returned array is cached and read-only.
    """
    v = (np.arange(height)[:, None] + 0.5) / height
    u = (np.arange(width)[None, :] + 0.5) / width
    mask = shape_indicator(shape, u, v)
    mask.flags.writeable = False
    return mask


def object_size_px(size: str, image_size: int) -> int:
    """Side in pixels (always odd) of a `size` ("small"/"large") object on an image_size canvas."""
    if size not in _SIZE_FRACTIONS:
        raise ValueError(f"unknown size {size!r}; known sizes: {', '.join(SIZES)}")
    return 2 * round((_SIZE_FRACTIONS[size] * image_size - 1) / 2) + 1


class ObjectKey(NamedTuple):
    """A kind of object: what captions name and held-out pairs refer to."""

    colour: str
    shape: str

    def describe(self) -> str:
        return f"{self.colour} {self.shape}"


class SpecEntry(NamedTuple):
    """`count` objects of one colour and shape."""

    colour: str
    shape: str
    count: int

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.colour, self.shape)


def _check_key(colour: str, shape: str) -> None:
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; known colours: {', '.join(COLOURS)}")
    if shape not in _SHAPE_INDICATORS:
        raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")


@dataclass(frozen=True)
class Relation:
    """`subject` <rel> `obj`, always stored in canonical form ("left of" or "above").

    Constructing with "right of"/"below" swaps the two objects, so
    `Relation(a, "right of", b) == Relation(b, "left of", a)`.
    """

    subject: ObjectKey
    rel: str
    obj: ObjectKey

    def __post_init__(self) -> None:
        if self.rel not in RELATIONS:
            raise ValueError(f"unknown relation {self.rel!r}; known relations: {', '.join(RELATIONS)}")
        subject, obj = ObjectKey(*self.subject), ObjectKey(*self.obj)
        _check_key(*subject)
        _check_key(*obj)
        if subject == obj:
            raise ValueError(f"a relation needs two different objects, got {subject.describe()!r} twice")
        if self.rel in _MIRRORED:
            subject, obj = obj, subject
            object.__setattr__(self, "rel", _MIRRORED[self.rel])
        object.__setattr__(self, "subject", subject)
        object.__setattr__(self, "obj", obj)

    def describe(self) -> str:
        return f"{self.subject.describe()} {self.rel} {self.obj.describe()}"


@dataclass(frozen=True)
class SceneSpec:
    """Canonical, hashable description of a scene: what a caption states and a detector checks.

    `objects` is sorted by (colour, shape) with one entry per kind and count >= 1; any iterable of
    3-tuples is accepted and canonicalised. `relation`, if set, relates two kinds present in
    `objects`. Two captions that say the same thing produce equal specs.
    """

    objects: tuple[SpecEntry, ...]
    relation: Relation | None = None

    def __post_init__(self) -> None:
        entries = tuple(sorted(SpecEntry(str(c), str(s), int(n)) for c, s, n in self.objects))
        for entry in entries:
            _check_key(entry.colour, entry.shape)
            if entry.count < 1:
                raise ValueError(f"count of {entry.key.describe()!r} must be >= 1, got {entry.count}")
        keys = [entry.key for entry in entries]
        if len(set(keys)) != len(keys):
            raise ValueError(f"each colour-shape kind must appear once in a SceneSpec, got {keys}")
        if self.relation is not None and not {self.relation.subject, self.relation.obj} <= set(keys):
            raise ValueError(f"relation {self.relation.describe()!r} names objects not in {keys}")
        object.__setattr__(self, "objects", entries)

    @classmethod
    def from_keys(cls, keys: Iterable[tuple[str, str]], relation: Relation | None = None) -> SceneSpec:
        """Spec counting each (colour, shape) occurrence in `keys`."""
        counts: dict[ObjectKey, int] = {}
        for key in keys:
            key = ObjectKey(*key)
            counts[key] = counts.get(key, 0) + 1
        return cls(tuple(SpecEntry(k.colour, k.shape, n) for k, n in counts.items()), relation)

    @property
    def num_objects(self) -> int:
        return sum(entry.count for entry in self.objects)

    def counts(self) -> dict[ObjectKey, int]:
        return {entry.key: entry.count for entry in self.objects}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; `SceneSpec.from_dict(spec.to_dict()) == spec`."""
        relation = None
        if self.relation is not None:
            relation = {
                "subject": list(self.relation.subject),
                "rel": self.relation.rel,
                "object": list(self.relation.obj),
            }
        return {"objects": [entry._asdict() for entry in self.objects], "relation": relation}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SceneSpec:
        relation = data.get("relation")
        return cls(
            tuple((o["colour"], o["shape"], o["count"]) for o in data["objects"]),
            None
            if relation is None
            else Relation(ObjectKey(*relation["subject"]), relation["rel"], ObjectKey(*relation["object"])),
        )


def category_of(spec: SceneSpec) -> str:
    """The GenEval-style category whose caption structure `spec` has.

    Raises ValueError for specs no category produces (e.g. three different kinds).
    """
    entries = spec.objects
    if spec.relation is not None and len(entries) == 2 and spec.num_objects == 2:
        return "position"
    if spec.relation is None and len(entries) == 1:
        return "single_object" if entries[0].count == 1 else "counting"
    if spec.relation is None and len(entries) == 2 and spec.num_objects == 2:
        (c1, s1, _), (c2, s2, _) = entries
        if c1 == c2:
            return "two_objects"
        return "colours" if s1 == s2 else "colour_attribution"
    raise ValueError(f"no shapes-world category has the structure of {spec.to_dict()}")


@dataclass(frozen=True)
class ObjectInstance:
    """One object in pixel space, as drawn (ground truth) or as read back by the detector.

    `centroid` is the mean (x, y) of the object's pixel indices; `bbox` is the half-open pixel
    box (x_min, y_min, x_max, y_max); `pixel_count` is its area in pixels.
    """

    shape: str
    colour: str
    size: str
    centroid: tuple[float, float]
    bbox: tuple[int, int, int, int]
    pixel_count: int

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.colour, self.shape)

    @classmethod
    def from_mask(
        cls, mask: np.ndarray, x0: int, y0: int, shape: str, colour: str, size: str, **extra: Any
    ) -> Self:
        """Instance whose pixels are the True entries of `mask` (h, w), placed at (x0, y0).

        The one place centroid, bbox and area are measured, for renders and detections alike;
        `extra` fills subclass fields.
        """
        rows, cols = np.nonzero(mask)
        return cls(
            shape=shape,
            colour=colour,
            size=size,
            centroid=(float(x0 + cols.mean()), float(y0 + rows.mean())),
            bbox=(
                x0 + int(cols.min()),
                y0 + int(rows.min()),
                x0 + int(cols.max()) + 1,
                y0 + int(rows.max()) + 1,
            ),
            pixel_count=int(rows.size),
            **extra,
        )


def _axis_offsets(subject: ObjectInstance, obj: ObjectInstance, rel: str) -> tuple[float, float, float]:
    """(along, across, extent) for a canonical relation: `along` > 0 when it holds in direction,
    `across` the absolute offset on the other axis, `extent` the mean size along the axis."""
    (sx, sy), (ox, oy) = subject.centroid, obj.centroid
    if rel == "left of":
        extent = ((subject.bbox[2] - subject.bbox[0]) + (obj.bbox[2] - obj.bbox[0])) / 2
        return ox - sx, abs(oy - sy), extent
    extent = ((subject.bbox[3] - subject.bbox[1]) + (obj.bbox[3] - obj.bbox[1])) / 2
    return oy - sy, abs(ox - sx), extent


def placement_satisfies(
    subject: ObjectInstance,
    obj: ObjectInstance,
    rel: str,
    *,
    min_separation: float = 0.5,
    min_dominance: float = 1.0,
) -> bool:
    """Whether `subject` <rel> `obj` holds geometrically.

    Holds when the centroids are apart along the relation's axis by at least `min_separation`
    times the objects' mean extent on that axis, and that offset is at least `min_dominance`
    times the offset on the other axis (1.0: within 45 degrees, so at most one relation of a pair
    holds). Scale-free: no image size needed. The defaults are the lenient check applied to
    detections; the generator places position scenes with a much stricter setting.
    """
    if rel in _MIRRORED:
        subject, obj, rel = obj, subject, _MIRRORED[rel]
    along, across, extent = _axis_offsets(subject, obj, rel)
    return along >= min_separation * extent and along >= min_dominance * across and along > 0


def relation_holds(objects: Sequence[ObjectInstance], relation: Relation) -> bool:
    """Whether `relation` holds among `objects` (ground truth or detections).

    True iff at least one object matches each side and every (subject, object) pair satisfies
    `placement_satisfies` with its default (lenient, GenEval-like) thresholds.
    """
    subjects = [o for o in objects if o.key == relation.subject]
    others = [o for o in objects if o.key == relation.obj]
    if not subjects or not others:
        return False
    return all(placement_satisfies(s, o, relation.rel) for s in subjects for o in others)
