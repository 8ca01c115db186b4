"""End to end through the trainer: a corrupt newest checkpoint is skipped and the run continues exactly as
from the one before; nothing corrupt or planted is loaded by resume or eval; a save that cannot be written
ends (or, if asked, continues) cleanly; a preemption signal during start-up exits 75."""

from __future__ import annotations

import logging
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from forge_lm.trainer.checkpoint import CheckpointError
from forge_lm.trainer.metrics import read_metrics
from forge_lm.trainer.preemption import REQUEUE_EXIT_CODE
from forge_lm.trainer.train import run
from tests.conftest import REPO, compose_config, tiny_overrides
from tests.unit.test_checkpoint_trust import _flip_bytes, _Plant, _reseal

QUIET = ("trainer.export_hf=false", "trainer.plot=false", "trainer.tensorboard=false", "eval.prompts=[]")


def _overrides(root: Path, name: str, *extra: str) -> list[str]:
    return tiny_overrides(root, name, "trainer.checkpoint_every=2", "trainer.keep_last=3", *QUIET, *extra)


def _losses(run_dir: Path) -> dict[int, float]:
    """The last logged loss of every step (a resumed run logs the steps after its checkpoint again)."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir, "train")}


@pytest.fixture(scope="module")
def stopped_at_4(shared_output_root) -> Path:
    """A run stopped at step 4 with checkpoints at steps 2 and 4."""
    run(
        compose_config(
            *_overrides(shared_output_root, "trust_base", "trainer.max_steps=6", "trainer.exit_at_step=4")
        )
    )
    return shared_output_root / "trust_base"


def _copy(base: Path, root: Path, name: str) -> Path:
    shutil.copytree(base, root / name)
    return root / name


def test_a_corrupt_newest_checkpoint_is_skipped_and_the_run_continues_as_from_the_one_before(
    shared_output_root, stopped_at_4, caplog
):
    reference = _copy(stopped_at_4, shared_output_root, "trust_ref")
    shutil.rmtree(reference / "checkpoints" / "step_0000004")  # what resuming from step 2 means
    run(compose_config(*_overrides(shared_output_root, "trust_ref", "trainer.max_steps=6")))
    expected = _losses(reference)

    for damage in ("flipped", "truncated"):
        run_dir = _copy(stopped_at_4, shared_output_root, f"trust_{damage}")
        shard = next((run_dir / "checkpoints" / "step_0000004").glob("*.distcp"))
        if damage == "flipped":
            _flip_bytes(shard)
        else:
            shard.write_bytes(shard.read_bytes()[:-4096])
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            result = run(
                compose_config(*_overrides(shared_output_root, f"trust_{damage}", "trainer.max_steps=6"))
            )
        assert result.step == 6
        assert shard.name in caplog.text and "corrupt" in caplog.text, caplog.text
        resumed = [r for r in read_metrics(run_dir, "resume")][-1]
        assert resumed["resumed_from"].endswith("step_0000002")
        got = _losses(run_dir)
        for step in range(3, 7):
            assert abs(got[step] - expected[step]) <= 1e-6, (damage, step, got[step], expected[step])


def test_every_checkpoint_corrupt_ends_with_one_clear_line(shared_output_root, stopped_at_4):
    run_dir = _copy(stopped_at_4, shared_output_root, "trust_all_corrupt")
    for shard in (run_dir / "checkpoints").glob("step_*/*.distcp"):
        _flip_bytes(shard)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "forge_lm.trainer.train",
            *_overrides(shared_output_root, "trust_all_corrupt", "trainer.max_steps=6"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert "error: every complete checkpoint" in out.stderr and "is corrupt" in out.stderr
    assert "model config" not in out.stderr


def test_a_planted_metadata_pickle_is_refused_by_resume_and_eval(
    shared_output_root, stopped_at_4, tmp_path, capsys
):
    from forge_lm.trainer.eval.__main__ import main as eval_main

    run_dir = _copy(stopped_at_4, shared_output_root, "trust_planted")
    newest = run_dir / "checkpoints" / "step_0000004"
    ran = tmp_path / "payload-ran"
    (newest / ".metadata").write_bytes(pickle.dumps(_Plant(ran)))
    _reseal(newest)  # its checksums match: only the restricted unpickler stands in the way

    with pytest.raises(CheckpointError, match="refused to read"):
        run(compose_config(*_overrides(shared_output_root, "trust_planted", "trainer.max_steps=6")))
    code = eval_main(
        [f"eval.checkpoint={newest}", "data=tiny", f"output_root={shared_output_root}", "eval.max_batches=1"]
    )
    assert code == 2 and "refused to read" in capsys.readouterr().err
    assert not ran.exists(), "the planted code ran"


def _limit_file_size(limit: int):
    def set_limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return set_limit


@pytest.mark.parametrize("policy", [pytest.param("stop", marks=pytest.mark.slow), "continue"])
def test_a_checkpoint_past_a_file_size_limit(shared_output_root, stopped_at_4, policy):
    name = f"trust_fsize_{policy}"
    run_dir = _copy(stopped_at_4, shared_output_root, name)
    shard = next((run_dir / "checkpoints" / "step_0000004").glob("*.distcp"))
    overrides = _overrides(shared_output_root, name, "trainer.max_steps=6", f"trainer.on_save_error={policy}")
    out = subprocess.run(
        [sys.executable, "-m", "forge_lm.trainer.train", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_limit_file_size(shard.stat().st_size // 2),
    )
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    if policy == "stop":
        assert out.returncode == 2, out.stderr[-3000:]
        assert "could not save checkpoint step 6" in out.stderr and "needs about" in out.stderr
    else:
        assert out.returncode == 0, out.stderr[-3000:]
        assert "Training continues (trainer.on_save_error=continue)" in out.stdout + out.stderr
        assert "run 'trust_fsize_continue' finished at step 6" in out.stdout
    left = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert left == ["step_0000002", "step_0000004"], left  # no partial step_0000006.tmp, nothing lost
    # The earlier checkpoints still resume.
    result = run(compose_config(*_overrides(shared_output_root, name, "trainer.max_steps=5")))
    assert result.step == 5


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_preemption_signal_during_startup_exits_75(tmp_path, sig):
    proc = subprocess.Popen(
        [sys.executable, "-m", "forge_lm.trainer.train", "data=tiny", f"output_root={tmp_path}"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Wait until the process catches the signal (its handler is in place: the kernel's SigCgt mask shows
    # it), which happens before torch and Hydra are imported; then signal it at once.
    bit = 1 << (int(sig) - 1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except FileNotFoundError:
            break
        caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
        if caught & bit:
            break
        time.sleep(0.001)
    try:
        loaded = Path(f"/proc/{proc.pid}/maps").read_text()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert "libtorch" not in loaded, "torch was already imported: the signal did not land during start-up"
    assert proc.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    assert f"received {sig.name}" in err and "Traceback" not in err
    assert not (tmp_path / "tiny").exists() or not list((tmp_path / "tiny").glob("**/step_*"))


@pytest.mark.slow
def test_deepspeed_resume_refuses_a_planted_payload(tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed: pip install 'forge-lm[deepspeed]'")
    import torch

    overrides = tiny_overrides(
        tmp_path, "ds", "trainer.backend=deepspeed", "trainer.deepspeed.zero_stage=2", *QUIET
    )

    def train(max_steps: int) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "forge_lm.trainer.train", *overrides, f"trainer.max_steps={max_steps}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )

    first = train(2)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = train(3)  # DeepSpeed's own files load through the weights-only reader
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    checkpoint = tmp_path / "ds" / "checkpoints" / "step_0000003"
    optim = next(checkpoint.glob("*optim_states.pt"))
    ran = tmp_path / "payload-ran"
    from forge_lm.trainer.parallel.deepspeed import _deepspeed_checkpoint_types
    from forge_lm.trainer.safe_pickle import safe_torch_load

    state = safe_torch_load(_deepspeed_checkpoint_types())(optim)  # the reader the resume above used
    state["planted"] = _Plant(ran)
    torch.save(state, optim)
    _reseal(checkpoint)
    out = train(4)
    assert out.returncode == 2 and "refused to read" in out.stderr and optim.name in out.stderr, out.stderr[
        -3000:
    ]
    assert "Traceback" not in out.stderr
    assert not ran.exists(), "the planted code ran"
