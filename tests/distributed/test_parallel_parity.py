"""Every parallel layout trains exactly like one process: same global batch and seed, fp32, 5 steps."""

from __future__ import annotations

import pytest

from tests.distributed.conftest import (
    SHORT_DOCUMENTS,
    assert_same_losses,
    losses,
    rows_with_several_documents,
    run_ok,
)

LAYOUTS = {
    # name: (processes, overrides)
    "fsdp2_2": (2, ["parallel.dp_shard=2"]),
    "fsdp2_4": (4, ["parallel.dp_shard=4"]),
    "hsdp_2x2": (4, ["parallel.dp_replicate=2", "parallel.dp_shard=2"]),
    "tp_sp_2": (2, ["parallel.tp=2", "parallel.dp_shard=1"]),
    "tp_no_sp_2": (2, ["parallel.tp=2", "parallel.dp_shard=1", "parallel.sequence_parallel=false",
                       "parallel.loss_parallel=false"]),
    "fsdp_x_tp_4": (4, ["parallel.tp=2", "parallel.dp_shard=2"]),
    "fsdp2_full_ac_2": (2, ["parallel.dp_shard=2", "parallel.activation_checkpointing=full"]),
    "fsdp2_selective_ac_2": (2, ["parallel.dp_shard=2", "parallel.activation_checkpointing=selective",
                                 "parallel.reshard_after_forward=false"]),
    "pp_x_fsdp_4": (4, ["parallel.pp=2", "parallel.dp_shard=2", "parallel.pp_schedule=1F1B"]),
}

SCHEDULES = ["GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"]
for _schedule in SCHEDULES:
    for _pp in (2, 4):
        LAYOUTS[f"pp{_pp}_{_schedule}"] = (_pp, [f"parallel.pp={_pp}", "parallel.dp_shard=1",
                                                  f"parallel.pp_schedule={_schedule}"])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, dist_root, single_process_losses):
    nproc, overrides = LAYOUTS[layout]
    got = run_ok(nproc, dist_root, layout, *overrides)
    assert_same_losses(got, single_process_losses["train"])
    # validation at step 0 and at the end agrees too
    assert_same_losses(losses(dist_root / layout, "val"), single_process_losses["val"])


def test_padded_batches_weigh_every_token_alike_under_pipeline_parallelism(tmp_path):
    """With best-fit packing micro-batches carry different numbers of real tokens; the pipeline's loss must
    still be the global token mean (not the mean of micro-batch means), as in one process."""
    import json

    best_fit = ["data.packing=best_fit"]
    want = run_ok(1, tmp_path, "best_fit_reference", *best_fit)
    manifests = list((tmp_path / "prepared").rglob("manifest.json"))
    assert any(json.loads(m.read_text())["num_padding_tokens"] > 0 for m in manifests), "no padding to weigh"
    got = run_ok(2, tmp_path, "best_fit_pp2", *best_fit, "parallel.pp=2", "parallel.dp_shard=1",
                 "parallel.pp_schedule=1F1B")  # fmt: skip
    assert_same_losses(got, want)


def test_document_masking_crosses_pipeline_stages(tmp_path):
    """Every stage gets each micro-batch's document ids, so packed documents are masked and positioned on every
    stage as in one process (training and validation)."""
    masked = [*SHORT_DOCUMENTS, "data.document_masking=true"]
    want = run_ok(1, tmp_path, "masked_reference", *masked)
    assert rows_with_several_documents(tmp_path) > 0.2, "too few packed rows for masking to matter"
    got = run_ok(2, tmp_path, "masked_pp2", *masked, "parallel.pp=2", "parallel.dp_shard=1",
                 "parallel.pp_schedule=1F1B")  # fmt: skip
    assert_same_losses(got, want)
    assert_same_losses(losses(tmp_path / "masked_pp2", "val"), losses(tmp_path / "masked_reference", "val"))
