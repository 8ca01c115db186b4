"""Families with query/key norms train under tensor parallelism exactly like one process (fp32, 5 steps)."""

from __future__ import annotations

import pytest

from tests.distributed.conftest import assert_same_losses, run_ok

FAMILIES = ["qwen3_tiny", "gemma3_tiny", "olmo2_tiny"]  # per-head QK-norm, per-head + post norms, full-width
LAYOUTS = {
    "tp_sp_2": (2, ["parallel.tp=2", "parallel.dp_shard=1"]),
    "tp_no_sp_2": (2, ["parallel.tp=2", "parallel.dp_shard=1", "parallel.sequence_parallel=false",
                       "parallel.loss_parallel=false"]),
    "fsdp_x_tp_4": (4, ["parallel.tp=2", "parallel.dp_shard=2"]),
}  # fmt: skip
DEFAULT = {("qwen3_tiny", "tp_sp_2"), ("olmo2_tiny", "tp_sp_2")}  # one per kind of norm; the rest are slow


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return root, {}


@pytest.mark.parametrize(
    "family,layout",
    [
        pytest.param(f, layout, marks=[] if (f, layout) in DEFAULT else [pytest.mark.slow])
        for f in FAMILIES
        for layout in LAYOUTS
    ],
)
def test_qk_norm_families_match_one_process_under_tensor_parallelism(family, layout, references):
    root, single = references
    if family not in single:
        single[family] = run_ok(1, root, f"{family}_single", f"model={family}")
    nproc, overrides = LAYOUTS[layout]
    got = run_ok(nproc, root, f"{family}_{layout}", f"model={family}", *overrides)
    assert_same_losses(got, single[family])
