"""compare_evals: mean (min-max) per group of eval results, refusing groups evaluated differently."""

from __future__ import annotations

import json

import pytest

from chameleon_lite.cli.compare_evals import main
from chameleon_lite.eval.report import write_report


def _write(directory, exact: float, heldout: float, *, split: str = "val", rounds: int = 3) -> None:
    summary = {"per_category": {"single_object": {"n": 4, "exact": exact}},
               "overall": {"n": 4, "exact": exact}, "seen": {"n": 3, "exact": exact + 0.1},
               "heldout": {"n": 1, "exact": heldout}}
    result = {"task": "caption", "ckpt": str(directory), "split": split, "settings": {"scene_search": {"rounds": rounds}},
              "data": {"holdout_pairs": [["red", "triangle"]]}, "summary": summary, "records": []}
    write_report(directory, "caption", result, "")


def test_groups_give_mean_min_max_per_column(tmp_path, capsys):
    for name, exact, held in (("a1", 0.7, 0.1), ("a2", 0.8, 0.3), ("b1", 0.75, 0.4)):
        _write(tmp_path / name / "eval", exact, held)
    table = main(["-g", "A", f"{tmp_path}/a*/eval", "-g", "B", f"{tmp_path}/b1/eval/caption.json", "--per-category"])
    lines = table.splitlines()
    assert lines[0] == "| group | runs | task | split | overall | seen | held-out | single_object |"
    assert lines[2] == "| A | 2 | caption | val | 0.750 (0.700-0.800) | 0.850 (0.800-0.900) | 0.200 (0.100-0.300) | 0.750 (0.700-0.800) |"
    assert lines[3] == "| B | 1 | caption | val | 0.750 | 0.850 | 0.400 | 0.750 |"
    assert table in capsys.readouterr().out


def test_a_group_mixing_protocols_or_splits_is_refused(tmp_path):
    _write(tmp_path / "r1", 0.7, 0.1)
    _write(tmp_path / "r2", 0.8, 0.3, rounds=0)
    _write(tmp_path / "r3", 0.8, 0.3, split="test")
    with pytest.raises(SystemExit, match="differ in settings"):
        main(["-g", "A", f"{tmp_path}/r1", "-g", "A", f"{tmp_path}/r2"])
    with pytest.raises(SystemExit, match="differ in split"):
        main(["-g", "A", f"{tmp_path}/r1", f"{tmp_path}/r3"])


def test_bad_arguments_name_the_fix(tmp_path):
    with pytest.raises(SystemExit, match="matches no eval result"):
        main(["-g", "A", f"{tmp_path}/nothing*"])
    with pytest.raises(SystemExit, match="then its patterns"):
        main(["-g", str(tmp_path)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="expected one of"):
        main(["-g", "A", f"{tmp_path}/empty"])
    other = tmp_path / "other.json"
    other.write_text('{"loss": 1.0}')
    with pytest.raises(SystemExit, match="other.json: not a chameleon-eval result"):
        main(["-g", "A", str(other)])
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\x89PNG\xff\xfe")
    with pytest.raises(SystemExit, match="binary.json: not a chameleon-eval result"):
        main(["-g", "A", str(binary)])


def test_a_glob_over_an_eval_directory_reads_its_result_and_passes_over_its_grid(tmp_path):
    _write(tmp_path / "r1", 0.7, 0.1)
    (tmp_path / "r1" / "caption_examples.png").write_bytes(b"\x89PNG\xff")
    assert "| A | 1 | caption | val | 0.700 |" in main(["-g", "A", f"{tmp_path}/r1/*"])


def test_older_results_are_noted_and_do_not_hide_a_mismatch_among_newer_ones(tmp_path, capsys):
    _write(tmp_path / "old", 0.7, 0.1)
    old = tmp_path / "old" / "caption.json"
    result = json.loads(old.read_text())
    for key in ("split", "settings", "data"):
        del result[key]
    old.write_text(json.dumps(result))
    _write(tmp_path / "n1", 0.8, 0.3)
    _write(tmp_path / "n2", 0.8, 0.3, rounds=0)
    with pytest.raises(SystemExit, match="differ in settings"):
        main(["-g", "A", str(old.parent), f"{tmp_path}/n*"])
    table = main(["-g", "A", str(old.parent), f"{tmp_path}/n1", f"{tmp_path}/n1/caption.json"])
    assert "| A | 2 | caption | val | 0.750 (0.700-0.800) |" in table  # n1 matched twice counts once
    assert f"protocol was not checked: {old}" in capsys.readouterr().err


def test_a_category_only_some_runs_have_says_so(tmp_path):
    _write(tmp_path / "a", 0.7, 0.1)
    _write(tmp_path / "b", 0.9, 0.1)
    path = tmp_path / "b" / "caption.json"
    result = json.loads(path.read_text())
    result["summary"]["per_category"]["counting"] = {"n": 2, "exact": 0.5}
    path.write_text(json.dumps(result))
    table = main(["-g", "A", f"{tmp_path}/a", f"{tmp_path}/b", "--per-category"])
    assert table.splitlines()[2].endswith("| 0.800 (0.700-0.900) | 0.500 [1 of 2 runs] |")


def test_the_stderr_column_is_recorded_or_recomputed_from_older_results_records(tmp_path):
    from chameleon_lite.eval.scoring import aggregate

    records = [{"prompt": f"p{k // 2}", "category": c, "heldout": False, "correct": (k * 7 + len(c)) % 3 > 0}
               for c in ("counting", "position") for k in range(12)]  # 6 prompts x 2 images per category
    summary = aggregate(records, cluster="prompt")
    for name, keep in (("new", True), ("old", False)):
        result = {"task": "geneval", "ckpt": name, "split": "test", "settings": {}, "data": {}, "records": records,
                  "summary": summary if keep else {k: v for k, v in summary.items() if k != "stderr"}}
        write_report(tmp_path / name, "geneval", result, "")
    table = main(["-g", "new", f"{tmp_path}/new", "-g", "old", f"{tmp_path}/old"]).splitlines()
    assert table[0].endswith("| s.e. of one eval |")
    expected = f"{summary['stderr']['overall']['accuracy']:.3f}"
    assert table[2].endswith(f"| {expected} |") and table[3].endswith(f"| {expected} |")


def test_paired_gives_the_difference_on_shared_prompts_and_refuses_what_cannot_pair(tmp_path):
    from chameleon_lite.eval.scoring import aggregate

    def write(name: str, shift: int, split: str = "val", prompts: str = "p") -> None:
        records = [{"prompt": f"{prompts}{c}{k // 2}", "category": c, "heldout": k < 4,
                    "correct": (k * 7 + len(c) + shift) % 3 > 0} for c in ("counting", "position") for k in range(12)]
        write_report(tmp_path / name, "geneval", {"task": "geneval", "ckpt": name, "split": split, "settings": {"s": shift},
                                                  "data": {}, "records": records, "summary": aggregate(records, cluster="prompt")}, "")

    write("a", 0)
    write("b", 1)
    a, b = (json.loads((tmp_path / n / "geneval.json").read_text())["summary"] for n in "ab")
    table = main(["-g", "A", f"{tmp_path}/a", "-g", "B", f"{tmp_path}/b", "--paired"]).splitlines()
    assert table[-3] == "| paired difference | overall | seen | held-out |"
    diff = a["overall"]["accuracy"] - b["overall"]["accuracy"]
    assert table[-1].startswith(f"| A - B | {diff:+.3f} (s.e. ")
    write("c", 0, split="test")
    write("d", 0, prompts="q")
    with pytest.raises(SystemExit, match="differ in split"):
        main(["-g", "A", f"{tmp_path}/a", "-g", "C", f"{tmp_path}/c", "--paired"])
    with pytest.raises(SystemExit, match="scored on one side only"):
        main(["-g", "A", f"{tmp_path}/a", "-g", "D", f"{tmp_path}/d", "--paired"])
    with pytest.raises(SystemExit, match="compares two groups, got 3"):
        main(["-g", "A", f"{tmp_path}/a", "-g", "B", f"{tmp_path}/b", "-g", "D", f"{tmp_path}/d", "--paired"])
