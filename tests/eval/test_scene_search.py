"""Noisy-channel scene search (eval/scene_search.py) and the captioning eval's use of it."""

import pytest
import torch

from chameleon_lite.data.shapes import (
    COLOURS,
    SHAPES,
    ObjectKey,
    Relation,
    SceneSpec,
    ShapesWorld,
    canonical_caption,
    noun_phrase_scene,
    parse_caption,
)
from chameleon_lite.eval.captioning import run_captioning, search_captions
from chameleon_lite.eval.scene_search import EDITS, neighbours, search_scenes

RED_CIRCLE = ObjectKey("red", "circle")
BLUE_SQUARE = ObjectKey("blue", "square")


def test_neighbours_of_one_object_are_every_single_edit():
    spec = parse_caption("a red circle")
    found = set(neighbours(spec))
    expected = {SceneSpec(((c, "circle", 1),)) for c in COLOURS if c != "red"}
    expected |= {SceneSpec((("red", s, 1),)) for s in SHAPES if s != "circle"}
    expected |= {SceneSpec((("red", "circle", n),)) for n in (2, 3, 4)}
    assert found == expected
    assert len(neighbours(spec)) == len(found) and spec not in found


def test_neighbours_carry_the_relation_with_the_kind_and_edit_it():
    spec = parse_caption("a red circle left of a blue square")
    found = neighbours(spec)
    assert spec not in found and len(set(found)) == len(found)
    # recolouring the subject renames it inside the relation too
    assert SceneSpec((("green", "circle", 1), ("blue", "square", 1)),
                     Relation(ObjectKey("green", "circle"), "left of", BLUE_SQUARE)) in found
    # the relation reversed, moved to the other axis, or dropped; counts never change under a relation
    assert SceneSpec(spec.objects, Relation(BLUE_SQUARE, "left of", RED_CIRCLE)) in found
    assert SceneSpec(spec.objects, Relation(RED_CIRCLE, "above", BLUE_SQUARE)) in found
    assert SceneSpec(spec.objects) in found
    assert all(s.num_objects == 2 for s in found)
    # a recolouring that makes both objects one kind is no scene
    assert all(len(s.objects) == 2 for s in found if s.relation is not None)


def test_neighbours_add_each_relation_between_two_single_objects():
    spec = parse_caption("a red circle and a blue square")
    added = {s.relation for s in neighbours(spec) if s.relation is not None and s.objects == spec.objects}
    assert added == {Relation(RED_CIRCLE, "left of", BLUE_SQUARE), Relation(BLUE_SQUARE, "left of", RED_CIRCLE),
                     Relation(RED_CIRCLE, "above", BLUE_SQUARE), Relation(BLUE_SQUARE, "above", RED_CIRCLE)}


def _distance_score(targets):
    """A score that is higher the fewer attributes differ from each item's target (and logs calls)."""
    calls = []

    def distance(a: SceneSpec, b: SceneSpec) -> int:
        ea, eb = sorted(a.objects), sorted(b.objects)
        d = abs(len(ea) - len(eb)) * 3 + (a.relation != b.relation)
        for x, y in zip(ea, eb):
            d += (x.colour != y.colour) + (x.shape != y.shape) + (x.count != y.count)
        return d

    def score(pairs):
        calls.append(list(pairs))
        return [-float(distance(spec, targets[i])) for i, spec in pairs]

    return score, calls


@pytest.mark.parametrize("caption", ["a red circle", "a red circle left of a blue square",
                                     "two green triangles and a purple diamond"])
def test_neighbour_edits_split_the_neighbours_by_kind_of_edit(caption):
    spec = parse_caption(caption)
    by_edit = {e: set(neighbours(spec, [e])) for e in EDITS}
    assert set().union(*by_edit.values()) == set(neighbours(spec))
    assert sum(map(len, by_edit.values())) == len(neighbours(spec))  # no scene is two kinds of edit
    for scene in by_edit["kind"]:  # another colour or shape: the same counts and relation word
        assert sorted(e.count for e in scene.objects) == sorted(e.count for e in spec.objects)
        assert (scene.relation is None) == (spec.relation is None)
    assert parse_caption("a blue circle") in by_edit["kind"] or spec != parse_caption("a red circle")
    with pytest.raises(ValueError, match=r"unknown edits \['colour'\]"):
        neighbours(spec, ["colour"])


def test_search_climbs_to_the_best_scene_and_scores_each_scene_once():
    targets = [parse_caption("two green triangles"), parse_caption("a purple diamond above an orange circle")]
    starts = [[parse_caption("a red triangle")], [parse_caption("a red diamond and an orange circle")]]
    score, calls = _distance_score(targets)
    found, scores = search_scenes(starts, score, rounds=4)
    assert found == targets and scores == [0.0, 0.0]
    pairs = [p for call in calls for p in call]
    assert len(pairs) == len(set(pairs))  # cached: no (item, scene) scored twice


def test_search_rounds_bound_the_moves_and_the_best_start_wins():
    target = parse_caption("two green triangles")
    score, _ = _distance_score([target])
    one_move, _ = search_scenes([[parse_caption("a red triangle")]], score, rounds=1)
    assert one_move[0] in {parse_caption("a green triangle"), parse_caption("two red triangles")}
    starts = [[parse_caption("a red circle"), parse_caption("two green circles")]]
    assert search_scenes(starts, score, rounds=0)[0] == [parse_caption("two green circles")]
    assert search_scenes([[]], score, rounds=2) == ([None], [float("-inf")])
    with pytest.raises(ValueError, match="rounds"):
        search_scenes(starts, score, rounds=-1)


def test_noun_phrase_scene_reads_captions_outside_the_grammar():
    assert noun_phrase_scene("a picture of a red circle and a red circle") == parse_caption("two red circles")
    assert noun_phrase_scene("there is a blue square above a blue square") == parse_caption("two blue squares")
    assert noun_phrase_scene("two red squares and one red square") == parse_caption("three red squares")
    assert noun_phrase_scene("an orange circle above a red circle") == parse_caption("a red circle and an orange circle")
    assert noun_phrase_scene("one red squares and a blue circle") == parse_caption("a blue circle")  # disagreement skipped
    assert noun_phrase_scene("four red squares and one red square") is None  # five: no number word
    assert noun_phrase_scene("a picture of nothing") is None


class _OracleChannel:
    """Stands in for a Generator: log p(image | caption) is 0 for the image's true scene and -1 per
    differing attribute; log p(caption | image) prefers the start captions (-5 otherwise)."""

    def __init__(self, truths, starts):
        self.truths, self.starts = truths, starts
        self.tok = self

    def encode_images(self, images):
        return torch.stack([torch.full((2, 2), int(i)) for i in images])  # the image *is* its index

    def image_log_likelihood(self, texts, codes):
        score, _ = _distance_score(self.truths)
        return torch.tensor(score([(int(c[0, 0]), parse_caption(t)) for t, c in zip(texts, codes)]))

    def prompt_log_likelihood(self, texts, codes):
        return torch.tensor([0.0 if parse_caption(t) == noun_phrase_scene(self.starts[int(c[0, 0])]) else -5.0
                             for t, c in zip(texts, codes)])


def test_search_captions_weighs_the_two_directions_and_keeps_unreadable_captions():
    truths = [parse_caption("a red triangle"), parse_caption("two green circles"), parse_caption("a blue square")]
    sampled = ["a red diamond", "a picture of a green circle and a green circle", "no idea"]
    gen = _OracleChannel(truths, sampled)
    images = [0, 1, 2]
    channel_only = search_captions(gen, images, sampled, rounds=3, caption_weight=0.0)
    assert channel_only == [canonical_caption(truths[0]), canonical_caption(truths[1]), "no idea"]
    # a strong caption term holds the first caption where it is (one attribute = -1 vs -5)
    held = search_captions(gen, images, sampled, rounds=3, caption_weight=1.0)
    assert held[0] == "a red diamond" and held[2] == "no idea"
    with pytest.raises(ValueError, match="caption_weight"):
        search_captions(gen, images, sampled, rounds=1, caption_weight=-1.0)


@pytest.mark.slow
def test_captioning_eval_with_scene_search_on_the_tiny_model(tiny_checkpoint):
    from chameleon_lite.generation.api import Generator

    gen = Generator.load(tiny_checkpoint)
    world = ShapesWorld(seed=3, split="test", length=6)
    summary, records, _ = run_captioning(gen, world, 6, temperature=0.0, seed=0, search_rounds=2)
    assert len(records) == 6 and all("sampled" in r for r in records)
    assert summary["overall"]["n"] == 6
    for r in records:  # every searched caption is a scene of the grammar, or the sampled text unchanged
        assert r["parsed"] or r["caption"] == r["sampled"]


class _PriorBoundCaptioner:
    """Stands in for a Generator that reads images perfectly but whose captioning direction has a text
    prior against the held-out pairs (-10); the image direction has none. Codes = (colour, shape) ids."""

    def __init__(self):
        self.tok = self
        self.pairs = [(c, s) for c in COLOURS for s in SHAPES]

    def encode_images(self, images):
        from chameleon_lite.data.shapes import detect_objects

        keys = [detect_objects(image)[0] for image in images]
        return torch.tensor([[list(COLOURS).index(k.colour), list(SHAPES).index(k.shape)] for k in keys])

    def _score(self, texts, codes, prior):
        out = []
        for text, (c, s) in zip(texts, codes.tolist()):
            colour, shape = text.split()[-2:]
            value = -float(colour != list(COLOURS)[c]) - float(shape != list(SHAPES)[s])
            out.append(value - (10.0 if prior and (colour, shape) in {("red", "triangle"), ("blue", "diamond")} else 0))
        return torch.tensor(out)

    def prompt_log_likelihood(self, texts, codes):
        return self._score(texts, codes, prior=True)

    def image_log_likelihood(self, texts, codes):
        return self._score(texts, codes, prior=False)


def test_composition_probe_separates_a_text_prior_from_reading_the_image():
    from chameleon_lite.eval.composition import probe_rows, run_composition_probe

    summary, records, examples = run_composition_probe(_PriorBoundCaptioner(), ShapesWorld(seed=0, split="test"), 3)
    assert summary["seen"]["n"] == 3 and summary["heldout"]["n"] == 3 and len(examples) == 6
    held_caption, held_image = summary["heldout"]["caption"], summary["heldout"]["image"]
    assert held_caption["exact"] == 0.0 and held_caption["shape_given_true_colour"] == 0.0
    assert held_caption["shape_given_other_colour"] == 1.0
    assert held_image == dict.fromkeys(held_image, 1.0)
    assert summary["seen"]["caption"]["exact"] == 1.0
    assert all(r["image"]["reading"] == r["truth"] for r in records)
    assert len(probe_rows(summary)) == 4
    # val shows its own pair (green circle), which the prior does not know: both directions read it
    val, val_records, _ = run_composition_probe(_PriorBoundCaptioner(), ShapesWorld(seed=0, split="val"), 2)
    assert val["heldout"]["n"] == 2 and val["heldout"]["caption"]["exact"] == 1.0
    assert {r["truth"] for r in val_records[2:]} == {"green circle"}
    # a world without val pairs: that group is empty, not an error
    bare, _, _ = run_composition_probe(_PriorBoundCaptioner(), ShapesWorld(seed=0, split="val", val_holdout_pairs=()), 2)
    assert bare["heldout"]["n"] == 0 and bare["heldout"]["image"]["exact"] is None
