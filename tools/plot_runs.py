"""Pictures of runs: one PNG with a panel per thing a person checks, several runs overlaid by name.

    forge plot runs/quickstart                          # writes runs/quickstart/plots/overview.png
    forge plot runs/a runs/b --out compare.png          # two runs on the same axes

Panels (from each run's metrics.jsonl; a panel with nothing to show says so): training loss (raw and
smoothed), validation loss, bits per byte per data source, benchmark task accuracies, learning rate,
gradient norm, tokens/s (and MFU when measured), peak memory. Runs that recorded layer statistics
(`trainer.debug.layer_stats_steps`) also get layer_stats.png beside it: per block, the output RMS and largest
magnitude and the largest attention logit, and per parameter group the gradient and update RMS, a curve
per recorded step. Post-training runs (DPO, distillation) also get objective.png: each held-out objective
metric (reward accuracy and margin, KL to the teacher, ...) beside its training value.
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


LAYER_PANELS = {
    "block output RMS": ("act_rms", "RMS"),
    "block output max |value|": ("act_max", "largest magnitude"),
    "attention logit max": ("attn_logit_max", "largest pre-softmax score"),
    "gradient RMS (before clipping)": ("grad_rms", "RMS"),
    "update RMS": ("update_rms", "RMS of the optimizer's change"),
}


def plot_layer_stats(
    run_dirs: Sequence[Path], out: Path, names: Optional[Sequence[str]] = None
) -> Optional[dict[str, int]]:
    """The layer statistics of every run (x: block or parameter group, one curve per recorded step, darker =
    later; a line style per run) into `out`; None (nothing drawn) when no run recorded any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(names or [Path(r).name for r in run_dirs])
    records = [read_metrics(run, "layer_stats") for run in run_dirs]
    if not any(records):
        return None
    fig, grid = plt.subplots(2, 3, figsize=(18, 10), constrained_layout=True)
    grid[-1, -1].axis("off")
    cmap = plt.get_cmap("viridis")
    last_step = max(r["step"] for recs in records for r in recs)
    for ax, (title, (prefix, ylabel)) in zip(grid.flat, LAYER_PANELS.items()):
        found = {
            k.split("/", 1)[1] for recs in records for r in recs for k in r if k.startswith(prefix + "/")
        }
        groups = sorted(found, key=_model_order)
        order = {g: i for i, g in enumerate(groups)}
        for j, (recs, name) in enumerate(zip(records, names)):
            for r in recs:
                keys = sorted(
                    (k for k in r if k.startswith(prefix + "/")), key=lambda k: order[k.split("/", 1)[1]]
                )
                xs = [order[k.split("/", 1)[1]] for k in keys]
                ax.plot(xs, [r[k] for k in keys], ["o-", "s--", "^:", "d-."][j % 4],
                        color=cmap(0.15 + 0.7 * r["step"] / last_step), label=f"{name} @ step {r['step']}")  # fmt: skip
        ax.set_xticks(
            range(len(groups)), [g.replace("layers.", "L") for g in groups], rotation=60, fontsize=8
        )
        ax.set_title(title)
        ax.set_xlabel("block / parameter group")
        ax.set_ylabel(ylabel)
        ax.set_yscale(
            "log" if ax.lines and all(v > 0 for line in ax.lines for v in line.get_ydata()) else "linear"
        )
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.suptitle("layer statistics: " + " vs ".join(names), fontsize=13)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return {title: len(ax.lines) for title, ax in zip(LAYER_PANELS, grid.flat)}


def plot_objective(
    run_dirs: Sequence[Path], out: Path, names: Optional[Sequence[str]] = None
) -> Optional[dict[str, int]]:
    """Post-training objectives (DPO, distillation): a panel per metric the held-out evaluation records
    (loss, rewards/accuracies, rewards/margins, distill/kl, ...), the training value per step as a thin line
    and the held-out value as markers; None (nothing drawn) when no run recorded any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(names or [Path(r).name for r in run_dirs])
    held_out = [read_metrics(run, "objective_val") for run in run_dirs]
    metrics = sorted({k for recs in held_out for r in recs for k in r if k not in ("step", "kind", "time")})
    if not metrics:
        return None
    cols = min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, grid = plt.subplots(
        rows, cols, figsize=(6 * cols, 4.5 * rows), constrained_layout=True, squeeze=False
    )
    for ax in grid.flat[len(metrics) :]:
        ax.axis("off")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(grid.flat, metrics):
        for i, (run, name, recs) in enumerate(zip(run_dirs, names, held_out)):
            color = colors[i % len(colors)]
            steps, values = _series(read_metrics(run, "train"), metric)
            ax.plot(steps, values, color=color, alpha=0.4, linewidth=0.8, label=f"{name}: training")
            steps, values = _series(recs, metric)
            ax.plot(steps, values, "o-", color=color, label=f"{name}: held out")
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.set_ylabel(_objective_unit(metric))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("post-training objective: " + " vs ".join(names), fontsize=13)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return {metric: len(ax.lines) for metric, ax in zip(metrics, grid.flat)}


def _objective_unit(metric: str) -> str:
    if metric.endswith("accuracies"):
        return "share of pairs"
    if metric.startswith("rewards/"):
        return "reward (beta x log-ratio)"
    return "nats"  # the loss, log-probabilities, KL and cross-entropies


def _model_order(group: str) -> tuple:
    """Embeddings, then the blocks in order, then the final norm and the output head."""
    if group.startswith("layers."):
        return (1, int(group.split(".")[1]), "")
    return (0 if "embed" in group else 2, 0, group)


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
    layers = out.with_name("layer_stats.png")
    if plot_layer_stats(runs, layers, args.names) is not None:
        print(f"wrote {layers}")
    objective = out.with_name("objective.png")
    if plot_objective(runs, objective, args.names) is not None:
        print(f"wrote {objective}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
