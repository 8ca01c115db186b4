"""What a run leaves to look at: its overview figure, `forge plot` over several runs, TensorBoard event files."""

from __future__ import annotations

import matplotlib.image
import pytest

from forge_lm.tools.plot_runs import PANELS, plot_runs
from forge_lm.tools.plot_runs import main as plot_main
from forge_lm.trainer.metrics import read_metrics
from forge_lm.trainer.train import run
from tests.conftest import compose_config, tiny_overrides


@pytest.fixture(scope="module")
def two_runs(shared_output_root):
    common = ("trainer.max_steps=6", "eval.every=3", "eval.task_limit=8")
    a = run(compose_config(*tiny_overrides(shared_output_root, "pictures_a", *common)))
    b = run(compose_config(*tiny_overrides(shared_output_root, "pictures_b", *common, "trainer.lr=1e-3")))
    return a, b


def test_every_run_draws_its_figure_and_forge_plot_overlays_runs(two_runs, tmp_path):
    a, b = two_runs
    assert a.figure == a.run_dir / "plots" / "overview.png" and a.figure.is_file()

    out = tmp_path / "both.png"
    assert plot_main([str(a.run_dir), str(b.run_dir), "--out", str(out), "--names", "lr 3e-3", "lr 1e-3"]) == 0
    height, width, _ = matplotlib.image.imread(out).shape
    assert (width, height) == (2000, 900)
    curves = plot_runs([a.run_dir, b.run_dir], tmp_path / "again.png")
    assert list(curves) == PANELS
    assert curves["training loss"] == 4  # raw and smoothed, per run
    assert curves["validation loss"] == 2 and curves["learning rate"] == 2 and curves["gradient norm"] == 2
    assert curves["bits per byte by source"] == 4  # shakespeare and cpython, per run
    assert curves["task accuracy"] == 4  # acc and acc_norm of the default task, per run
    assert curves["throughput"] == 2 and curves["peak memory"] == 2
    assert plot_main([str(tmp_path / "not_a_run")]) == 2


def test_tensorboard_event_files_hold_the_logged_scalars(two_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    a, _ = two_runs
    events = EventAccumulator(str(a.run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    logged = {r["step"]: r["loss"] for r in read_metrics(a.run_dir, "train")}
    board = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(board) == sorted(logged) == list(range(1, 7))
    assert all(abs(board[s] - logged[s]) <= 1e-6 * abs(logged[s]) for s in logged)
    assert {"train/lr", "train/grad_norm", "val/loss", "val/shakespeare/bpb"} <= set(events.Tags()["scalars"])
    assert any(tag.startswith("samples/sample_0") for tag in events.Tags()["tensors"])  # the texts
