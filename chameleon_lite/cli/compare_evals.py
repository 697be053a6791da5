"""Compare `chameleon-eval` results over runs: mean, min and max of each group (e.g. seeds of one setting).

    python -m chameleon_lite.cli.compare_evals -g loss_on=all 'runs/r21_*/eval/cap_val' \\
        -g loss_on=no_prompt_text 'runs/r22_*/eval/cap_val' 'runs/r23_*/eval/cap_val' [--per-category]

Each ``-g LABEL PATTERN...`` is one group: globs of result files (``caption.json``, ``geneval.json``) or
of the eval directories holding one (a label given twice adds to its group). Prints a Markdown table
with one row per group: the number of runs and the headline metric (GenEval accuracy, caption exact
match) overall, on seen and on held-out colour-shape pairs, as mean (min-max), and the standard error of
one eval's overall figure (mean over the group's runs; sampling noise and the draw of prompts). A group must hold one
task on one split under one protocol (the ``settings`` and ``data`` recorded in each JSON): otherwise
the error names the files that differ, since their figures would not be comparable.

``--paired`` (two groups evaluated on the same prompts / images: same task, split and world; their settings
may differ, e.g. two CFG scales) adds the difference of the two groups, overall / seen / held-out, with the
standard error of that paired difference: the draws' difficulty cancels, so it is usually well below the
s.e. of one eval, and a setting can be chosen on differences one eval's noise would hide.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
from pathlib import Path
from typing import Any

#: The column with the mean standard error of one eval's overall figure.
STDERR_HEADER = "s.e. of one eval"  # (older results: recomputed from their records)
#: task -> (metric in the summary, its name in the table)
METRICS = {"geneval": ("accuracy", "GenEval accuracy"), "caption": ("exact", "caption exact match")}


def _result_files(pattern: str) -> list[Path]:
    files = []
    for hit in sorted(glob.glob(pattern)):
        path = Path(hit)
        if path.is_dir():
            found = [path / f"{task}.json" for task in METRICS if (path / f"{task}.json").is_file()]
            if len(found) != 1:
                raise SystemExit(f"{path}: expected one of {', '.join(f'{t}.json' for t in METRICS)} in the "
                                 f"directory, found {len(found)}")
            path = found[0]
        elif path.suffix != ".json":  # an eval directory's grid or table beside its result ('.../cap_val/*')
            continue
        files.append(path)
    if not files:
        raise SystemExit(f"{pattern!r} matches no eval result: give a glob of caption.json / geneval.json "
                         "files or of the eval directories holding them")
    return files


def load_groups(specs: list[list[str]]) -> dict[str, list[tuple[Path, dict[str, Any]]]]:
    """``[LABEL, PATTERN, ...]`` lists -> label -> [(file, result JSON)], in the order the labels first appear
    (a file matched twice within a group counts once)."""
    groups: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
    for label, *patterns in specs:
        if not patterns:
            raise SystemExit(f"-g {label}: give the group's label, then its patterns, e.g. "
                             "-g seeds 'runs/r2*/eval/cap_val'")
        group = groups.setdefault(label, [])
        for pattern in patterns:
            for path in _result_files(pattern):
                if any(path.resolve() == seen.resolve() for seen, _ in group):
                    continue
                try:
                    result = json.loads(path.read_text())
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    raise SystemExit(f"{path}: not a chameleon-eval result ({err}); narrow the pattern") from None
                if not isinstance(result, dict) or not {"task", "summary"} <= result.keys():
                    raise SystemExit(f"{path}: not a chameleon-eval result (no task and summary); narrow the pattern")
                group.append((path, result))
    return groups


PROTOCOL = ("task", "split", "settings", "data")


def check_protocol(label: str, runs: list[tuple[Path, dict[str, Any]]]) -> list[Path]:
    """Raise naming two files of the group that differ in one of `PROTOCOL` (each key compared over the
    files that record it); returns the files that record no split / settings (results written before
    chameleon-eval recorded its protocol), whose protocol could not be checked."""
    for key in PROTOCOL:
        having = [(path, result[key]) for path, result in runs if key in result]
        for path, value in having[1:]:
            if value != having[0][1]:
                raise SystemExit(f"group {label!r}: {path} and {having[0][0]} differ in {key}; compare runs "
                                 "evaluated the same way (or give them different labels)")
    return [path for path, result in runs if "split" not in result or "settings" not in result]


def _stderr(result: dict[str, Any], metric: str) -> float | None:
    """The standard error of a result's overall figure: recorded since 2026-11-24, recomputed from the
    per-record scores of older results (`aggregate` on the same records and clusters)."""
    from chameleon_lite.eval.scoring import CLUSTER_OF_TASK, aggregate

    recorded = result["summary"].get("stderr", {}).get("overall", {}).get(metric)
    if recorded is not None or not result.get("records"):
        return recorded
    return aggregate(result["records"], cluster=CLUSTER_OF_TASK[result["task"]])["stderr"]["overall"].get(metric)


def summarise(label: str, runs: list[tuple[Path, dict[str, Any]]], per_category: bool = False) -> dict[str, Any]:
    """One table row: mean (min-max) of the task's metric, overall / seen / held-out (and per category);
    a cell that only some runs have says how many."""
    first_path, first = runs[0]
    unchecked = check_protocol(label, runs)
    if unchecked:
        print(f"note: group {label!r}: {len(unchecked)} result(s) record no split/settings (written before "
              f"chameleon-eval recorded them), so their protocol was not checked: "
              f"{', '.join(map(str, unchecked))}", file=sys.stderr)
    task = first["task"]
    if task not in METRICS:
        raise SystemExit(f"{first_path}: task={task!r} has no headline metric here; compare "
                         f"{', '.join(METRICS)} results")
    metric = METRICS[task][0]
    summaries = [result["summary"] for _, result in runs]
    parts = {"overall": "overall", "seen": "seen", "held-out": "heldout"}
    if per_category:
        parts.update({cat: cat for s in summaries for cat in s.get("per_category", {})})
    split = next((result["split"] for _, result in runs if "split" in result), "?")
    row = {"group": label, "runs": len(runs), "task": task, "split": split}
    for column, key in parts.items():
        values = [s.get("per_category", {}).get(key, s.get(key, {})).get(metric) for s in summaries]
        values = [v for v in values if v is not None]
        cell = "-" if not values else (
            f"{values[0]:.3f}" if len(values) == 1 else
            f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})")
        row[column] = cell if len(values) in (0, len(runs)) else f"{cell} [{len(values)} of {len(runs)} runs]"
    errors = [_stderr(result, metric) for _, result in runs]
    errors = [e for e in errors if e is not None]
    if errors:  # what one eval's figure is worth: differences well inside it are noise
        row[STDERR_HEADER] = f"{statistics.mean(errors):.3f}" + ("" if len(errors) == len(runs) else
                                                                 f" [{len(errors)} of {len(runs)} runs]")
    return row


#: task -> the record field scored and the draw a record belongs to (`paired_difference`'s unit)
PAIRING = {"geneval": ("correct", lambda index, record: record["prompt"]),
           "caption": ("exact", lambda index, record: (index, record["truth"]))}


def paired_table(groups: dict[str, list[tuple[Path, dict[str, Any]]]]) -> str:
    """The two groups' paired difference (first minus second) as a one-row Markdown table."""
    from chameleon_lite.eval.report import markdown_table
    from chameleon_lite.eval.scoring import paired_difference

    if len(groups) != 2:
        raise SystemExit(f"--paired compares two groups, got {len(groups)}: give exactly two -g LABEL PATTERN...")
    (label_a, runs_a), (label_b, runs_b) = groups.items()
    for label, runs in groups.items():
        check_protocol(label, runs)
    both = runs_a + runs_b
    for key in ("task", "split", "data"):
        values = {json.dumps(result[key], sort_keys=True) for _, result in both if key in result}  # older: unrecorded
        if len(values) > 1:
            raise SystemExit(f"--paired: {label_a!r} and {label_b!r} differ in {key}; a paired comparison needs "
                             "both evaluated on the same prompts / images")
    task = runs_a[0][1]["task"]
    if task not in PAIRING:  # (task is recorded by every result)
        raise SystemExit(f"--paired: task={task!r} has no per-draw records to pair; compare {', '.join(PAIRING)}")
    for path, result in both:
        if not result.get("records"):
            raise SystemExit(f"--paired: {path} holds no per-record results; re-run its eval")
    metric, unit = PAIRING[task]
    try:
        diff = paired_difference([r["records"] for _, r in runs_a], [r["records"] for _, r in runs_b], metric, unit)
    except ValueError as err:
        raise SystemExit(f"--paired {label_a!r} vs {label_b!r}: {err}") from None
    row = {"paired difference": f"{label_a} - {label_b}"}
    for column, part in (("overall", "overall"), ("seen", "seen"), ("held-out", "heldout")):
        row[column] = "-" if part not in diff else f"{diff[part]['diff']:+.3f} (s.e. {diff[part]['stderr']:.3f})"
    return markdown_table([row], list(row))


def comparison_table(groups: dict[str, list[tuple[Path, dict[str, Any]]]], per_category: bool = False) -> str:
    from chameleon_lite.eval.report import markdown_table

    rows = [summarise(label, runs, per_category) for label, runs in groups.items()]
    columns = list(rows[0])
    for row in rows[1:]:
        columns += [c for c in row if c not in columns]
    return markdown_table(rows, columns)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-g", "--group", dest="groups", action="append", nargs="+", required=True,
                        metavar="LABEL PATTERN", help="a group: its label, then globs of its results")
    parser.add_argument("--per-category", action="store_true", help="also a column per category")
    parser.add_argument("--paired", action="store_true",
                        help="also the paired difference of two groups evaluated on the same prompts / images")
    args = parser.parse_args(argv)
    groups = load_groups(args.groups)
    table = comparison_table(groups, args.per_category)
    if args.paired:
        table += "\n" + paired_table(groups)
    print(table)
    return table


if __name__ == "__main__":
    main()
