"""trainer.preemption: signals, stop file and time budget become one decision that all ranks share, and
the trainer stops with a complete checkpoint, exit status 75, and resumes to the uninterrupted losses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from forge_lm.trainer.metrics import read_metrics
from forge_lm.trainer.preemption import REQUEUE_EXIT_CODE, StopSignal, restart_count, restart_message
from tests.conftest import REPO
from tests.launch.conftest import assert_same_losses, losses, train_overrides


def test_signal_sets_a_flag_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        assert not stop.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert stop.should_stop() and stop.reason == "received SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing
        assert stop.should_stop() and stop.reason == "received SIGUSR1"
    assert (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)) == before


def test_stop_file_and_time_budget(tmp_path, monkeypatch):
    stop = StopSignal(stop_file=tmp_path / "stop")
    assert not stop.should_stop()
    (tmp_path / "stop").touch()
    assert stop.should_stop() and "stop file" in stop.reason

    monkeypatch.setenv("TRAINER_TIME_BUDGET_S", "0.5")
    stop = StopSignal()
    assert stop.time_budget_s == 0.5
    assert not stop.should_stop()  # first step: nothing known yet
    time.sleep(0.3)
    assert stop.should_stop(), "0.3 s elapsed + a 0.3 s step would overrun 0.5 s"
    assert "time budget" in stop.reason
    with pytest.raises(ValueError):
        StopSignal(time_budget_s=-1)


def test_requeue_marker_and_restart_count(tmp_path, monkeypatch):
    marker = tmp_path / "requeue-7-0"
    monkeypatch.setenv("TRAINER_REQUEUE_FILE", str(marker))
    monkeypatch.setenv("RANK", "1")
    stop = StopSignal(stop_file=tmp_path / "stop")
    (tmp_path / "stop").touch()
    assert stop.should_stop()
    stop.mark_requeue(5, "ckpt")
    assert not marker.exists(), "only rank 0 writes it"
    monkeypatch.setenv("RANK", "0")
    stop.mark_requeue(5, "ckpt")
    assert json.loads(marker.read_text()) == {
        "step": 5,
        "reason": f"stop file {tmp_path / 'stop'} exists",
        "checkpoint": "ckpt",
    }

    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert restart_count() == 0
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    assert (
        restart_message(9, "/x/step_0000009")
        == "SLURM job 41, restart 2: resumed from /x/step_0000009 at step 9"
    )


def _agree_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    stop = StopSignal(stop_file=Path(out_dir) / f"stop-{rank}")
    stopped_at = None
    for step in range(1, 20):
        if rank == 1 and step == 3:
            (Path(out_dir) / "stop-1").touch()  # only rank 1 is told
        if stop.should_stop():
            stopped_at = step
            break
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"step": stopped_at, "reason": stop.reason}))
    dist.destroy_process_group()


def test_every_rank_stops_after_the_same_step(tmp_path):
    ctx = mp.start_processes(
        _agree_worker,
        args=(str(tmp_path / "init"), str(tmp_path)),
        nprocs=2,
        start_method="spawn",
        join=False,
    )
    while not ctx.join(timeout=120):
        pass
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["step"] for r in results] == [3, 3]
    assert results[0]["reason"] == "another rank was asked to stop"
    assert results[1]["reason"].startswith("stop file")


def _train(root: Path, name: str, *extra: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "forge_lm.trainer.train", *train_overrides(root, name, *extra)]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_trainer_stops_on_budget_and_sigterm_then_resumes_exactly(launch_root, reference_losses, tmp_path):
    """A plain single-process run (no launcher): stopped by its time budget, then by SIGTERM, then run to the
    end; every stop leaves a complete checkpoint and exit status 75, and the losses are the uninterrupted ones."""
    run_dir = launch_root / "stops"
    marker = tmp_path / "requeue"
    # 1. the budget runs out before the first step ends (start-up alone takes longer): stop after step 1
    proc = _train(
        launch_root, "stops", "trainer.time_budget_s=0.01", env={"TRAINER_REQUEUE_FILE": str(marker)}
    )
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == REQUEUE_EXIT_CODE, out[-3000:]
    assert "stopping at step 1 for requeue (time budget" in out
    assert json.loads(marker.read_text())["step"] == 1
    assert (run_dir / "checkpoints" / "step_0000001" / "complete.json").is_file()
    # 2. SIGTERM once a few more steps are done
    proc = _train(launch_root, "stops")
    deadline = time.monotonic() + 300
    while (
        time.monotonic() < deadline
        and max((r["step"] for r in read_metrics(run_dir, "train")), default=0) < 4
    ):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == REQUEUE_EXIT_CODE, out[-3000:]
    assert "restart 0: resumed from" in out and "for requeue (received SIGTERM)" in out
    stopped = int(out.split("stopping at step ")[1].split()[0])
    assert 4 <= stopped < 40
    # 3. to the end
    proc = _train(launch_root, "stops")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped:07d}'} at step {stopped}" in out
    assert [r["step"] for r in read_metrics(run_dir, "resume")] == [1, stopped]
    assert_same_losses(losses(run_dir), reference_losses)
