"""Evaluation under parallel layouts: the same task metrics, per-source numbers and generations as one process.

FSDP scores the tasks during training through `forward` on every rank (and samples in lock-step);
tensor parallelism leaves them to the end, on the consolidated model. Both must give the numbers of
the single-process reference (the default eval config: a BIG-bench task and two prompts).
"""

from __future__ import annotations

import pytest

from forge_lm.trainer.metrics import read_metrics
from tests.distributed.conftest import run_ok

LAYOUTS = {
    # name: (processes, overrides, steps at which tasks are evaluated)
    "eval_fsdp2": (2, ["parallel.dp_shard=2"], [0, 5]),
    "eval_tp2": (2, ["parallel.tp=2", "parallel.dp_shard=1"], [5]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_evaluates_like_one_process(layout, dist_root, single_process_losses):
    nproc, overrides, steps = LAYOUTS[layout]
    run_ok(nproc, dist_root, layout, *overrides)
    want = {r["step"]: r for r in read_metrics(dist_root / "reference", "tasks")}
    got = read_metrics(dist_root / layout, "tasks")
    assert [r["step"] for r in got] == steps
    for record in got:
        for key, value in want[record["step"]].items():
            if key.endswith(("/acc", "/acc_norm", "/n")):
                assert record[key] == value, (record["step"], key)
    generations = read_metrics(dist_root / layout, "generations")
    assert [r["step"] for r in generations] == steps and len(generations[-1]["samples"]) == 2
    ref_val = {r["step"]: r for r in read_metrics(dist_root / "reference", "val")}
    for record in read_metrics(dist_root / layout, "val"):
        for key in ("bpb", "shakespeare/bpb", "cpython/bpb"):
            assert record[key] == pytest.approx(ref_val[record["step"]][key], abs=1e-4), key
