"""Draw the loss and output-norm curves of several training runs into one PNG.

    python -m chameleon_lite.cli.plot_runs runs/ablation_qknorm [--out ablation.png] [--metrics train/loss stability/hidden_rms]

Every folder below the given roots that holds a Lightning CSV log (``logs/metrics.csv``) is one
run, labelled by its path relative to the root (Hydra's multirun subdir names, e.g.
``qk_norm=false,z_loss=0.0``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from chameleon_lite.train.callbacks import read_metrics_csv


def find_runs(roots: list[Path]) -> dict[str, Path]:
    """label -> ``metrics.csv`` of every run below `roots`; with several roots each label starts with its root's
    name (two sweeps both have runs ``0``, ``1``, ...: neither may hide the other)."""
    runs = {}
    for root in roots:
        for metrics in sorted(root.rglob("logs/metrics.csv")):
            run_dir = metrics.parent.parent
            label = str(run_dir.relative_to(root)) if run_dir != root else root.name
            if len(roots) > 1 and run_dir != root:
                label = f"{root.name}/{label}"
            if label in runs:
                raise SystemExit(f"two runs would both be labelled {label!r} ({runs[label]} and {metrics}); "
                                 "give roots with different names")
            runs[label] = metrics
    return runs


def plot_runs(runs: dict[str, Path], metrics: list[str], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4), dpi=110, squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for label, path in runs.items():
            points = read_metrics_csv(path).get(metric)
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=label, linewidth=1.1)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("roots", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--metrics", nargs="+", default=["train/loss", "stability/hidden_rms"])
    args = p.parse_args(argv)
    runs = find_runs(args.roots)
    if not runs:
        raise SystemExit(f"no logs/metrics.csv below {', '.join(map(str, args.roots))}")
    out = plot_runs(runs, args.metrics, args.out or args.roots[0] / "runs.png")
    print(f"{len(runs)} runs -> {out}")
    return out


if __name__ == "__main__":
    main()
