"""`forge slurm submit` against a real SLURM cluster on this machine (two emulated nodes).

Every training job here is a real sbatch -> srun (one task per node) -> torchrun (c10d rendezvous on the
first node, whose name does not resolve) -> trainer; losses are read back from metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from forge_lm.launch.slurm import main as slurm_main
from forge_lm.launch.slurm import render
from tests.conftest import REPO
from tests.launch.conftest import (
    assert_same_losses,
    job_log,
    losses,
    requeue_record,
    resume_records,
    submit,
    train_overrides,
    wait_finished,
    wait_for_step,
)


def run_main(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = slurm_main(list(args))
    return rc, out.getvalue(), err.getvalue()


# ---- no cluster needed -------------------------------------------------------------------------------------


def test_dry_run_prints_the_batch_script(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    rc, out, err = run_main(
        "submit",
        "--dry-run",
        *train_overrides(tmp_path, "dry"),
        "launch.nodes=2",
        "launch.gpus_per_node=4",
        "launch.partition=gpu",
        "launch.time=01:00:00",
        "launch.signal_seconds=120",
        "parallel.tp=2",
        "trainer.device=cuda",
        "+launch.env.NCCL_DEBUG=INFO",
        "launch.setup=[module load cuda]",
    )
    assert rc == 0, err
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=01:00:00",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={tmp_path}/dry/slurm/job-%j.out",
        "trap 'got_usr1=1' USR1",
        "trap 'got_term=1' TERM",
        "scontrol requeue",
        "export NCCL_DEBUG=INFO",
        "module load cuda",
        "--rdzv-backend=c10d",
        '"--rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT"',
        "--nproc-per-node=4",
        "parallel.tp=2",
    ):
        assert line in out, line
    trainer_command = out.split("srun ", 1)[1].split("srun_pid=", 1)[0]
    assert "launch." not in trainer_command, "launch.* overrides must not reach the trainer"
    assert not (tmp_path / "dry").exists(), "a dry run writes nothing"
    # the script is valid bash
    check = subprocess.run(["bash", "-n"], input=out, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr


def test_cpu_jobs_request_no_gpus_and_one_node_uses_standalone(tmp_path, monkeypatch):
    from forge_lm.launch.config import compose

    monkeypatch.chdir(REPO)
    cfg, launch = compose([*train_overrides(tmp_path, "cpu"), "launch.gpus_per_node=2"])
    script = render(cfg, launch, train_overrides(tmp_path, "cpu"))
    assert "--gpus-per-node" not in script
    assert "--standalone" in script and "--nproc-per-node=2" in script


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["launch.nodes=2", "launch.gpus_per_node=2", "parallel.dp_shard=2"],
            "does not match|make them equal",
        ),
        (["launch.nodes=3", "parallel.tp=2"], "dp_replicate\\*tp\\*pp = 2 does not divide 3"),
        (["launch.time=tomorrow"], "launch.time='tomorrow' is not a SLURM time limit"),
        (["launch.gpu=tpu"], "launch.gpu='tpu' is not known"),
        (["launch.nodess=2"], "nodess"),
    ],
)
def test_bad_config_is_refused_before_anything(tmp_path, monkeypatch, args, message):
    import re

    monkeypatch.chdir(REPO)
    rc, out, err = run_main("submit", *train_overrides(tmp_path, "bad"), *args)
    assert rc == 2 and out == ""
    assert re.search(message, err), err
    assert not (tmp_path / "bad").exists()


def test_no_sbatch_on_the_path(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    rc, out, err = run_main("submit", *train_overrides(tmp_path, "nosbatch"))
    assert rc == 2 and "`sbatch` is not on the PATH" in err and "--dry-run" in err
    assert not (tmp_path / "nosbatch").exists()


# ---- against the cluster ---------------------------------------------------------------------------------


def test_unreachable_controller(slurm, tmp_path, monkeypatch):
    conf = tmp_path / "slurm.conf"
    text = slurm.conf.read_text()
    port = next(line for line in text.splitlines() if line.startswith("SlurmctldPort="))
    conf.write_text(text.replace(port, "SlurmctldPort=9"))  # nothing listens there
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("SLURM_CONF", str(conf))
    rc, out, err = run_main("submit", *train_overrides(tmp_path, "unreachable"))
    assert rc == 2 and "cannot reach the SLURM controller" in err and str(conf) in err, err
    assert not (tmp_path / "unreachable").exists()


def test_unknown_partition_and_too_many_nodes(slurm, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    before = slurm.run("squeue", "-h", "-o", "%i").stdout
    rc, out, err = run_main("submit", *train_overrides(tmp_path, "nopart"), "launch.partition=gpu_big")
    assert rc == 2 and "launch.partition='gpu_big' does not exist" in err and "debug, urgent" in err, err
    rc, out, err = run_main("submit", *train_overrides(tmp_path, "toomany"), "launch.nodes=4")
    assert rc == 2 and "has only 2 node(s)" in err, err
    assert slurm.run("squeue", "-h", "-o", "%i").stdout == before
    assert not (tmp_path / "nopart").exists() and not (tmp_path / "toomany").exists()


def test_two_nodes_and_two_processes_match_one_process(slurm, launch_root, reference_losses, monkeypatch):
    """2 nodes x 1 process and 1 node x 2 processes (FSDP2 over 2) give the single-process losses."""
    jobs = {
        "nodes2": submit(monkeypatch, *train_overrides(launch_root, "nodes2"), "launch.nodes=2"),
        "procs2": submit(monkeypatch, *train_overrides(launch_root, "procs2"), "launch.gpus_per_node=2"),
    }
    for name, job_id in jobs.items():
        run_dir = launch_root / name
        info = wait_finished(slurm, job_id, run_dir)
        log = job_log(run_dir, job_id)
        assert info["JobState"] == "COMPLETED", f"{info}\n{log[-4000:]}"
        assert (run_dir / "slurm" / f"job-{job_id}.sh").is_file(), (
            "the batch script is kept in the run directory"
        )
        assert "rendezvous 127.0.0.1:" in log, (
            "the head node's name n1 does not resolve: its NodeAddr is used"
        )
        assert "dp_shard=2 tp=1 (2 processes)" in log
        assert_same_losses(losses(run_dir), reference_losses)


def _fake_interrupted_saves(run_dir: Path) -> None:
    """Leftovers of saves cut short, newer than any real checkpoint: resume must never pick them."""
    ckpts = run_dir / "checkpoints"
    (ckpts / "step_0000998.tmp").mkdir(parents=True)
    (ckpts / "step_0000998.tmp" / "train_state.pt").write_bytes(b"half")
    (ckpts / "step_0000999").mkdir()
    (ckpts / "step_0000999" / "train_state.pt").write_bytes(b"no complete.json")


def _assert_resumed(run_dir: Path, job_id: str, info: dict, reference: dict[int, float]) -> int:
    log = job_log(run_dir, job_id)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, f"{info}\n{log[-4000:]}"
    stop = requeue_record(run_dir, job_id)
    assert stop.get("step"), f"the trainer did not report a stop for requeue:\n{log[-4000:]}"
    step = stop["step"]
    assert 0 < step < 40
    assert "stop requested" in log and f"stopping at step {step} for requeue" in log, log[-4000:]
    assert "requeueing job" in log and "restart 1" in log
    resumed = resume_records(run_dir)
    assert resumed and resumed[0]["restart_count"] == 1 and resumed[0]["step"] == step, resumed
    assert resumed[0]["resumed_from"].endswith(f"step_{step:07d}"), resumed
    assert f"SLURM job {job_id}, restart 1: resumed from" in log
    assert_same_losses(losses(run_dir), reference)
    return step


def test_warning_signal_requeues_and_resumes(slurm, launch_root, reference_losses, monkeypatch):
    """`scancel -b -s USR1` mid-run: checkpoint, requeue, resume, same losses as an uninterrupted run."""
    run_dir = launch_root / "usr1"
    _fake_interrupted_saves(run_dir)
    job_id = submit(monkeypatch, *train_overrides(launch_root, "usr1"), "launch.gpus_per_node=2")
    wait_for_step(run_dir, 3, slurm, job_id)
    slurm.run("scancel", "-b", "-s", "USR1", job_id)
    info = wait_finished(slurm, job_id, run_dir)
    _assert_resumed(run_dir, job_id, info, reference_losses)


def test_preemption_by_a_higher_priority_partition(
    slurm, launch_root, reference_losses, monkeypatch, tmp_path
):
    """A job in `urgent` preempts the training job, which checkpoints, is requeued, and resumes."""
    run_dir = launch_root / "preempted"
    job_id = submit(monkeypatch, *train_overrides(launch_root, "preempted"), "launch.nodes=2")
    wait_for_step(run_dir, 3, slurm, job_id)
    urgent = slurm.run(
        "sbatch",
        "--parsable",
        "-p",
        "urgent",
        "--exclusive",
        "-N2",
        "-o",
        str(tmp_path / "urgent.out"),
        "--wrap",
        "sleep 1",
    ).stdout.strip()
    info = wait_finished(slurm, job_id, run_dir)
    assert slurm.job(urgent).get("JobState") == "COMPLETED", slurm.job(urgent)
    _assert_resumed(run_dir, job_id, info, reference_losses)


def test_scancel_cancels_for_good(slurm, launch_root, reference_losses, monkeypatch):
    """A plain `scancel` is a cancel, not a preemption: the job is not requeued by its script."""
    run_dir = launch_root / "cancelled"
    job_id = submit(monkeypatch, *train_overrides(launch_root, "cancelled"))
    wait_for_step(run_dir, 2, slurm, job_id)
    slurm.run("scancel", job_id)
    info = wait_finished(slurm, job_id, run_dir)
    log = job_log(run_dir, job_id)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", f"{info}\n{log[-3000:]}"
    assert "requeueing" not in log


def test_hydra_multirun_through_submitit(slurm, launch_root, reference_losses, tmp_path):
    """`-m hydra/launcher=submitit_slurm` with two values: two jobs, each with its own run directory."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cmd = [
        sys.executable,
        "-m",
        "forge_lm.trainer.train",
        "-m",
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.partition=debug",
        "hydra.launcher.timeout_min=10",
        "hydra.launcher.cpus_per_task=1",
        *train_overrides(launch_root, "sweep", "trainer.max_steps=4"),
        "trainer.lr=3e-3,1e-3",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    sweep = launch_root / "multirun" / "sweep"
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in runs] == ["0", "1"], list(sweep.iterdir())
    got = {}
    for run, lr in zip(runs, ("0.003", "0.001")):
        assert f"lr: {lr}" in (run / "config.yaml").read_text()
        assert (run / "checkpoints" / "step_0000004" / "complete.json").is_file()
        got[lr] = losses(run)
        assert sorted(got[lr]) == [1, 2, 3, 4]
    # one batch order, two learning rates: the same first loss, then apart
    assert abs(got["0.003"][1] - got["0.001"][1]) < 1e-6
    assert abs(got["0.003"][4] - got["0.001"][4]) > 1e-3
    assert list((sweep / ".submitit").iterdir()), "submitit's job folders are under the sweep directory"
