"""The shapes-world caption language: `render_caption` writes it, `parse_caption` reads it.

Grammar (lower case, single spaces; the parser also accepts other case, extra spaces and one
trailing "."):

    caption   := frame? list | frame? pair | pair_copula
    frame     := "there is" | "there are" | "a picture of"      ("there is"/"are" agrees with the
                                                                 first noun phrase)
    list      := np (conj np)*                                  (each colour-shape kind once)
    conj      := "and" | "together with" | "as well as"
    pair      := np1 relation np1                               (two different kinds)
    pair_copula := np1 "is" relation np1
    relation  := "left of" | "to the left of" | "on the left of"
               | "right of" | "to the right of" | "on the right of" | "above" | "below"
    np        := np1 | number colour plural                      (number: two, three, four)
    np1       := ("a" | "an" | "one") colour shape               ("a"/"an" are interchangeable)

Every caption names colour and shape of every object, so the parsed `SceneSpec` is exactly the
scene's content. The inverse phrasing ("a blue square right of a red circle") parses to the
same canonical spec as the direct one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from chameleon_lite.data.shapes_scene import (
    COLOURS,
    SHAPE_PLURALS,
    SHAPES,
    ObjectInstance,
    ObjectKey,
    Relation,
    SceneSpec,
    SpecEntry,
    relation_holds,
)

NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
_LIST_FRAMES: tuple[str, ...] = ("{body}", "there {be} {body}", "a picture of {body}")
_PAIR_FRAMES: tuple[str, ...] = ("{body}", "there is {body}", "a picture of {body}", "{s} is {rel} {o}")
_CONJUNCTIONS: tuple[str, ...] = ("and", "together with", "as well as")
#: Wordings of each relation as the generator writes them (canonical or mirrored direction).
RELATION_WORDINGS: dict[str, tuple[str, ...]] = {
    "left of": ("left of", "to the left of", "on the left of"),
    "right of": ("right of", "to the right of", "on the right of"),
    "above": ("above",),
    "below": ("below",),
}
_MIRROR = {"left of": "right of", "above": "below"}


class CaptionParseError(ValueError):
    """A caption outside the shapes-world grammar (the message names the caption and why)."""

    def __init__(self, text: str, reason: str) -> None:
        super().__init__(f"cannot parse caption {text!r}: {reason}")
        self.text = text
        self.reason = reason


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(colour: str, shape: str, count: int, rng: np.random.Generator | None) -> str:
    if count > 1:
        return f"{NUMBER_WORDS[count]} {colour} {SHAPE_PLURALS[shape]}"
    determiner = "one" if rng is not None and rng.random() < 0.25 else _article(colour)
    return f"{determiner} {colour} {shape}"


def render_caption(spec: SceneSpec, rng: np.random.Generator) -> str:
    """A caption for `spec` in a phrasing drawn from `rng`; `parse_caption` returns `spec` back.

    Specs with a relation must have exactly two single objects (the position category); others
    are a list of noun phrases in random order. Phrasing choices consume `rng`, so a seeded
    generator gives a reproducible caption.
    """
    if spec.relation is not None:
        if spec.num_objects != 2:
            raise ValueError(f"a relation caption needs exactly two objects, got {spec.to_dict()}")
        subject, rel, obj = spec.relation.subject, spec.relation.rel, spec.relation.obj
        if rng.random() < 0.5:
            subject, rel, obj = obj, _MIRROR[rel], subject
        wording = RELATION_WORDINGS[rel][rng.integers(len(RELATION_WORDINGS[rel]))]
        s = _noun_phrase(subject.colour, subject.shape, 1, None)
        o = _noun_phrase(obj.colour, obj.shape, 1, None)
        frame = _PAIR_FRAMES[rng.integers(len(_PAIR_FRAMES))]
        return frame.format(body=f"{s} {wording} {o}", s=s, rel=wording, o=o)
    entries = [spec.objects[i] for i in rng.permutation(len(spec.objects))]
    phrases = [_noun_phrase(c, s, n, rng) for c, s, n in entries]
    body = phrases[0]
    for phrase in phrases[1:]:
        body += f" {_CONJUNCTIONS[rng.integers(len(_CONJUNCTIONS))]} {phrase}"
    frame = _LIST_FRAMES[rng.integers(len(_LIST_FRAMES))]
    return frame.format(body=body, be="is" if entries[0].count == 1 else "are")


def relation_caption(spec: SceneSpec, objects: Sequence[ObjectInstance], rng: np.random.Generator) -> str | None:
    """A caption of a two-object scene that also states where the objects are, or None.

    For a spec of two different single objects without a relation (with `ShapesWorld(layout="free")`
    such scenes often look exactly like position scenes), the canonical relations that hold between
    the drawn `objects` ("left of", "above"; `relation_holds`) are candidates; one is drawn from `rng`
    and the spec is rendered with it (`render_caption`). None when the spec already states a relation,
    has another shape, or no relation holds clearly (objects overlapping on both axes).
    """
    if spec.relation is not None or len(spec.objects) != 2 or spec.num_objects != 2:
        return None
    a, b = (entry.key for entry in spec.objects)
    holding = [rel for first, second in ((a, b), (b, a)) for name in ("left of", "above")
               if relation_holds(objects, rel := Relation(first, name, second))]
    if not holding:
        return None
    return render_caption(SceneSpec(spec.objects, holding[rng.integers(len(holding))]), rng)


def canonical_caption(spec: SceneSpec) -> str:
    """The one caption of `spec` with no phrasing choices: what a captioning target should be.

    Objects in `SceneSpec` order (colour, then shape), joined by "and"; "a"/"an" for single objects;
    a relation in its canonical direction and shortest wording ("a red circle left of a blue
    square"). A deterministic function of the scene, so a captioner trained on it spends no
    capacity on phrasing it cannot predict from the image. `parse_caption` returns `spec` back.
    """
    if spec.relation is not None:
        rel = spec.relation
        if spec.num_objects != 2:
            raise ValueError(f"a relation caption needs exactly two objects, got {spec.to_dict()}")
        subject = _noun_phrase(rel.subject.colour, rel.subject.shape, 1, None)
        obj = _noun_phrase(rel.obj.colour, rel.obj.shape, 1, None)
        return f"{subject} {rel.rel} {obj}"
    return " and ".join(_noun_phrase(e.colour, e.shape, e.count, None) for e in spec.objects)


def _alternation(words: list[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_DETERMINERS = {"a": 1, "an": 1, **{word: n for n, word in NUMBER_WORDS.items()}}
_SHAPE_WORDS = {shape: (shape, 1) for shape in SHAPES} | {p: (s, 2) for s, p in SHAPE_PLURALS.items()}
_NP_RE = re.compile(
    rf"({_alternation(list(_DETERMINERS))}) ({_alternation(list(COLOURS))}) "
    rf"({_alternation(list(_SHAPE_WORDS))})"
)
_NP_WORD_RE = re.compile(rf"\b(?:{_NP_RE.pattern})\b")
_FRAME_RE = re.compile(r"(there is|there are|a picture of) (.+)")
_ALL_WORDINGS = {w: rel for rel, wordings in RELATION_WORDINGS.items() for w in wordings}
_PAIR_RE = re.compile(rf"(.+?) (is )?({_alternation(list(_ALL_WORDINGS))}) (.+)")
_CONJ_RE = re.compile(rf" (?:{_alternation(list(_CONJUNCTIONS))}) ")


def _parse_np(phrase: str, text: str) -> SpecEntry:
    match = _NP_RE.fullmatch(phrase)
    if match is None:
        raise CaptionParseError(text, f"{phrase!r} is not '<number> <colour> <shape>'")
    determiner, colour, shape_word = match.groups()
    count = _DETERMINERS[determiner]
    shape, number = _SHAPE_WORDS[shape_word]
    if (count > 1) != (number > 1):
        raise CaptionParseError(text, f"number does not agree in {phrase!r}")
    return SpecEntry(colour, shape, count)


def noun_phrase_scene(text: str) -> SceneSpec | None:
    """A lenient reading of a caption: the scene of the noun phrases it contains, counts of a kind named
    twice added up ("a red circle and a red circle" -> two red circles), relations ignored. None when it
    names no noun phrase or more than four of a kind. For starting a search from a caption that
    `parse_caption` rejects; scoring stays with `parse_caption`."""
    normal = " ".join(text.lower().split())
    counts: dict[ObjectKey, int] = {}
    for match in _NP_WORD_RE.finditer(normal):
        try:
            entry = _parse_np(match.group(0), text)
        except CaptionParseError:  # "one red squares"
            continue
        counts[entry.key] = counts.get(entry.key, 0) + entry.count
    if not counts or max(counts.values()) > max(NUMBER_WORDS):
        return None
    return SceneSpec(tuple(SpecEntry(k.colour, k.shape, n) for k, n in counts.items()))


def parse_caption(text: str) -> SceneSpec:
    """The canonical `SceneSpec` a caption states; raises `CaptionParseError` off-grammar."""
    normal = " ".join(text.lower().split()).removesuffix(".").rstrip()
    frame, body = None, normal
    if match := _FRAME_RE.fullmatch(normal):
        frame, body = match.groups()
    if pair := _PAIR_RE.fullmatch(body):
        subject_text, copula, wording, obj_text = pair.groups()
        if copula and frame is not None:
            raise CaptionParseError(text, f"'is' cannot follow {frame!r}")
        if frame == "there are":
            raise CaptionParseError(text, "'there are' needs a plural first noun phrase")
        subject, obj = _parse_np(subject_text, text), _parse_np(obj_text, text)
        if subject.count != 1 or obj.count != 1:
            raise CaptionParseError(text, "a relation relates two single objects")
        if subject.key == obj.key:
            raise CaptionParseError(
                text, f"a relation needs two different objects, got {subject_text!r} twice"
            )
        relation = Relation(subject.key, _ALL_WORDINGS[wording], obj.key)
        return SceneSpec((subject, obj), relation)
    entries = [_parse_np(phrase, text) for phrase in _CONJ_RE.split(body)]
    if frame in ("there is", "there are") and (frame == "there are") != (entries[0].count > 1):
        raise CaptionParseError(text, f"{frame!r} does not agree with {entries[0].count} object(s)")
    keys = [ObjectKey(e.colour, e.shape) for e in entries]
    if len(set(keys)) != len(keys):
        raise CaptionParseError(text, "names the same colour-shape kind twice")
    return SceneSpec(tuple(entries))
