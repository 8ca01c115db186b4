"""`forge torchrun`: the flags it fills in, and the layouts it refuses before starting anything."""

from __future__ import annotations

import contextlib
import io

from forge_lm.launch.torchrun import main
from tests.conftest import REPO
from tests.launch.conftest import train_overrides


def run(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


def test_one_node(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    rc, out, err = run(
        "--dry-run", *train_overrides(tmp_path, "t"), "launch.gpus_per_node=4", "parallel.tp=2"
    )
    assert rc == 0, err
    assert "-m torch.distributed.run --standalone --nproc-per-node=4 --max-restarts=0 -m forge_lm.trainer.train" in out
    assert "parallel.tp=2" in out and "launch." not in out


def test_several_nodes_need_a_rendezvous(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    rc, out, err = run("--dry-run", *train_overrides(tmp_path, "t"), "launch.nodes=2")
    assert rc == 2 and "launch.rdzv_endpoint=host:port" in err
    rc, out, err = run(
        "--dry-run",
        *train_overrides(tmp_path, "t"),
        "launch.nodes=2",
        "launch.gpus_per_node=4",
        "launch.rdzv_endpoint=node001:29500",
    )
    assert rc == 0, err
    for flag in (
        "--nnodes=2",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=node001:29500",
        "--rdzv-id=t",
        "--nproc-per-node=4",
    ):
        assert flag in out


def test_layout_must_use_every_process(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    rc, out, err = run(
        "--dry-run", *train_overrides(tmp_path, "t"), "launch.gpus_per_node=4", "parallel.dp_shard=2"
    )
    assert rc == 2 and out == ""
    assert "launch.nodes=1 x launch.gpus_per_node=4 = 4 processes" in err and "make them equal" in err


def test_a_user_config_dir_travels_to_the_job(tmp_path, monkeypatch):
    """`--config-dir` reaches the training command as an absolute search path, for torchrun and SLURM."""
    from forge_lm.launch.slurm import main as slurm_main

    (tmp_path / "my_configs" / "experiment").mkdir(parents=True)
    (tmp_path / "my_configs" / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ntrainer: {max_steps: 3}\n"
    )
    monkeypatch.chdir(tmp_path)
    search = f"hydra.searchpath=[file://{tmp_path / 'my_configs'}]"
    overrides = [*train_overrides(tmp_path, "t"), "experiment=mine", "launch.gpus_per_node=2"]
    rc, out, err = run("--dry-run", "--config-dir", "my_configs", *overrides)
    assert rc == 0, err
    assert search in out and "experiment=mine" in out and "--config-dir" not in out

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = slurm_main(["submit", "--dry-run", "--config-dir", "my_configs", *overrides])
    assert rc == 0, err.getvalue()
    assert search in out.getvalue() and "experiment=mine" in out.getvalue()
