"""Checkpoints move between parallel layouts, and a save that was cut short is never resumed from."""

from __future__ import annotations

import shutil

import torch

from forge_lm.trainer.inference import Generator, load_model
from tests.distributed.conftest import assert_same_losses, losses, run_ok


def test_fsdp4_checkpoint_resumes_as_fsdp2_x_tp2(dist_root, single_process_losses):
    name = "reshard_fsdp4_to_tp"
    first = run_ok(4, dist_root, name, "parallel.dp_shard=4", "trainer.exit_at_step=3")
    assert sorted(first) == [1, 2, 3]
    # Same run directory, new layout: resumes from step 3 and continues the same run.
    run_ok(4, dist_root, name, "parallel.dp_shard=2", "parallel.tp=2")
    assert_same_losses(losses(dist_root / name), single_process_losses["train"])

    # The inference path loads the FSDP x TP checkpoint as one plain model, equal to the reference run's.
    sharded, tokenizer = load_model(dist_root / name)
    plain, _ = load_model(dist_root / "reference")
    prompt = tokenizer.encode("ROMEO: What light through yonder window")
    with torch.no_grad():
        assert (sharded(torch.tensor([prompt])) - plain(torch.tensor([prompt]))).abs().max() <= 1e-4
    greedy = [Generator(m).generate([prompt], 16)[0].token_ids for m in (sharded, plain)]
    assert greedy[0] == greedy[1]


def test_pipeline_checkpoint_resumes_in_one_process_and_exports(dist_root, single_process_losses):
    name = "reshard_pp_to_single"
    run_ok(2, dist_root, name, "parallel.pp=2", "parallel.dp_shard=1", "trainer.exit_at_step=2")
    run_ok(1, dist_root, name, "trainer.export_hf=true")
    assert_same_losses(losses(dist_root / name), single_process_losses["train"])
    from forge_lm.trainer.hub import from_hf

    assert from_hf(dist_root / name / "hf").cfg.n_layers == 8


def test_a_save_cut_short_is_ignored_on_resume(dist_root, single_process_losses):
    name = "cut_short"
    run_ok(2, dist_root, name, "parallel.dp_shard=2", "trainer.checkpoint_every=2", "trainer.exit_at_step=4")
    ckpts = dist_root / name / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000002", "step_0000004"]
    # The step-4 save as a kill would leave it: shards on disk, no completion marker (in place, and as
    # the temporary directory a kill before the rename leaves).
    (ckpts / "step_0000004" / "complete.json").unlink()
    shutil.copytree(ckpts / "step_0000004", ckpts / "step_0000006.tmp")
    out = run_ok(2, dist_root, name, "parallel.dp_shard=2")
    log = (dist_root / name / "train.log").read_text()
    assert "resumed from" in log and "step_0000002 at step 2" in log
    # steps 3 and 4 were trained again from the step-2 checkpoint and match the reference
    assert_same_losses(out, single_process_losses["train"])
