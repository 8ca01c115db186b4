"""trainer.backend=deepspeed: ZeRO-1, -2 and -3 on 2 CPU processes (gloo) train exactly like one process.

Same global batch and seed in fp32, 5 steps, compared with the torch backend's single-process run; plus
save/resume and the Hugging Face export of a DeepSpeed run. Where DeepSpeed itself cannot run a stage on
this machine, the test is skipped quoting DeepSpeed's error (a failure in our code still fails).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Optional

import pytest
from omegaconf import OmegaConf

from tests.distributed.conftest import assert_same_losses, launch, losses

STAGES = (1, 2, 3)
EXPORTING_STAGE = 3  # the run whose final model is exported to a Hugging Face folder (ZeRO-3: sharded params)


@pytest.fixture(scope="module", autouse=True)
def _deepspeed_installed() -> None:
    pytest.importorskip(
        "deepspeed",
        reason="DeepSpeed is not installed: pip install 'forge-lm[deepspeed]'",
    )


def upstream_error(stderr: str) -> Optional[str]:
    """DeepSpeed's error, when a worker failed inside a DeepSpeed call (rather than in our own code).

    That is: the innermost frame of the repository's code in the traceback is followed by DeepSpeed's
    frames. Returns the error line(s) to quote, or None.
    """
    for block in stderr.split("Traceback (most recent call last):")[1:]:
        frames = re.findall(r'^\s+File "([^"]+)", line \d+', block, flags=re.M)
        ours = [i for i, f in enumerate(frames) if "/site-packages/" not in f and not f.startswith("<")]
        if not ours or not any("/site-packages/deepspeed/" in f for f in frames[ours[-1] + 1 :]):
            continue
        # The error is the first unindented line after the last frame (and its source lines).
        tail = block[block.rfind('  File "') :].splitlines()[1:]
        error = [line for line in tail if line and not line.startswith(" ")]
        if error:
            return " / ".join(error[:3])
    return None


def launch_deepspeed(root: Path, name: str, stage: int, *overrides: str) -> subprocess.CompletedProcess:
    out = launch(
        2, root, name, "trainer.backend=deepspeed", f"trainer.deepspeed.zero_stage={stage}", *overrides
    )
    if out.returncode != 0:
        error = upstream_error(out.stderr)
        if error is not None:
            pytest.skip(f"DeepSpeed cannot run ZeRO-{stage} with 2 CPU processes here: {error}")
        pytest.fail(f"{name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return out


@pytest.fixture(scope="module")
def zero_run(dist_root):
    """zero_run(stage) -> the run directory of an uninterrupted 5-step ZeRO-`stage` run (launched once)."""
    done: dict[int, Path | BaseException] = {}

    def get(stage: int) -> Path:
        if stage not in done:
            name = f"deepspeed_zero{stage}"
            extra = ["trainer.export_hf=true"] if stage == EXPORTING_STAGE else []
            try:
                launch_deepspeed(dist_root, name, stage, *extra)
                done[stage] = dist_root / name
            except (pytest.skip.Exception, pytest.fail.Exception) as outcome:
                done[stage] = outcome  # a skipped or failed launch is not repeated by the next test
        if isinstance(done[stage], BaseException):
            raise done[stage]
        return done[stage]

    return get


@pytest.mark.parametrize("stage", STAGES)
def test_zero_matches_single_process(stage, zero_run, single_process_losses):
    run_dir = zero_run(stage)
    assert_same_losses(losses(run_dir), single_process_losses["train"])
    assert len(losses(run_dir)) >= 5
    # validation at step 0 and at the end agrees too
    assert_same_losses(losses(run_dir, "val"), single_process_losses["val"])


def test_hf_export_of_a_deepspeed_run(zero_run):
    """The exported folder loads with from_hf and reproduces the run's final validation loss."""
    import torch

    from forge_lm.data.loader import eval_batches
    from forge_lm.data.shards import ShardDataset
    from forge_lm.trainer.hub import from_hf
    from forge_lm.trainer.loss import lm_loss

    run_dir = zero_run(EXPORTING_STAGE)
    model = from_hf(run_dir / "hf").eval()
    cfg = OmegaConf.load(run_dir / "config.yaml")
    val = ShardDataset(Path(cfg.data.prepared_dir) / "val")
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in eval_batches(val, cfg.eval.batch_size, cfg.eval.max_batches):
            logits = model(batch["input_ids"], position_ids=batch["position_ids"])
            total += lm_loss(logits, batch["labels"], reduction="sum").item()
            tokens += int((batch["labels"] != -100).sum())
    final_val = losses(run_dir, "val")[5]
    assert abs(total / tokens - final_val) < 1e-5, (total / tokens, final_val)


def test_save_and_resume(dist_root, zero_run, single_process_losses):
    """Exit after saving at step 3, run the same command again: it resumes and finishes like the
    uninterrupted run. The checkpoint holds the same train state as a torch-backend checkpoint."""
    from forge_lm.trainer.checkpoint import list_checkpoints, read_train_state

    stage, name = 3, "deepspeed_zero3_resumed"
    launch_deepspeed(dist_root, name, stage, "trainer.exit_at_step=3")
    assert sorted(losses(dist_root / name)) == [1, 2, 3]
    saved = list_checkpoints(dist_root / name / "checkpoints")
    assert [c.step for c in saved] == [3]
    state = read_train_state(saved[0].path)
    reference = read_train_state(list_checkpoints(dist_root / "reference" / "checkpoints")[-1].path)
    assert state.keys() == reference.keys() and state["step"] == 3

    launch_deepspeed(dist_root, name, stage, "trainer.exit_at_step=3")
    assert "resumed from" in (dist_root / name / "train.log").read_text()
    resumed = losses(dist_root / name)
    assert_same_losses(resumed, losses(zero_run(stage)))
    assert_same_losses(resumed, single_process_losses["train"])


def test_upstream_errors_are_told_apart_from_ours():
    """The skip rule: an error raised inside DeepSpeed's call is DeepSpeed's; one in our code is not."""
    deepspeed_failure = (
        "Traceback (most recent call last):\n"
        '  File "/repo/trainer/parallel/deepspeed.py", line 104, in __init__\n'
        "    self.engine = deepspeed.initialize(\n"
        '  File "/usr/lib/python3/site-packages/deepspeed/runtime/engine.py", line 9, in f\n'
        "    raise NotImplementedError('no CPU kernel')\n"
        "NotImplementedError: no CPU kernel\n"
    )
    assert upstream_error(deepspeed_failure) == "NotImplementedError: no CPU kernel"
    our_failure = (
        "Traceback (most recent call last):\n"
        '  File "/usr/lib/python3/site-packages/deepspeed/runtime/engine.py", line 9, in f\n'
        "    out = self.module(x)\n"
        '  File "/repo/trainer/model/decoder.py", line 90, in forward\n'
        "    h = self.embed(input_ids)\n"
        "RuntimeError: shape mismatch\n"
    )
    assert upstream_error(our_failure) is None
