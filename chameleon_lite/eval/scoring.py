"""Pure scoring rules on the shapes world: text-to-image (GenEval-style) and captioning.

Everything here is a function of its arguments (no model, no I/O), so the eval commands, the
Lightning callbacks and the tests share one definition of "correct".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from chameleon_lite.data.shapes import (
    CaptionParseError,
    SceneSpec,
    ShapesSample,
    detect_objects,
    parse_caption,
    relation_holds,
    scene_from_detections,
)
from chameleon_lite.data.shapes_detect import UNKNOWN_SHAPE


def score_generated_image(image: torch.Tensor | np.ndarray, spec: SceneSpec) -> dict[str, Any]:
    """GenEval-style verdict on an image generated for the prompt `spec`.

    correct iff the detector finds exactly the prompt's objects - each (colour, shape) with its
    count, nothing else, no unrecognisable blob - and the prompt's relation, if any, holds
    between the detected objects (`relation_holds`). Returns
    {"correct": bool, "objects_ok": bool, "relation_ok": bool | None (None: no relation stated),
     "reasons": list[str] (empty when correct), "detected": SceneSpec.to_dict() of the detections}.
    image: uint8 (3, H, W) or (H, W, 3).
    """
    detections = detect_objects(image)
    detected = scene_from_detections(detections)
    reasons = []
    found, wanted = detected.counts(), spec.counts()
    for key in sorted(set(found) | set(wanted)):
        if found.get(key, 0) != wanted.get(key, 0):
            reasons.append(f"{key.describe()}: expected {wanted.get(key, 0)}, found {found.get(key, 0)}")
    unknown = [d for d in detections if d.shape == UNKNOWN_SHAPE]
    if unknown:
        reasons.append(f"{len(unknown)} object(s) of no known shape: {sorted(d.colour for d in unknown)}")
    objects_ok = not reasons
    relation_ok = None
    if spec.relation is not None:
        relation_ok = relation_holds(detections, spec.relation)
        if not relation_ok:
            reasons.append(f"relation {spec.relation.describe()!r} does not hold")
    return {
        "correct": not reasons,
        "objects_ok": objects_ok,
        "relation_ok": relation_ok,
        "reasons": reasons,
        "detected": detected.to_dict(),
    }


def score_caption(predicted_caption: str, sample: ShapesSample) -> dict[str, bool | None]:
    """Captioning verdict: does `predicted_caption` describe `sample`'s scene?

    Rule: the predicted caption is parsed with `parse_caption`; let P be its spec and T the scene's.
      exact    - P's objects (colour, shape, count multiset) equal T's, and P's relation holds for
                 the true objects (`relation_holds` on `sample.objects`; a mirrored wording counts).
                 P must state a relation where T does (a scene of the position category is not
                 described exactly by "a red circle and a blue square"); where T states none, P may
                 state one, and it must hold;
      shape    - P names exactly the set of shapes in the scene;
      colour   - P names exactly the set of colours in the scene;
      count    - P's total number of objects equals the scene's;
      relation - only where the ground-truth caption states a relation (else None): P states a
                 relation and it holds for the true objects.
    An unparseable caption scores False on everything that is counted (relation stays None where
    not counted). Also returns "parsed": bool.
    """
    truth = sample.spec
    relation_counted = truth.relation is not None
    try:
        predicted = parse_caption(predicted_caption)
    except CaptionParseError:
        return {
            "parsed": False,
            "exact": False,
            "shape": False,
            "colour": False,
            "count": False,
            "relation": False if relation_counted else None,
        }
    predicted_relation_ok = predicted.relation is not None and relation_holds(
        sample.objects, predicted.relation
    )
    return {
        "parsed": True,
        "exact": predicted.objects == truth.objects and (
            predicted_relation_ok if (relation_counted or predicted.relation is not None) else True
        ),
        "shape": {e.shape for e in predicted.objects} == {e.shape for e in truth.objects},
        "colour": {e.colour for e in predicted.objects} == {e.colour for e in truth.objects},
        "count": predicted.num_objects == truth.num_objects,
        "relation": predicted_relation_ok if relation_counted else None,
    }


#: task -> the record field whose equal values are one draw for `aggregate`'s standard errors (GenEval: the
#: images of one prompt; captions: every image is its own draw).
CLUSTER_OF_TASK: dict[str, str | None] = {"geneval": "prompt", "caption": None}


def _residuals(clusters: Mapping[Any, Sequence[int]]) -> dict[Any, float]:
    """cluster -> its share of a pooled accuracy's error, (hits_k - acc n_k) / N (the linearised ratio)."""
    n_total = sum(n for _, n in clusters.values())
    acc = sum(hits for hits, _ in clusters.values()) / n_total
    return {unit: (hits - acc * n) / n_total for unit, (hits, n) in clusters.items()}


def _stderr_of_mean_over_groups(cells: Mapping[str, Mapping[Any, Sequence[int]]],
                                against: Mapping[str, Mapping[Any, Sequence[int]]] | None = None) -> float:
    """Standard error of (1/G) sum_g acc_g, where group g's accuracy acc_g = sum_k hits_gk / sum_k n_gk pools
    its clusters k (records that share a cluster, e.g. the images drawn for one prompt, are not independent).
    Per group, the linearised variance of that ratio over clusters: K/(K-1) sum_k (hits_k - acc n_k)^2 / N^2;
    a group of one cluster, whose spread cannot be estimated, counts the largest variance a [0, 1] mean can
    have (1/4). Groups are independent; the result is sqrt(sum_g var_g) / G.

    `against` (the same groups and clusters, e.g. another model on the same prompts): the standard error of
    the paired difference (1/G) sum_g (acc_g - acc'_g), each cluster's term the difference of its two
    residuals (one cluster: the largest variance of a difference, 1)."""
    variance = 0.0
    for group, clusters in cells.items():
        residuals = _residuals(clusters)
        if against is not None:
            other = _residuals(against[group])
            residuals = {unit: r - other[unit] for unit, r in residuals.items()}
        if len(residuals) < 2:
            variance += 0.25 if against is None else 1.0
            continue
        z = np.array(list(residuals.values()))
        variance += len(z) / (len(z) - 1) * float((z ** 2).sum())
    return float(np.sqrt(variance)) / len(cells)


def paired_difference(runs_a: Sequence[Sequence[Mapping[str, Any]]], runs_b: Sequence[Sequence[Mapping[str, Any]]],
                      metric: str, unit: Callable[[int, Mapping[str, Any]], Any],
                      key: str = "category") -> dict[str, dict[str, float]]:
    """Paired comparison of two sets of results scored on the same draws (prompts or images).

    runs_a / runs_b: the records of one or more evals each (e.g. the seeds of two settings); a side's records
    of one draw are pooled over its runs. `metric`: the record field scored ("correct", "exact"; records
    holding None are not counted). `unit(index, record)`: the draw a record belongs to (GenEval: its prompt;
    captions: its image). Both sides must hold the same draws per `key` value, else ValueError.
    Returns {"overall" | "seen" | "heldout": {"a", "b": `aggregate`'s category-weighted mean of each side,
    "diff": a - b, "stderr": the standard error of diff over draws}} ("heldout" / "seen" only where
    present). Sharing the draws removes their difficulty from the comparison, so diff's standard error is
    usually well below the two evals' own errors combined; it does not count seed-to-seed variation of the
    models beyond what the pooled runs show."""
    def cells(runs: Sequence[Sequence[Mapping[str, Any]]], heldout: bool | None) -> dict[str, dict[Any, list[int]]]:
        out: dict[str, dict[Any, list[int]]] = {}
        for records in runs:
            for index, record in enumerate(records):
                if record.get(metric) is None or (heldout is not None and bool(record.get("heldout")) != heldout):
                    continue
                cell = out.setdefault(str(record[key]), {}).setdefault(unit(index, record), [0, 0])
                cell[0] += bool(record[metric])
                cell[1] += 1
        return out

    result = {}
    for part, heldout in (("overall", None), ("seen", False), ("heldout", True)):
        a, b = cells(runs_a, heldout), cells(runs_b, heldout)
        if not a and not b:
            continue
        for group in sorted(set(a) | set(b)):
            if set(a.get(group, {})) != set(b.get(group, {})):
                missing = len(set(a.get(group, {})) ^ set(b.get(group, {})))
                raise ValueError(f"{key} {group!r}: {missing} draw(s) scored on one side only; a paired "
                                 "comparison needs both sides evaluated on the same prompts / images (same "
                                 "split, number and seed of the drawn prompts)")
        mean_a, mean_b = (float(np.mean([sum(h for h, _ in c.values()) / sum(n for _, n in c.values())
                                         for c in side.values()])) for side in (a, b))
        result[part] = {"a": mean_a, "b": mean_b, "diff": mean_a - mean_b,
                        "stderr": _stderr_of_mean_over_groups(a, against=b)}
    return result


def aggregate(records: Iterable[Mapping[str, Any]], key: str = "category",
              cluster: str | None = None) -> dict[str, Any]:
    """Accuracies of every boolean field of `records`, per value of `key` and overall, with standard errors.

    Metrics are the fields holding a bool, other than `key` and "heldout"; "correct" (from
    `score_generated_image`) is reported as "accuracy". A record lacking a metric, or holding None
    for it (e.g. "relation" outside position prompts), is not counted for that metric. Returns
      {f"per_{key}": {value: {"n": records, metric: accuracy, ...}},   (values sorted)
       "overall": {"n": records, metric: mean over the `key` values that count it, ...},
       "heldout": {...}, "seen": {...}}   (the same as "overall", restricted to records whose
                                           "heldout" is truthy / falsy; just {"n": 0} when empty)
    "overall" weighs every `key` value (category) equally, GenEval's convention.
    "stderr": {"overall" | "heldout" | "seen": {metric: standard error of that mean}}: how far a re-run with
    fresh samples (and prompts drawn afresh from the same world) would typically land. `cluster` names the
    field whose equal values are one draw (geneval: "prompt", its images share it); None: every record is one.
    """
    records = list(records)

    def summarise(subset: list[Mapping[str, Any]]) -> tuple[dict[str, dict[str, Any]], dict[str, Any],
                                                             dict[str, float]]:
        hits: dict[str, Counter[str]] = {}
        totals: dict[str, Counter[str]] = {}
        sizes: Counter[str] = Counter()
        cells: dict[str, dict[str, dict[Any, list[int]]]] = {}  # metric -> group -> cluster -> [hits, n]
        for index, record in enumerate(subset):
            group = str(record[key])
            sizes[group] += 1
            for field, value in record.items():
                if isinstance(value, bool) and field not in (key, "heldout"):
                    metric = "accuracy" if field == "correct" else field
                    hits.setdefault(group, Counter())[metric] += value
                    totals.setdefault(group, Counter())[metric] += 1
                    unit = record[cluster] if cluster is not None else index
                    cell = cells.setdefault(metric, {}).setdefault(group, {}).setdefault(unit, [0, 0])
                    cell[0] += value
                    cell[1] += 1
        groups = {
            group: {
                "n": sizes[group],
                **{m: hits[group][m] / t for m, t in sorted(totals.get(group, {}).items())},
            }
            for group in sorted(sizes)
        }
        overall: dict[str, Any] = {"n": len(subset)}
        for metric in sorted({m for stats in groups.values() for m in stats if m != "n"}):
            values = [stats[metric] for stats in groups.values() if metric in stats]
            overall[metric] = sum(values) / len(values)
        stderr = {metric: _stderr_of_mean_over_groups(by_group) for metric, by_group in sorted(cells.items())}
        return groups, overall, stderr

    groups, overall, stderr = summarise(records)
    heldout = summarise([r for r in records if r.get("heldout")])
    seen = summarise([r for r in records if not r.get("heldout")])
    return {
        f"per_{key}": groups,
        "overall": overall,
        "heldout": heldout[1],
        "seen": seen[1],
        "stderr": {"overall": stderr, "heldout": heldout[2], "seen": seen[2]},
    }
