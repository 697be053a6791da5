"""Writing evaluation results: one JSON file and one Markdown table per task."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chameleon_lite.files import atomic_write_text

#: The column of `category_rows` holding the standard error of the first metric (overall / seen / held-out rows).
STDERR_COLUMN = "s.e."


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, task: str, result: dict[str, Any], table: str) -> dict[str, str]:
    """``<task>.json`` (the full result) and ``<task>.md`` (the table); returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out_dir / f"{task}.json"), "markdown": str(out_dir / f"{task}.md")}
    atomic_write_text(Path(paths["json"]), json.dumps(result, indent=2, default=str) + "\n")
    atomic_write_text(Path(paths["markdown"]), table)
    return paths


def category_rows(summary: dict[str, Any], metric_keys: list[str]) -> list[dict[str, Any]]:
    """Turn ``{"per_category": {cat: {...}}, "overall": {...}}`` into table rows; where the summary splits
    its records into "seen" and "heldout" (colour-shape pairs held out of training) and some are held out,
    two more rows say how each group scored. Where the summary has standard errors (`aggregate`), the
    overall / seen / held-out rows carry the first metric's in a column named ``STDERR_COLUMN``."""
    def row(name: str, values: dict[str, Any], part: str | None = None) -> dict[str, Any]:
        out = {"category": name, **{k: values.get(k, "") for k in ["n", *metric_keys]}}
        stderr = summary.get("stderr", {}).get(part, {}).get(metric_keys[0]) if part else None
        return {**out, STDERR_COLUMN: stderr} if stderr is not None else out

    rows = [row(cat, v) for cat, v in summary["per_category"].items()]
    rows.append(row("**overall**", summary["overall"], "overall"))
    if summary.get("heldout", {}).get("n"):
        rows += [row("seen pairs", summary["seen"], "seen"), row("held-out pairs", summary["heldout"], "heldout")]
    return rows
