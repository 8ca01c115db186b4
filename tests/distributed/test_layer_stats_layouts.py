"""Layer statistics are global: under FSDP, tensor and pipeline parallelism they equal one process's."""

from __future__ import annotations

import pytest

from forge_lm.trainer.metrics import read_metrics
from tests.distributed.conftest import run_ok

STATS = ["trainer.debug.layer_stats_steps=[3]", "eval.every=0", "eval.prompts=[]", "trainer.max_steps=3"]

LAYOUTS = {
    "stats_fsdp2_2": ["parallel.dp_shard=2"],
    "stats_tp_sp_2": ["parallel.tp=2", "parallel.dp_shard=1"],
    "stats_pp2": ["parallel.pp=2", "parallel.dp_shard=1", "parallel.pp_schedule=1F1B"],
}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats")
    run_ok(1, root, "stats_single", *STATS)
    [record] = read_metrics(root / "stats_single", "layer_stats")
    return root, record


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layer_statistics_equal_one_process(layout, one_process):
    root, want = one_process
    run_ok(2, root, layout, *STATS, *LAYOUTS[layout])
    [got] = read_metrics(root / layout, "layer_stats")
    assert got["step"] == 3
    keys = sorted(k for k in want if "/" in k)
    assert len(keys) == 8 * 5 + 3 * 2  # 8 blocks x 5 kinds; embedding, final norm and output head x 2 kinds
    assert sorted(k for k in got if "/" in k) == keys
    for key in keys:
        # Updates are Adam's normalised steps: a last-digit difference in a tiny gradient moves them more.
        assert got[key] == pytest.approx(want[key], rel=1e-3 if key.startswith("update_rms") else 1e-4), key
