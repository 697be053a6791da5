"""The shapes world: determinism, held-out pairs, scene structure, caption grammar, detector."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms.functional import gaussian_blur

from chameleon_lite.data.shapes import (
    CATEGORIES,
    COLOURS,
    DEFAULT_HOLDOUT_PAIRS,
    DEFAULT_VAL_HOLDOUT_PAIRS,
    SHAPES,
    SPLITS,
    CaptionParseError,
    ObjectKey,
    Relation,
    SceneSpec,
    ShapesSample,
    ShapesWorld,
    canonical_caption,
    category_of,
    detect_objects,
    parse_caption,
    relation_holds,
    render_caption,
    scene_from_detections,
)
from chameleon_lite.data.shapes_captions import NUMBER_WORDS
from chameleon_lite.data.shapes_detect import UNKNOWN_SHAPE, label_runs
from chameleon_lite.data.shapes_scene import SHAPE_PLURALS, object_size_px, placement_satisfies

# Fresh seeds every run: acceptance numbers must not depend on a lucky seed. Printed on failure.
FRESH_SEED = random.SystemRandom().randrange(2**31)
N_ACCEPTANCE = 2000
HOLDOUT = {ObjectKey(*pair) for pair in DEFAULT_HOLDOUT_PAIRS}
VAL_HOLDOUT = {ObjectKey(*pair) for pair in DEFAULT_VAL_HOLDOUT_PAIRS}


@pytest.fixture(scope="module")
def samples() -> dict[str, list[ShapesSample]]:
    """Fresh samples of every split, each split from its own seed."""
    return {
        split: [
            ShapesWorld(seed=FRESH_SEED + k, split=split)[i]
            for i in range(N_ACCEPTANCE if split == "test" else 1000)
        ]
        for k, split in enumerate(SPLITS)
    }


def reads_exactly(detections, sample: ShapesSample) -> bool:
    return scene_from_detections(detections).objects == sample.spec.objects and (
        sample.spec.relation is None or relation_holds(detections, sample.spec.relation)
    )


# --- determinism -------------------------------------------------------------------------------


def test_same_seed_split_index_gives_the_same_sample_whatever_the_global_rng_state():
    first = ShapesWorld(seed=7, split="val")
    expected = [first[i] for i in (0, 5, 999)]
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    again = ShapesWorld(seed=7, split="val")
    for index, sample in zip((999, 5, 0), [again[i] for i in (999, 5, 0)]):  # other access order
        other = expected[(0, 5, 999).index(index)]
        assert torch.equal(sample.image, other.image)
        assert (sample.caption, sample.spec, sample.objects) == (other.caption, other.spec, other.objects)


def test_dataloader_workers_rebuild_the_same_samples():
    world = ShapesWorld(seed=3, split="train", length=8)
    loaded = [s for batch in DataLoader(world, batch_size=4, num_workers=2, collate_fn=list) for s in batch]
    assert [s.caption for s in loaded] == [world[i].caption for i in range(8)]
    assert all(torch.equal(s.image, world[i].image) for i, s in enumerate(loaded))


def test_splits_and_seeds_are_different_streams():
    worlds = [ShapesWorld(seed=0, split=s) for s in SPLITS] + [ShapesWorld(seed=1, split="train")]
    for i in range(40):
        images = [w[i].image for w in worlds]
        assert not any(torch.equal(a, b) for k, a in enumerate(images) for b in images[k + 1 :])


def test_sample_contract(samples):
    sample = samples["train"][0]
    assert sample.image.dtype == torch.uint8 and sample.image.shape == (3, 64, 64)
    assert sample.category in CATEGORIES and isinstance(sample.caption, str)
    with pytest.raises(IndexError):
        ShapesWorld(length=3)[3]


# --- held-out pairs ----------------------------------------------------------------------------


def test_heldout_pairs_never_in_train_and_about_a_quarter_of_their_split(samples):
    """Test pairs appear only in test, val pairs only in val; each in about a quarter of its split."""
    assert HOLDOUT and VAL_HOLDOUT and not HOLDOUT & VAL_HOLDOUT
    train_keys = {o.key for s in samples["train"] for o in s.objects}
    assert not train_keys & (HOLDOUT | VAL_HOLDOUT), f"seed {FRESH_SEED}: train contains {train_keys & (HOLDOUT | VAL_HOLDOUT)}"
    assert not any(s.heldout for s in samples["train"])
    for split, own, other in (("val", VAL_HOLDOUT, HOLDOUT), ("test", HOLDOUT, VAL_HOLDOUT)):
        drawn = samples[split]
        keys = {o.key for s in drawn for o in s.objects}
        assert not keys & other, f"seed {FRESH_SEED}: {split} contains the other split's pairs {keys & other}"
        assert keys >= own
        assert all(s.heldout == any(o.key in own for o in s.objects) for s in drawn)
        rate = sum(s.heldout for s in drawn) / len(drawn)
        print(f"held-out rate in {split}: {rate:.3f} (seed {FRESH_SEED})")
        assert 0.18 <= rate <= 0.32, f"seed {FRESH_SEED}: {split} held-out rate {rate:.3f}"


def test_holdout_is_configurable():
    assert not any(ShapesWorld(split="test", holdout_pairs=())[i].heldout for i in range(200))
    custom = ShapesWorld(split="train", holdout_pairs=[("green", "circle")], val_holdout_pairs=[("red", "square")])
    assert all(o.key not in {("green", "circle"), ("red", "square")} for i in range(500) for o in custom[i].objects)
    # without val pairs, val is drawn from the training pairs only, as before they existed
    bare = ShapesWorld(split="val", val_holdout_pairs=())
    assert not bare.has_heldout and not any(bare[i].heldout for i in range(200))
    assert any(o.key == ("green", "circle") for i in range(200) for o in bare[i].objects)


# --- scene structure ---------------------------------------------------------------------------


def test_every_category_has_its_structure(samples):
    counts = Counter()
    for sample in samples["test"]:
        spec, objects = sample.spec, sample.objects
        counts[sample.category] += 1
        assert category_of(spec) == sample.category
        assert spec == SceneSpec.from_keys((o.key for o in objects), spec.relation)
        assert 1 <= len(objects) <= 4
        keys = [o.key for o in objects]
        if sample.category == "single_object":
            assert len(keys) == 1
        elif sample.category == "counting":
            assert 2 <= len(keys) <= 4 and len(set(keys)) == 1 and len({o.size for o in objects}) == 1
        else:
            (c1, s1), (c2, s2) = keys
            rule = {
                "two_objects": c1 == c2 and s1 != s2,
                "colours": s1 == s2 and c1 != c2,
                "colour_attribution": c1 != c2 and s1 != s2,
                "position": c1 != c2 and s1 != s2 and spec.relation is not None,
            }[sample.category]
            assert rule, sample.caption
    assert set(counts) == set(CATEGORIES)
    assert all(0.1 < n / N_ACCEPTANCE < 0.25 for n in counts.values()), counts


def test_category_weights_select_categories():
    world = ShapesWorld(category_weights={"counting": 1.0, "position": 0.0})
    assert {world[i].category for i in range(50)} == {"counting"}


def test_objects_are_in_bounds_apart_and_drawn_exactly(samples):
    palette = {tuple(rgb) for rgb in COLOURS.values()} | {(255, 255, 255)}
    for sample in samples["val"][:300]:
        pixels = sample.image.permute(1, 2, 0).numpy()
        assert {tuple(p) for p in np.unique(pixels.reshape(-1, 3), axis=0).tolist()} <= palette
        assert (pixels != 255).any(axis=-1).sum() == sum(o.pixel_count for o in sample.objects)
        boxes = [o.bbox for o in sample.objects]
        assert all(3 <= x0 and 3 <= y0 and x1 <= 61 and y1 <= 61 for x0, y0, x1, y1 in boxes)
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:  # >= 4 px apart on some axis (0.06 * 64)
                assert a[2] + 4 <= b[0] or b[2] + 4 <= a[0] or a[3] + 4 <= b[1] or b[3] + 4 <= a[1]
        for obj in sample.objects:
            x0, y0, x1, y1 = obj.bbox
            assert x1 - x0 == y1 - y0 == object_size_px(obj.size, 64)
            assert (pixels[y0:y1, x0:x1] == COLOURS[obj.colour]).all(axis=-1).sum() == obj.pixel_count


def test_position_relations_hold_by_a_wide_margin(samples):
    positions = [s for s in samples["test"] if s.category == "position"]
    for sample in positions:
        rel = sample.spec.relation
        subject, obj = (next(o for o in sample.objects if o.key == k) for k in (rel.subject, rel.obj))
        assert placement_satisfies(subject, obj, rel.rel, min_separation=1.0, min_dominance=2.0)
        assert relation_holds(sample.objects, rel)
        assert not relation_holds(sample.objects, Relation(rel.obj, rel.rel, rel.subject))
    assert Counter(s.spec.relation.rel for s in positions).keys() == {"left of", "above"}


def _axis_ratio(a, b) -> float:
    """How much the larger centroid offset of two objects exceeds the smaller (1: diagonal)."""
    dx, dy = (abs(p - q) for p, q in zip(a.centroid, b.centroid))
    return max(dx, dy) / max(min(dx, dy), 1e-9)


def _two_different(sample: ShapesSample) -> bool:
    return len(sample.objects) == 2 and sample.objects[0].key != sample.objects[1].key


def test_a_picture_shows_a_clear_relation_exactly_when_its_caption_states_one(samples):
    # A captioner can only be exact if the picture tells whether to say where things are: position
    # scenes lie along an axis (ratio >= 2), the other two-object scenes on a diagonal (<= 1.25).
    for split, split_samples in samples.items():
        pairs = [s for s in split_samples if _two_different(s)]
        assert {s.category for s in pairs} == {"position", "two_objects", "colours", "colour_attribution"}
        for sample in pairs:
            ratio = _axis_ratio(*sample.objects)
            if sample.category == "position":
                assert ratio >= 2.0, (FRESH_SEED, split, sample.caption)
            else:
                assert ratio <= 1.25, (FRESH_SEED, split, sample.caption, ratio)


def test_free_layouts_make_most_two_object_scenes_look_like_position_scenes():
    # The world before 2026-11-23 (layout="free"), kept to reproduce old figures: there a caption is
    # not a function of its picture.
    world = ShapesWorld(seed=FRESH_SEED, split="train", length=600, layout="free",
                        category_weights={"two_objects": 1, "colours": 1, "colour_attribution": 1,
                                          "single_object": 0, "counting": 0, "position": 0})
    ratios = [_axis_ratio(*world[i].objects) for i in range(len(world))]
    assert 0.4 < np.mean([r >= 2.0 for r in ratios]) < 0.85, FRESH_SEED


@pytest.mark.parametrize("image_size", [32, 128])
def test_everything_scales_with_image_size(image_size):
    world = ShapesWorld(seed=FRESH_SEED, image_size=image_size, split="test")
    for i in range(60):
        sample = world[i]
        assert sample.image.shape == (3, image_size, image_size)
        detections = detect_objects(sample.image)
        assert reads_exactly(detections, sample), f"seed {FRESH_SEED} index {i}: {sample.caption}"
        assert sorted(d.size for d in detections) == sorted(o.size for o in sample.objects)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "dev"}, "split"),
        ({"holdout_pairs": [("pink", "circle")]}, "pink"),
        ({"val_holdout_pairs": [("red", "hexagon")]}, "val_holdout_pairs.*hexagon"),
        ({"val_holdout_pairs": [("red", "triangle")]}, "both holdout_pairs"),
        ({"category_weights": {"counting": -1.0}}, "category_weights"),
        ({"category_weights": {"stacking": 1.0}}, "category_weights"),
        ({"image_size": 16}, "image_size"),
        ({"heldout_fraction": 1.5}, "heldout_fraction"),
        ({"layout": "grid"}, "layout"),
        ({"holdout_pairs": [(c, s) for c in COLOURS for s in SHAPES], "val_holdout_pairs": ()}, "nothing to draw"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShapesWorld(**kwargs)


# --- captions ----------------------------------------------------------------------------------


def _phrasing(caption: str) -> str:
    words = "|".join([*SHAPE_PLURALS.values(), *SHAPES, *COLOURS, *NUMBER_WORDS.values(), "an", "a"])
    return re.sub(rf"\b({words})\b", "_", caption)


def test_every_category_has_at_least_three_phrasings(samples):
    phrasings: dict[str, set[str]] = {}
    for sample in samples["train"]:
        phrasings.setdefault(sample.category, set()).add(_phrasing(sample.caption))
    assert all(len(p) >= 3 for p in phrasings.values()), {c: len(p) for c, p in phrasings.items()}


def test_parser_recovers_every_generated_caption(samples):
    captions = [(s.caption, s.spec) for split in SPLITS for s in samples[split]]
    wrong = [(caption, spec) for caption, spec in captions if parse_caption(caption) != spec]
    print(f"parser: {len(captions) - len(wrong)}/{len(captions)} captions recovered (seed {FRESH_SEED})")
    assert not wrong, f"seed {FRESH_SEED}: {wrong[:3]}"


def test_render_caption_round_trips_every_phrasing_of_a_spec():
    spec = SceneSpec.from_keys(
        [("orange", "circle"), ("blue", "square")],
        Relation(("orange", "circle"), "above", ("blue", "square")),
    )
    rng = np.random.default_rng(0)
    captions = {render_caption(spec, rng) for _ in range(200)}
    assert len(captions) >= 6 and all(parse_caption(c) == spec for c in captions)


def test_canonical_caption_is_one_phrasing_per_scene_that_parses_back(samples):
    by_spec: dict[SceneSpec, set[str]] = {}
    for sample in samples["test"]:
        assert parse_caption(canonical_caption(sample.spec)) == sample.spec
        by_spec.setdefault(sample.spec, set()).add(canonical_caption(parse_caption(sample.caption)))
    assert all(len(captions) == 1 for captions in by_spec.values())
    varied = {s.spec: set() for s in samples["test"]}
    for s in samples["test"]:
        varied[s.spec].add(s.caption)
    assert sum(len(v) > 1 for v in varied.values()) > 0  # the contrast: the generator's captions vary
    spec = SceneSpec.from_keys([("orange", "circle"), ("blue", "square")],
                               Relation(("blue", "square"), "right of", ("orange", "circle")))
    assert canonical_caption(spec) == "an orange circle left of a blue square"
    assert canonical_caption(SceneSpec((("red", "square", 3), ("green", "circle", 1)))) == (
        "a green circle and three red squares")


def test_equivalent_phrasings_parse_to_one_spec():
    specs = {
        parse_caption(text)
        for text in [
            "a red circle left of a blue square",
            "a red circle to the left of a blue square",
            "there is a red circle on the left of a blue square",
            "a blue square is right of a red circle",
            "a picture of a blue square to the right of a red circle",
            "  A Red Circle   LEFT of an blue square. ",
        ]
    }
    assert specs == {
        SceneSpec.from_keys(
            [("red", "circle"), ("blue", "square")],
            Relation(("red", "circle"), "left of", ("blue", "square")),
        )
    }
    assert parse_caption("a green diamond below a yellow circle").relation == Relation(
        ("yellow", "circle"), "above", ("green", "diamond")
    )
    assert (
        parse_caption("three red circles")
        == parse_caption("there are three red circles")
        == SceneSpec((("red", "circle", 3),))
    )
    assert parse_caption("a red circle and a red square") == parse_caption(
        "a picture of one red square as well as a red circle"
    )


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a red",
        "a red circles",
        "two red circle",
        "five red circles",
        "a pink circle",
        "a circle",
        "a red circle left of a red circle",
        "a red circle and a red circle",
        "a red circle left of two blue squares",
        "there is two red circles",
        "there are a red circle",
        "there is a red circle is left of a blue square",
        "a red circle near a blue square",
        "a red circle and a blue square left of a green triangle",
        "a red circle, a blue square",
    ],
)
def test_off_grammar_captions_raise_naming_the_text(text):
    with pytest.raises(CaptionParseError) as info:
        parse_caption(text)
    assert repr(text) in str(info.value) and isinstance(info.value, ValueError)


def test_scene_spec_is_canonical_hashable_and_round_trips():
    a = SceneSpec((("red", "circle", 2), ("blue", "square", 1)))
    b = SceneSpec([("blue", "square", 1), ("red", "circle", 2)])
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    rel = Relation(("red", "circle"), "right of", ("blue", "square"))
    assert rel == Relation(("blue", "square"), "left of", ("red", "circle")) and rel.rel == "left of"
    spec = SceneSpec(a.objects, rel)
    assert SceneSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    for bad in [
        lambda: SceneSpec((("red", "circle", 0),)),
        lambda: SceneSpec((("red", "blob", 1),)),
        lambda: SceneSpec((("red", "circle", 1), ("red", "circle", 1))),
        lambda: SceneSpec((("red", "circle", 1),), Relation(("red", "circle"), "above", ("blue", "square"))),
        lambda: Relation(("red", "circle"), "near", ("blue", "square")),
        lambda: Relation(("red", "circle"), "above", ("red", "circle")),
    ]:
        with pytest.raises(ValueError):
            bad()


# --- detector ----------------------------------------------------------------------------------


def test_detector_reads_ground_truth_renders_exactly(samples):
    test = samples["test"]
    correct = sizes = 0
    for sample in test:
        detections = detect_objects(sample.image)
        correct += reads_exactly(detections, sample)
        by_box = {d.bbox: d for d in detections}
        sizes += all(
            o.bbox in by_box
            and by_box[o.bbox].size == o.size
            and by_box[o.bbox].centroid == pytest.approx(o.centroid)
            for o in sample.objects
        )
    print(f"detector on {len(test)} clean renders: {correct / len(test):.4f} exact, ", end="")
    print(f"{sizes / len(test):.4f} with boxes, centroids and sizes")
    assert correct / len(test) >= 0.99, f"seed {FRESH_SEED}"
    assert sizes / len(test) >= 0.99, f"seed {FRESH_SEED}"


def test_detector_is_robust_to_blur_and_noise(samples):
    test = samples["test"][:1000]
    generator = torch.Generator().manual_seed(FRESH_SEED)
    clean = torch.stack([s.image for s in test]).float()
    noisy = gaussian_blur(clean, kernel_size=5, sigma=0.8) + 10 * torch.randn(
        clean.shape, generator=generator
    )
    noisy = noisy.round().clamp(0, 255).to(torch.uint8)
    accuracy = sum(reads_exactly(detect_objects(x), s) for x, s in zip(noisy, test)) / len(test)
    print(f"detector on {len(test)} blurred (sigma 0.8) + noisy (sigma 10) renders: {accuracy:.4f}")
    assert accuracy >= 0.95, f"seed {FRESH_SEED}"


def test_detector_accepts_both_layouts_and_rejects_other_input(samples):
    image = samples["test"][0].image
    assert detect_objects(image) == detect_objects(image.permute(1, 2, 0).numpy())
    assert detect_objects(torch.full((3, 64, 64), 255, dtype=torch.uint8)) == []
    with pytest.raises(ValueError, match="uint8"):
        detect_objects(image.float())
    with pytest.raises(ValueError, match="uint8"):
        detect_objects(image[0])


def test_detector_ignores_pixel_noise_and_flags_unknown_blobs():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        noise = torch.randint(0, 256, (3, 64, 64), generator=generator, dtype=torch.uint8)
        assert scene_from_detections(detect_objects(noise)).num_objects == 0
    bar = np.full((64, 64, 3), 255, dtype=np.uint8)
    bar[20:26, 10:40] = COLOURS["red"]
    (detection,) = detect_objects(bar)
    assert detection.shape == UNKNOWN_SHAPE and detection.colour == "red"
    assert scene_from_detections([detection]).num_objects == 0


def test_connected_components_are_four_connected_per_label():
    labels = np.array(
        [
            [1, 0, 1, 0, 2],
            [1, 0, 1, 0, 0],
            [1, 1, 1, 0, 2],
            [0, 0, 0, 1, 0],
        ]
    )
    rows, starts, ends, run_labels, components = label_runs(labels)
    pixels = {
        (int(r), c): int(k) for r, s, e, k in zip(rows, starts, ends, components) for c in range(s, e + 1)
    }
    assert pixels[(0, 0)] == pixels[(0, 2)] == pixels[(2, 1)]  # the U joins at its bottom row
    assert len({pixels[(0, 0)], pixels[(3, 3)], pixels[(0, 4)], pixels[(2, 4)]}) == 4  # diagonal != touching
    assert components.max() == 3 and set(run_labels.tolist()) == {1, 2}
