"""`trainer.spike` in whole runs: a planted gradient spike is skipped and logged and the run finishes; a run of
skips rewinds past its data; a run that cannot recover stops saying what it saw (also as the command line's
exit code 2); a run stopped and resumed around its skips gives the uninterrupted losses; two FSDP2 ranks skip
and rewind together.

The spikes are real gradients: trainer.debug.inject_spike_batches multiplies the loss that chosen global
batches back-propagate, so the gradient norm (not the logged loss) jumps, or goes NaN.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from forge_lm.trainer import checkpoint as ckpt
from forge_lm.trainer.metrics import read_metrics
from forge_lm.trainer.model import Decoder
from forge_lm.trainer.optim import build_optimizer
from forge_lm.trainer.spike import SpikeStop
from forge_lm.trainer.train import run
from tests.conftest import REPO, compose_config, tiny_overrides

QUICK = [
    "trainer.export_hf=false", "trainer.plot=false", "trainer.tensorboard=false", "eval.prompts=[]", "eval.tasks=[]",
    "eval.max_batches=1", "trainer.resume=auto",
    # A short window, so that the z-score is judged from step 3 on.
    "trainer.spike.window=4", "trainer.spike.min_steps=2",
]  # fmt: skip


def _config(root, name, *overrides):
    return compose_config(*tiny_overrides(root, name, *QUICK, *overrides))


def _model_and_optimizer(checkpoint, cfg):
    model = Decoder(cfg.model)
    optimizer = build_optimizer(model, cfg.trainer)
    ckpt.load_checkpoint(checkpoint, [model], [optimizer])
    return model, optimizer


def test_a_planted_gradient_spike_is_skipped_logged_and_the_run_finishes(shared_output_root):
    overrides = ["trainer.max_steps=8", "trainer.checkpoint_every=1", "trainer.keep_last=3",
                 "trainer.debug.inject_spike_batches=[5]"]  # fmt: skip
    first = run(_config(shared_output_root, "spike_once", *overrides, "trainer.exit_at_step=5"))
    assert first.step == 5
    # Across the skipped step nothing moved: parameters, AdamW moments and step counts are those of step 4.
    cfg = _config(shared_output_root, "spike_once", *overrides)
    cfg.model.with_vocab(1024)
    before = _model_and_optimizer(first.run_dir / "checkpoints" / "step_0000004", cfg)
    after = _model_and_optimizer(first.checkpoint, cfg)
    for (name, a), b in zip(before[0].named_parameters(), after[0].parameters()):
        assert torch.equal(a, b), name
        for key, value in before[1].state[a].items():
            assert torch.equal(value, after[1].state[b][key]), (name, key)

    result = run(cfg)  # resumes at step 5 and finishes
    assert result.step == 8 and result.final_val_loss < result.initial_val_loss
    spikes = read_metrics(result.run_dir, "spike")
    assert [r["step"] for r in spikes] == [5]
    assert spikes[0]["grad_norm"] > 1000 * spikes[0]["grad_norm_mean"]
    train = {r["step"]: r for r in read_metrics(result.run_dir, "train")}
    assert train[4]["skipped_steps"] == 0 and train[8]["skipped_steps"] == 1  # the count survived the resume
    assert train[6]["grad_norm"] < 10  # the steps after it train normally


def test_a_run_of_skips_rewinds_to_the_checkpoint_before_it_and_skips_its_data(shared_output_root):
    cfg = _config(
        shared_output_root, "spike_rewind", "trainer.max_steps=10", "trainer.checkpoint_every=2",
        "trainer.debug.inject_spike_batches=[5,6,7]", "trainer.debug.inject_spike_factor=nan",
        "trainer.spike.max_consecutive_skips=3",
    )  # fmt: skip
    result = run(cfg)
    assert result.step == 10
    assert [r["step"] for r in read_metrics(result.run_dir, "spike")] == [5, 6, 7]
    (rewind,) = read_metrics(result.run_dir, "rewind")
    assert (rewind["to_step"], rewind["first_step"], rewind["last_step"]) == (4, 5, 7)
    # After the rewind, steps 5..10 trained on batches 8..13: the bad ones were not met again, nothing skipped.
    records = read_metrics(result.run_dir)
    after = [r for r in records[records.index(rewind) :] if r["kind"] == "train"]
    assert [r["step"] for r in after] == [5, 6, 7, 8, 9, 10]
    assert all(r["skipped_steps"] == 3 for r in after)
    assert after[-1]["tokens_seen"] == 13 * cfg.trainer.global_batch_tokens
    # The skipped window is in the checkpoint, so a resumed run skips it too.
    state = ckpt.read_train_state(result.checkpoint)
    assert state["spike"]["windows"] == [{"steps": [5, 7], "samples": [32, 56]}]
    assert state["spike"]["rewinds"] == 1


def test_a_nan_right_after_a_resume_names_the_checkpoint_and_a_run_that_cannot_recover_stops(
    shared_output_root,
):
    first = run(_config(shared_output_root, "spike_suspect", "trainer.max_steps=8", "trainer.exit_at_step=4"))
    assert first.step == 4
    again = _config(
        shared_output_root, "spike_suspect", "trainer.max_steps=8", "trainer.debug.inject_spike_batches=[5,6]",
        "trainer.debug.inject_spike_factor=nan", "trainer.spike.max_consecutive_skips=2",
    )  # fmt: skip
    with pytest.raises(SpikeStop) as stop:
        run(again)
    message = str(stop.value)
    assert message.startswith("trainer.spike: 2 steps in a row had their update skipped (steps 5-6")
    assert "there is no checkpoint from before step 4 to rewind to" in message
    assert "step 5: loss" in message and "grad norm nan (non-finite)" in message
    assert re.search(r"right after loading \S+step_0000004, with no step applied since: that checkpoint is a "
                     r"suspect", message)  # fmt: skip
    assert "\n" not in message  # one paragraph, as the command line prints it


def test_two_fsdp2_ranks_skip_together_and_rewind_together(tmp_path):
    """Two gloo ranks under torchrun, planted spikes at batches 3 and 4 (a run of 2: rewind to step 2, their
    data skipped): both ranks report each skip and the rewind, and the losses equal those of one process with
    the same spikes (had one rank applied its shard's update, or rewound alone, they would differ).
    z_threshold=100: a 1e4-fold gradient norm is far above it, a natural step of this short window never."""
    from tests.distributed.conftest import assert_same_losses, launch, losses

    spike = ["trainer.max_steps=5", "trainer.checkpoint_every=2", "trainer.debug.inject_spike_batches=[3,4]",
             "trainer.spike.window=2", "trainer.spike.min_steps=2", "trainer.spike.z_threshold=100",
             "trainer.spike.max_consecutive_skips=2", "eval.prompts=[]", "trainer.plot=false",
             "trainer.tensorboard=false"]  # fmt: skip
    one = launch(1, tmp_path, "one", *spike)
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch(2, tmp_path, "two", *spike, "parallel.dp_shard=2")
    assert two.returncode == 0, two.stderr[-3000:]
    said = two.stdout + two.stderr
    for step in (3, 4):  # by rank 0 and by rank 1
        assert said.count(f"step {step} skipped (its update was dropped on every rank)") == 2, said[-3000:]
    assert said.count("2 steps in a row were skipped (steps 3-4): rewinding to") == 2
    for run_dir in (tmp_path / "one", tmp_path / "two"):
        assert [r["step"] for r in read_metrics(run_dir, "spike")] == [3, 4]
        rewinds = [(r["to_step"], r["first_step"], r["last_step"]) for r in read_metrics(run_dir, "rewind")]
        assert rewinds == [(2, 3, 4)]
    assert_same_losses(losses(tmp_path / "two"), losses(tmp_path / "one"))


def test_a_run_stopped_and_resumed_around_its_skips_and_rewind_gives_the_uninterrupted_losses(
    shared_output_root,
):
    """Batches 5-7 are spikes (a run of 3: rewind to step 4, their data skipped), batch 10 one more (skipped
    alone, judged by the z-score of the window). The stopped run halts in the middle of the run of skips
    (step 6: the streak and the window must resume), then after the rewind (step 8: the skipped data window
    must resume), and must end with the same losses, skips and rewind as the uninterrupted one."""
    spikes = ["trainer.max_steps=11", "trainer.checkpoint_every=2", "trainer.debug.inject_spike_batches=[5,6,7,10]",
              "trainer.spike.max_consecutive_skips=3"]  # fmt: skip
    whole = run(_config(shared_output_root, "spike_whole", *spikes))
    assert whole.step == 11
    for stop_at in (6, 8):
        part = run(_config(shared_output_root, "spike_stopped", *spikes, f"trainer.exit_at_step={stop_at}"))
        assert part.step == stop_at
    end = run(_config(shared_output_root, "spike_stopped", *spikes))
    assert end.step == 11

    def skips(run_dir):
        return [(r["step"], r["first_sample"]) for r in read_metrics(run_dir, "spike")]

    # batches 5, 6, 7; then batch 10, met by step 7 after the rewind. The stopped run logs each step once.
    assert skips(whole.run_dir) == skips(end.run_dir) == [(5, 32), (6, 40), (7, 48), (7, 72)]
    rewinds = [(r["step"], r["to_step"]) for r in read_metrics(end.run_dir, "rewind")]
    assert rewinds == [(r["step"], r["to_step"]) for r in read_metrics(whole.run_dir, "rewind")] == [(7, 4)]

    def losses(run_dir):  # the last value logged for each step: what the run kept after its rewind
        return {r["step"]: (r["loss"], r["grad_norm"]) for r in read_metrics(run_dir, "train")}

    assert losses(end.run_dir) == losses(whole.run_dir)
    assert ckpt.read_train_state(end.checkpoint)["spike"] == ckpt.read_train_state(whole.checkpoint)["spike"]


def test_the_command_line_stops_with_exit_code_2_and_says_what_it_saw(shared_output_root):
    """A run that cannot recover (two non-finite steps in a row, no rewind allowed): one message, no traceback,
    exit code 2 as for other errors the run cannot go past."""
    overrides = tiny_overrides(
        shared_output_root, "spike_cli", *QUICK, "trainer.max_steps=6", "trainer.debug.inject_spike_batches=[2,3]",
        "trainer.debug.inject_spike_factor=nan", "trainer.spike.max_consecutive_skips=2", "trainer.spike.max_rewinds=0",
    )  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "forge_lm.trainer.train", *overrides],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    (error,) = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert error.startswith("error: trainer.spike: 2 steps in a row had their update skipped (steps 2-3")
    assert "trainer.spike.max_rewinds=0 allows no rewind" in error
    assert "step 2: loss" in error and "grad norm nan (non-finite)" in error
