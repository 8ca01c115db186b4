"""Pictures of runs: one PNG with a panel per thing a person checks, several runs overlaid by name.

    forge plot runs/quickstart                          # writes runs/quickstart/plots/overview.png
    forge plot runs/a runs/b --out compare.png          # two runs on the same axes

Panels (from each run's metrics.jsonl; a panel with nothing to show says so): training loss (raw and
smoothed), validation loss, bits per byte per data source, benchmark task accuracies, learning rate,
gradient norm, tokens/s (and MFU when measured), peak memory.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from forge_lm.trainer.metrics import read_metrics

PANELS = [
    "training loss",
    "validation loss",
    "bits per byte by source",
    "task accuracy",
    "learning rate",
    "gradient norm",
    "throughput",
    "peak memory",
]


def smooth(values: list[float], weight: float = 0.6) -> list[float]:
    """Exponential moving average, bias-corrected so the first points are not pulled towards zero."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def plot_runs(run_dirs: Sequence[Path], out: Path, names: Optional[Sequence[str]] = None) -> dict[str, int]:
    """Draw every panel for every run into `out` (PNG); returns each panel's title and its number of curves."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    names = list(names or [Path(r).name for r in run_dirs])
    fig, grid = plt.subplots(2, 4, figsize=(20, 9), constrained_layout=True)
    axes = dict(zip(PANELS, grid.flat))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (run, name) in enumerate(zip(run_dirs, names)):
        color = colors[i % len(colors)]
        train, val, tasks = (read_metrics(run, kind) for kind in ("train", "val", "tasks"))

        steps, loss = _series(train, "loss")
        ax = axes["training loss"]
        ax.plot(steps, loss, color=color, alpha=0.3, linewidth=0.8)
        ax.plot(steps, smooth(loss), color=color, label=f"{name} (smoothed)")

        steps, loss = _series(val, "loss")
        axes["validation loss"].plot(steps, loss, "o-", color=color, label=name)

        sources = sorted({k[: -len("/bpb")] for r in val for k in r if k.endswith("/bpb")})
        for j, source in enumerate(sources or [""]):
            steps, bpb = _series(val, f"{source}/bpb" if source else "bpb")
            style = ["o-", "s--", "^:", "d-."][j % 4]
            axes["bits per byte by source"].plot(
                steps, bpb, style, color=color, label=f"{name}: {source or 'all'}"
            )

        metrics = sorted({k for r in tasks for k in r if k.endswith(("/acc", "/acc_norm"))})
        for j, metric in enumerate(metrics):
            steps, acc = _series(tasks, metric)
            axes["task accuracy"].plot(steps, acc, ["o-", "s--", "^:", "d-."][j % 4], color=color,
                                       label=f"{name}: {metric}")  # fmt: skip

        for panel, key in (
            ("learning rate", "lr"),
            ("gradient norm", "grad_norm"),
            ("peak memory", "peak_memory_gib"),
        ):
            steps, values = _series(train, key)
            axes[panel].plot(steps, values, color=color, label=name)
        steps, rate = _series(train, "tokens_per_s")
        axes["throughput"].plot(steps, rate, color=color, label=f"{name} tokens/s")
        steps, mfu = _series(train, "mfu")
        if mfu:
            twin = axes["throughput"].twinx()
            twin.plot(steps, [100 * m for m in mfu], "--", color=color, label=f"{name} MFU")
            twin.set_ylabel("MFU (%)")

    labels = {
        "training loss": "loss (nats per token)",
        "validation loss": "loss (nats per token)",
        "bits per byte by source": "bits per byte",
        "task accuracy": "accuracy",
        "learning rate": "learning rate",
        "gradient norm": "global gradient norm (before clipping)",
        "throughput": "tokens per second",
        "peak memory": "GiB",
    }
    for title, ax in axes.items():
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(labels[title])
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    axes["learning rate"].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    fig.suptitle(" vs ".join(names), fontsize=14)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return {title: len(ax.lines) for title, ax in axes.items()}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (each holds metrics.jsonl)")
    p.add_argument("--out", help="the PNG to write (default: <first run>/plots/overview.png)")
    p.add_argument("--names", nargs="*", help="legend names, one per run (default: the folder names)")
    args = p.parse_args(argv)
    runs = [Path(r) for r in args.runs]
    for run in runs:
        if not (run / "metrics.jsonl").is_file():
            print(f"error: {run} has no metrics.jsonl: give run directories (runs/<name>)", file=sys.stderr)
            return 2
    if args.names and len(args.names) != len(runs):
        print(f"error: {len(args.names)} names for {len(runs)} runs", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else runs[0] / "plots" / "overview.png"
    plot_runs(runs, out, args.names)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
