"""Scoring rules: ground truth scores ~1, mismatches ~0, per-attribute rules, aggregation."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from chameleon_lite.data.shapes import COLOURS, Relation, SceneSpec, ShapesSample, ShapesWorld, render_caption
from chameleon_lite.eval.report import category_rows
from chameleon_lite.eval.scoring import aggregate, paired_difference, score_caption, score_generated_image

FRESH_SEED = random.SystemRandom().randrange(2**31)


@pytest.fixture(scope="module")
def test_samples() -> list[ShapesSample]:
    world = ShapesWorld(seed=FRESH_SEED, split="test")
    return [world[i] for i in range(600)]


@pytest.fixture(scope="module")
def derangement(test_samples) -> list[int]:
    """A pairing of every sample with another one (never itself)."""
    order = list(range(len(test_samples)))
    random.Random(FRESH_SEED).shuffle(order)
    return order[1:] + order[:1]


def records(samples, scores) -> list[dict]:
    return [{"category": s.category, "heldout": s.heldout, **score} for s, score in zip(samples, scores)]


def test_ground_truth_renders_score_correct(test_samples):
    summary = aggregate(records(test_samples, [score_generated_image(s.image, s.spec) for s in test_samples]))
    print(f"T2I scorer on {len(test_samples)} ground-truth renders: {summary['overall']['accuracy']:.4f}")
    assert summary["overall"]["accuracy"] >= 0.99, f"seed {FRESH_SEED}"
    assert summary["heldout"]["n"] > 0 and summary["heldout"]["accuracy"] >= 0.99


def test_mismatched_images_score_near_zero(test_samples, derangement):
    shuffled = [
        score_generated_image(s.image, test_samples[j].spec) for s, j in zip(test_samples, derangement)
    ]
    accuracy = aggregate(records(test_samples, shuffled))["overall"]["accuracy"]
    generator = torch.Generator().manual_seed(FRESH_SEED)
    noise = [torch.randint(0, 256, (3, 64, 64), generator=generator, dtype=torch.uint8) for _ in range(100)]
    noise_accuracy = np.mean(
        [score_generated_image(x, s.spec)["correct"] for x, s in zip(noise, test_samples)]
    )
    print(f"T2I scorer: shuffled specs {accuracy:.4f}, random-noise images {noise_accuracy:.4f}")
    assert accuracy < 0.1 and noise_accuracy < 0.1, f"seed {FRESH_SEED}"


def test_image_verdict_says_why(test_samples):
    position = next(s for s in test_samples if s.category == "position")
    rel = position.spec.relation
    flipped = SceneSpec(position.spec.objects, Relation(rel.obj, rel.rel, rel.subject))
    verdict = score_generated_image(position.image, flipped)
    assert verdict["objects_ok"] and verdict["relation_ok"] is False and not verdict["correct"]
    assert "does not hold" in verdict["reasons"][0]

    blank = torch.full((3, 64, 64), 255, dtype=torch.uint8)
    verdict = score_generated_image(blank, SceneSpec((("red", "circle", 2),)))
    assert verdict["reasons"] == ["red circle: expected 2, found 0"] and verdict["relation_ok"] is None

    pair = next(s for s in test_samples if s.category == "colour_attribution")
    first = pair.spec.objects[0]
    verdict = score_generated_image(pair.image, SceneSpec((first,)))
    assert not verdict["correct"] and "expected 0, found 1" in verdict["reasons"][0]

    bar = np.full((64, 64, 3), 255, dtype=np.uint8)
    bar[20:26, 10:40] = COLOURS["red"]
    verdict = score_generated_image(bar, SceneSpec((("red", "square", 1),)))
    assert not verdict["correct"] and any("no known shape" in r for r in verdict["reasons"])


def test_caption_scorer_is_perfect_on_truth_and_low_on_shuffled_captions(test_samples, derangement):
    rng = np.random.default_rng(FRESH_SEED)
    truth = [score_caption(s.caption, s) for s in test_samples]
    rephrased = [score_caption(render_caption(s.spec, rng), s) for s in test_samples]
    for field in ("exact", "shape", "colour", "count", "relation"):
        assert aggregate(records(test_samples, truth))["overall"][field] == 1.0
        assert aggregate(records(test_samples, rephrased))["overall"][field] == 1.0
    shuffled = [score_caption(test_samples[j].caption, s) for s, j in zip(test_samples, derangement)]
    exact = aggregate(records(test_samples, shuffled))["overall"]["exact"]
    print(f"caption scorer on shuffled captions: exact {exact:.4f}")
    assert exact < 0.2, f"seed {FRESH_SEED}"


def test_caption_scorer_attributes(test_samples):
    sample = next(s for s in test_samples if s.category == "position")
    rel = sample.spec.relation
    (c1, s1), (c2, s2) = rel.subject, rel.obj
    other_colour = next(c for c in COLOURS if c not in (c1, c2))
    wording = "left of" if rel.rel == "left of" else "above"
    mirror = "right of" if rel.rel == "left of" else "below"

    def score(text: str) -> dict:
        return score_caption(text, sample)

    assert score(f"a {c2} {s2} is {mirror} a {c1} {s1}") == {
        "parsed": True,
        "exact": True,
        "shape": True,
        "colour": True,
        "count": True,
        "relation": True,
    }
    wrong_relation = score(f"a {c2} {s2} {wording} a {c1} {s1}")
    assert not wrong_relation["exact"] and wrong_relation["relation"] is False and wrong_relation["shape"]
    wrong_colour = score(f"a {other_colour} {s1} {wording} a {c2} {s2}")
    assert (
        not wrong_colour["exact"]
        and not wrong_colour["colour"]
        and wrong_colour["shape"]
        and wrong_colour["count"]
    )
    no_relation = score(f"a {c1} {s1} and a {c2} {s2}")  # right objects, the scene's relation not stated
    assert not no_relation["exact"] and no_relation["relation"] is False and no_relation["shape"]
    two = next(s for s in test_samples if s.category == "two_objects" and len({o.key for o in s.objects}) == 2)
    assert score_caption(two.caption, two)["exact"]  # no relation in the truth: none needed
    left, right = sorted(two.objects, key=lambda o: o.centroid[0])
    false_rel = f"a {right.colour} {right.shape} left of a {left.colour} {left.shape}"
    assert not score_caption(false_rel, two)["exact"]  # a relation the truth does not state must still hold
    assert score(f"two {c1} {s1}s") == {
        "parsed": True,
        "exact": False,
        "shape": False,
        "colour": False,
        "count": True,
        "relation": False,
    }
    assert score("a red blob") == {
        "parsed": False,
        "exact": False,
        "shape": False,
        "colour": False,
        "count": False,
        "relation": False,
    }
    single = next(s for s in test_samples if s.category == "single_object")
    assert score_caption("???", single)["relation"] is None


def test_aggregate_weighs_categories_equally_and_splits_heldout():
    rows = (
        [{"category": "counting", "heldout": False, "correct": True}] * 9
        + [{"category": "counting", "heldout": True, "correct": False}]
        + [{"category": "position", "heldout": False, "correct": False, "relation": None, "note": "x"}]
    )
    summary = aggregate(rows)
    assert summary["per_category"] == {
        "counting": {"n": 10, "accuracy": 0.9},
        "position": {"n": 1, "accuracy": 0.0},
    }
    assert summary["overall"] == {
        "n": 11,
        "accuracy": pytest.approx(0.45),
    }  # not 9/11: categories count equally
    assert summary["heldout"] == {"n": 1, "accuracy": 0.0}
    assert summary["seen"] == {"n": 10, "accuracy": 0.5}  # counting 9/9, position 0/1
    rows_of_table = category_rows(summary, ["accuracy"])
    assert [r["category"] for r in rows_of_table] == ["counting", "position", "**overall**", "seen pairs",
                                                      "held-out pairs"]
    assert rows_of_table[-1] == {"category": "held-out pairs", "n": 1, "accuracy": 0.0, "s.e.": 0.5}  # 1 record
    assert "s.e." not in rows_of_table[0]  # per-category rows carry none
    no_heldout = aggregate(rows[:9])
    assert [r["category"] for r in category_rows(no_heldout, ["accuracy"])] == ["counting", "**overall**"]
    partial = aggregate([{"kind": "a", "relation": True}, {"kind": "b", "relation": None}], key="kind")
    assert partial["per_kind"] == {"a": {"n": 1, "relation": 1.0}, "b": {"n": 1}}
    assert partial["overall"] == {"n": 2, "relation": 1.0} and partial["heldout"] == {"n": 0}


def test_stderr_counts_a_prompts_images_as_one_draw():
    rows = ([{"category": "a", "heldout": False, "correct": True, "prompt": "p1"}] * 3
            + [{"category": "a", "heldout": False, "correct": False, "prompt": "p2"}] * 3)
    # two prompts that disagree completely: the accuracy 0.5 could as well have been 0 or 1
    assert aggregate(rows, cluster="prompt")["stderr"]["overall"]["accuracy"] == pytest.approx(0.5)
    # six independent images: sqrt(6/5 * 6 * 0.25 / 36)
    assert aggregate(rows)["stderr"]["overall"]["accuracy"] == pytest.approx((6 / 5 * 1.5 / 36) ** 0.5)
    single = aggregate(rows[:3] + [{"category": "b", "heldout": True, "correct": True, "prompt": "p3"}],
                       cluster="prompt")
    assert single["stderr"]["heldout"]["accuracy"] == pytest.approx(0.5)  # one prompt: the largest variance, 1/4


def test_stderr_matches_the_spread_of_repeated_evals():
    """Re-run a simulated GenEval (6 categories x 20 prompts x 4 images, prompts of varying difficulty drawn
    afresh each time) 300 times: the mean reported standard error is the spread of the overall figure."""
    rng = np.random.default_rng(0)
    overall, reported = [], []
    for _ in range(300):
        rows = []
        for c in range(6):
            for p in range(20):
                q = rng.beta(2.0, 1.0)  # this prompt's chance of a correct image
                rows += [{"category": str(c), "heldout": False, "correct": bool(rng.random() < q), "prompt": f"{c}-{p}"}
                         for _ in range(4)]
        summary = aggregate(rows, cluster="prompt")
        overall.append(summary["overall"]["accuracy"])
        reported.append(summary["stderr"]["overall"]["accuracy"])
    assert 0.85 < np.mean(reported) / np.std(overall) < 1.15
    # counting the 4 images of a prompt as independent understates it
    naive = [aggregate([dict(r, prompt=k) for k, r in enumerate(rows)], cluster="prompt")]
    assert naive[0]["stderr"]["overall"]["accuracy"] < 0.9 * np.mean(reported)


def _simulated_geneval(rng, difficulty, shift: float = 0.0) -> list[dict]:
    """6 categories x 20 prompts x 4 images; prompt p's chance of a correct image is difficulty[c, p] + shift."""
    return [{"category": str(c), "heldout": p < 5, "correct": bool(rng.random() < difficulty[c, p] + shift),
             "prompt": f"{c}-{p}"} for c in range(6) for p in range(20) for _ in range(4)]


def test_paired_difference_is_the_difference_of_the_aggregates():
    rng = np.random.default_rng(1)
    difficulty = rng.beta(2.0, 1.0, size=(6, 20)) * 0.8
    a, b = _simulated_geneval(rng, difficulty, 0.1), _simulated_geneval(rng, difficulty)
    diff = paired_difference([a], [b], "correct", lambda i, r: r["prompt"])
    for part in ("overall", "seen", "heldout"):
        expected = aggregate(a)[part]["accuracy"] - aggregate(b)[part]["accuracy"]
        assert diff[part]["diff"] == pytest.approx(expected)
    assert paired_difference([a], [a], "correct", lambda i, r: r["prompt"])["overall"]["stderr"] == 0.0
    # two runs per side pool per prompt: the mean of the runs' figures (equal images per prompt)
    two = paired_difference([a, b], [b, b], "correct", lambda i, r: r["prompt"])["overall"]
    assert two["a"] == pytest.approx((aggregate(a)["overall"]["accuracy"] + aggregate(b)["overall"]["accuracy"]) / 2)
    with pytest.raises(ValueError, match="same prompts"):
        paired_difference([a], [[dict(r, prompt=r["prompt"] + "x") if r["category"] == "3" else r for r in b]],
                          "correct", lambda i, r: r["prompt"])


def test_paired_stderr_matches_the_spread_of_repeated_comparisons():
    """Two models on the same freshly drawn prompts, 300 times: the reported paired s.e. is the spread of the
    difference, and well below what two independent evals' errors would add up to."""
    rng = np.random.default_rng(2)
    diffs, reported, unpaired = [], [], []
    for _ in range(300):
        difficulty = rng.beta(2.0, 1.0, size=(6, 20)) * 0.85
        a, b = _simulated_geneval(rng, difficulty, 0.05), _simulated_geneval(rng, difficulty)
        result = paired_difference([a], [b], "correct", lambda i, r: r["prompt"])["overall"]
        diffs.append(result["diff"])
        reported.append(result["stderr"])
        unpaired.append(np.hypot(aggregate(a, cluster="prompt")["stderr"]["overall"]["accuracy"],
                                 aggregate(b, cluster="prompt")["stderr"]["overall"]["accuracy"]))
    assert 0.85 < np.mean(reported) / np.std(diffs) < 1.15
    assert np.mean(reported) < 0.75 * np.mean(unpaired)
