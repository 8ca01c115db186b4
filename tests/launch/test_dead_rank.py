"""Dead and frozen ranks (trainer.parallel.liveness): real torchrun jobs whose ranks get SIGKILL or SIGSTOP.

A killed rank ends the job at once, a frozen one within parallel.collective_timeout_s; the rerun resumes
from the last complete checkpoint and ends bit-identical to an uninterrupted run, with synchronous and
with asynchronous checkpoints (the kill campaign of forge_lm.tools.kill_campaign, small here and full
under `-m slow`). Smaller scenarios run two bare processes: solo work longer than the collective timeout
is not taken for a dead peer, and an error on one rank ends the others with status 1 (no requeue).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from forge_lm.tools.kill_campaign import (
    alive,
    end_group,
    last_step,
    make_reference,
    run_campaign,
    run_config,
    start_torchrun,
    worker_pids,
)
from forge_lm.trainer.config import ConfigError
from forge_lm.trainer.preemption import REQUEUE_EXIT_CODE
from tests.conftest import REPO, compose_config


@pytest.fixture(scope="module")
def campaign_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dead_rank")


@pytest.fixture(scope="module")
def reference(campaign_root) -> Path:
    """An uninterrupted 2-process run with synchronous checkpoints (it also prepares the data once)."""
    return make_reference(campaign_root)


def _assert_campaign(campaign, kills: int) -> None:
    summary = campaign.summary(bound=60)
    assert summary["kills"] == kills, summary
    assert summary["all_ended_in_time"], [k for k in campaign.kills]
    assert summary["all_identical"], campaign.runs


def test_a_killed_rank_ends_the_job_and_the_rerun_resumes_exactly(campaign_root, reference):
    """Synchronous checkpoints: SIGKILL to one rank mid-run, the other is gone within 60 s and torchrun
    fails; the rerun ends with the reference's losses, tensors and train state, bit for bit."""
    campaign = run_campaign(
        campaign_root,
        kills=1,
        kills_per_run=1,
        async_checkpoint=False,
        seed=3,
        reference=reference,
        prefix="sync",
        say=print,
    )
    _assert_campaign(campaign, 1)


def test_kill_campaign_with_async_checkpoints(campaign_root, reference):
    """trainer.async_checkpoint=true: two kills in one run, one aimed at the moment a save begins."""
    campaign = run_campaign(
        campaign_root, kills=2, kills_per_run=2, seed=0, reference=reference, prefix="async", say=print
    )
    _assert_campaign(campaign, 2)
    assert campaign.summary(60)["aimed_at_saves"] == 1


@pytest.mark.slow
def test_full_kill_campaign_with_async_checkpoints(campaign_root, reference):
    """The campaign recorded in docs/BENCHMARKS.md: 20 kills over 2 processes, 4 per run."""
    campaign = run_campaign(
        campaign_root, kills=20, kills_per_run=4, seed=0, reference=reference, prefix="full", say=print
    )
    _assert_campaign(campaign, 20)
    assert campaign.summary(60)["during_saves"] >= 5


def test_a_frozen_rank_ends_the_job_within_the_bound(campaign_root, reference, tmp_path):
    """SIGSTOP to rank 0: rank 1 ends itself within parallel.collective_timeout_s (plus one heartbeat),
    saying which peer went silent, with status 75 and the requeue file; torchrun then stops the frozen
    process (SIGTERM, and SIGKILL after its 30 s grace) and fails."""
    bound = 10
    requeue = tmp_path / "requeue.json"
    name = "frozen"
    overrides = run_config(
        campaign_root, name, False, ("trainer.max_steps=400", f"parallel.collective_timeout_s={bound}")
    )
    log = campaign_root / "logs" / f"{name}.log"
    launcher = start_torchrun(2, overrides, log, env={"TRAINER_REQUEUE_FILE": str(requeue)})
    try:
        pids = worker_pids(launcher, 2)
        deadline = time.monotonic() + 300
        while last_step(campaign_root / name) < 3:
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        os.kill(pids[0], signal.SIGSTOP)
        frozen_at = time.monotonic()
        while alive(pids[1]) and time.monotonic() - frozen_at < bound + 60:
            time.sleep(0.05)
        survivor_s = time.monotonic() - frozen_at
        launcher.wait(timeout=max(1.0, bound + 60 - survivor_s))
        job_s = time.monotonic() - frozen_at
    finally:
        end_group(launcher)
    out = log.read_text()
    # One heartbeat interval (a tenth of the bound) late at most, and a few seconds for a loaded machine.
    assert bound - 1 <= survivor_s <= bound + 1 + 5, (survivor_s, out[-3000:])
    assert launcher.returncode != 0 and job_s <= bound + 30 + 10, (launcher.returncode, job_s)
    assert "[rank 1] peer lost: rank 0 stopped answering" in out, out[-3000:]
    assert f"exitcode  : {REQUEUE_EXIT_CODE}" in out  # torchrun's report of rank 1
    record = json.loads(requeue.read_text())
    assert record["reason"].startswith("peer lost: rank 0 stopped answering"), record


# ---- two bare processes ----------------------------------------------------------------------------------

_PEERS = textwrap.dedent(
    """
    import datetime, os, sys, time
    import torch.distributed as dist
    from forge_lm.trainer.parallel import collectives, liveness

    scenario, rank, timeout = sys.argv[1], int(os.environ["RANK"]), 5.0
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
    liveness.start(rank, 2, timeout)
    collectives.set_timeout(timeout)
    if scenario == "long solo work":
        if rank == 0:
            time.sleep(2 * timeout)  # e.g. preparing the data while rank 1 waits
        collectives.wait_for_all("rank 0's solo work")
        collectives.barrier()
        print("both passed", flush=True)
    else:  # "error": rank 1 dies of a bug while rank 0 waits for it
        if rank == 1:
            with liveness.tell_peers_on_failure():
                raise ValueError("bad record in shard 7")
        collectives.wait_for_all("never opens")
    liveness.stop()
    dist.destroy_process_group()
    """
)


def _two_peers(scenario: str) -> list[subprocess.CompletedProcess]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PEERS, scenario],
            cwd=REPO,
            env={**env, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def test_solo_work_longer_than_the_collective_timeout_is_not_a_dead_peer():
    for rank, result in enumerate(_two_peers("long solo work")):
        assert result.returncode == 0 and "both passed" in result.stdout, (rank, result.stderr[-3000:])


def test_an_error_on_one_rank_ends_the_others_with_status_1():
    started = time.monotonic()
    waiting, failing = _two_peers("error")
    assert time.monotonic() - started < 60
    assert failing.returncode == 1 and "ValueError: bad record in shard 7" in failing.stderr
    assert waiting.returncode == 1, waiting.stderr[-3000:]
    assert waiting.stderr.strip().splitlines()[-1] == (
        "[rank 0] ending: rank 1 failed with ValueError: bad record in shard 7; its log has the traceback. "
        "Not requeued (exit status 1)."
    )


def test_a_timeout_too_short_to_tell_slow_from_dead_is_refused():
    with pytest.raises(
        ConfigError, match=r"parallel.collective_timeout_s=2.0 is too short .* at least 5 seconds"
    ):
        compose_config("parallel.collective_timeout_s=2")
