"""Fixtures of the launch tests: a real local SLURM cluster, a shared output root, a reference run.

The cluster (tests/launch/cluster.py) is started once per session in a fresh scratch directory, after
installing Debian's slurm-wlm and munge if they are missing, and stopped at the end by its pid files. If
it cannot be installed (not root, no apt-get) the tests that need it are skipped, saying why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from forge_lm.trainer.metrics import read_metrics
from tests.conftest import REPO
from tests.distributed.conftest import BASE_OVERRIDES, replace_overrides
from tests.launch.cluster import ClusterError, LocalSlurm, ensure_installed

# The tiny model of tests/distributed with fewer layers; 8 sequences of 64 tokens per step, so one
# process accumulates 8 micro-batches and two processes 4 each: the same global batch in every layout.
TRAIN = replace_overrides(BASE_OVERRIDES, "model.n_layers=4", "trainer.max_steps=40", "eval.prompts=[]")

JOB_TIMEOUT = 240
"""Seconds a training job may take from submission to the end (requeues included) before a test fails."""

FINAL_STATES = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> Iterator[LocalSlurm]:
    """A running two-node SLURM cluster on this machine; SLURM_CONF is set for the whole session."""
    try:
        ensure_installed()
    except ClusterError as e:
        pytest.skip(f"no local SLURM cluster: {e}")
    # Not under pytest's private (0700) temporary root: munged needs every directory above its socket
    # to be world-executable. A fresh directory per session, removed at the end.
    base = Path(tempfile.mkdtemp(prefix="forge-slurm-"))
    base.chmod(0o755)
    cluster = LocalSlurm(base)
    old = os.environ.get("SLURM_CONF")
    try:
        cluster.start()
    except ClusterError as e:
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"the local SLURM cluster did not start: {e}")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        cluster.stop()
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def launch_root(tmp_path_factory) -> Path:
    """Output root shared by every run of the session: the tokenizer and shards are prepared once."""
    return tmp_path_factory.mktemp("launch_runs")


def train_overrides(root: Path, name: str, *extra: str) -> list[str]:
    return [*TRAIN, f"output_root={root}", f"name={name}", *extra]


@pytest.fixture(scope="session")
def reference_losses(launch_root) -> dict[int, float]:
    """A plain single-process run of the same global batch: the losses every layout must reproduce.
    It also prepares the tokenizer and shards, so the SLURM jobs only read them."""
    cmd = [sys.executable, "-m", "forge_lm.trainer.train", *train_overrides(launch_root, "reference")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"reference run failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return losses(launch_root / "reference")


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir, "train")}


def assert_same_losses(got: dict[int, float], want: dict[int, float], tol: float = 1e-4) -> None:
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    worst = max(abs(got[s] - want[s]) for s in want)
    assert worst <= tol, {s: (got[s], want[s]) for s in want}


def submit(monkeypatch, *args: str) -> str:
    """`forge slurm submit <args>` in this process (from the repo root); returns the job id."""
    import contextlib
    import io

    from forge_lm.launch.slurm import main

    monkeypatch.chdir(REPO)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["submit", *args])
    printed = buf.getvalue()
    assert rc == 0, printed
    first = printed.splitlines()[0]
    assert first.startswith("submitted job "), printed
    return first.split()[2].rstrip(":")


def job_log(run_dir: Path, job_id: str) -> str:
    path = run_dir / "slurm" / f"job-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def wait_finished(
    cluster: LocalSlurm, job_id: str, run_dir: Path, timeout: float = JOB_TIMEOUT
) -> dict[str, str]:
    try:
        return cluster.wait_job(job_id, FINAL_STATES, timeout)
    except TimeoutError as e:
        raise AssertionError(
            f"{e}\n--- job log:\n{job_log(run_dir, job_id)[-4000:]}\n{cluster.logs()}"
        ) from e


def wait_for_step(
    run_dir: Path, step: int, cluster: LocalSlurm, job_id: str, timeout: float = JOB_TIMEOUT
) -> None:
    """Wait until the run has logged training step `step` (so a signal now lands mid-run)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [r["step"] for r in read_metrics(run_dir, "train")]
        if steps and max(steps) >= step:
            return
        if cluster.job(job_id).get("JobState") in FINAL_STATES:
            break
        time.sleep(0.1)
    raise AssertionError(
        f"run did not reach step {step}: job {cluster.job(job_id)}\n--- log:\n{job_log(run_dir, job_id)[-4000:]}"
    )


def resume_records(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir, "resume")


def requeue_record(run_dir: Path, job_id: str, restart: int = 0) -> dict:
    path = run_dir / "slurm" / f"requeue-{job_id}-{restart}"
    return json.loads(path.read_text()) if path.exists() else {}
