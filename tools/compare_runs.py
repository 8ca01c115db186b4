"""Where two runs part: the first step whose losses differ by more than a tolerance, and how their configs differ.

    forge compare runs/a runs/b                 # training losses, tolerance 1e-5
    forge compare runs/a runs/b --kind val --tol 1e-3

Reads each run directory's metrics.jsonl and config.yaml (the resolved config the run wrote). Prints the
first differing step (or that they agree on every common step) and every config value that differs.
Exit status: 0 when the losses agree, 1 when they part, 2 when a run directory is not usable.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

from forge_lm.trainer.metrics import read_metrics


def first_difference(got: dict[int, float], want: dict[int, float], tol: float = 1e-5) -> Optional[str]:
    """A sentence naming the first step whose loss differs by more than `tol`, or None when none does."""
    if sorted(got) != sorted(want):
        return f"the runs logged different steps: {sorted(got)} and {sorted(want)}"
    for step in sorted(want):
        if abs(got[step] - want[step]) > tol:
            return (
                f"step {step}: loss {got[step]:.8f} vs {want[step]:.8f} "
                f"(|difference| {abs(got[step] - want[step]):.2e} > {tol:g})"
            )
    return None


def losses(run_dir: Path, kind: str = "train") -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir, kind) if "loss" in r}


def config_differences(a: Path, b: Path) -> list[str]:
    """'key: value_a -> value_b' for every differing value of the two runs' resolved configs."""
    from omegaconf import OmegaConf

    flat_a, flat_b = (_flatten(OmegaConf.to_container(OmegaConf.load(p / "config.yaml"))) for p in (a, b))
    missing = object()
    return [
        f"{key}: {flat_a.get(key, '(absent)')} -> {flat_b.get(key, '(absent)')}"
        for key in sorted(set(flat_a) | set(flat_b))
        if flat_a.get(key, missing) != flat_b.get(key, missing)
    ]


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(_flatten(value, f"{prefix}{key}." if isinstance(value, dict) else f"{prefix}{key}"))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--kind", default="train", choices=["train", "val"], help="which losses (default train)")
    p.add_argument("--tol", type=float, default=1e-5, help="largest |difference| still equal (default 1e-5)")
    args = p.parse_args(argv)
    runs = [Path(args.run_a), Path(args.run_b)]
    for run in runs:
        if not (run / "metrics.jsonl").is_file() or not (run / "config.yaml").is_file():
            print(f"error: {run} is not a run directory (no metrics.jsonl and config.yaml)", file=sys.stderr)
            return 2
    a, b = (losses(run, args.kind) for run in runs)
    common = sorted(set(a) & set(b))
    problem = first_difference({s: a[s] for s in common}, {s: b[s] for s in common}, args.tol)
    if not common:
        print(f"no {args.kind} step logged by both runs")
    elif problem is None:
        print(
            f"{args.kind} losses agree within {args.tol:g} on all {len(common)} common steps ({common[0]}..{common[-1]})"
        )
    else:
        print(f"{args.kind} losses part at {problem}")
    differences = config_differences(*runs)
    print("config differences:" if differences else "configs are identical")
    for line in differences:
        print(f"  {line}")
    return 0 if common and problem is None else 1


if __name__ == "__main__":
    sys.exit(main())
