"""Every logged step says where its time went; chosen steps record per-layer statistics, drawn by forge plot."""

from __future__ import annotations

import logging
import time

import matplotlib.image
import pytest

import forge_lm.trainer.train as train_module
from forge_lm.tools.plot_runs import LAYER_PANELS, plot_layer_stats
from forge_lm.trainer.metrics import read_metrics
from forge_lm.trainer.train import run
from tests.conftest import compose_config, tiny_overrides

PHASES = ("time_data_s", "time_fwd_bwd_s", "time_optimizer_s", "time_comm_s")


@pytest.fixture(scope="module")
def diagnosed(shared_output_root):
    return run(
        compose_config(*tiny_overrides(shared_output_root, "diagnosed", "trainer.max_steps=6", "trainer.log_every=2",
                                       "trainer.checkpoint_every=3", "eval.every=3", "eval.task_limit=4",
                                       "trainer.debug.layer_stats_steps=[2,5]", "trainer.export_hf=false"))  # fmt: skip
    )


def test_every_logged_step_breaks_its_time_down(diagnosed):
    records = {r["step"]: r for r in read_metrics(diagnosed.run_dir, "train")}
    assert sorted(records) == [2, 4, 6]
    for r in records.values():
        assert all(r[key] >= 0 for key in PHASES), r
        assert r["time_fwd_bwd_s"] > 0 and r["time_optimizer_s"] > 0
        # The phases are parts of the step (the rest is Python between them).
        assert sum(r[key] for key in PHASES) <= r["step_time_s"] * 1.02, r
        assert 0 <= r["data_wait_fraction"] < 1
    # Evaluation and the checkpoint of step 3 are reported with the next record, and only there.
    assert records[2]["time_eval_s"] == 0 and records[2]["time_checkpoint_s"] == 0
    assert records[4]["time_eval_s"] > 0 and records[4]["time_checkpoint_s"] > 0
    # The log line's summary of the same record.
    line = train_module._breakdown_line(records[4], records[4]["step_time_s"])
    assert line.startswith("data ") and ", fwd+bwd " in line and ", checkpoint " in line and ", eval " in line


def test_layer_statistics_appear_at_the_chosen_steps_and_are_drawn(diagnosed, tmp_path):
    records = read_metrics(diagnosed.run_dir, "layer_stats")
    assert [r["step"] for r in records] == [2, 5]
    for r in records:
        for block in ("layers.0", "layers.1"):
            for kind in ("act_rms", "act_max", "attn_logit_max", "grad_rms", "update_rms"):
                assert r[f"{kind}/{block}"] > 0, (kind, block, r)
        assert r["grad_rms/tok_embeddings"] > 0 and r["update_rms/norm"] > 0
    figure = diagnosed.run_dir / "plots" / "layer_stats.png"
    assert figure.is_file()
    height, width, _ = matplotlib.image.imread(figure).shape
    assert (width, height) == (1800, 1000)
    curves = plot_layer_stats([diagnosed.run_dir], tmp_path / "again.png")
    assert curves == dict.fromkeys(LAYER_PANELS, 2)  # one curve per recorded step in every panel


class SlowLoader:
    """The real loader, made to take 40 ms per batch (a data pipeline that cannot keep up)."""

    def __init__(self, loader):
        self._loader = loader

    def __next__(self):
        time.sleep(0.04)
        return next(self._loader)

    def __getattr__(self, name):
        return getattr(self._loader, name)


def test_a_loader_that_cannot_keep_up_is_reported(shared_output_root, monkeypatch, caplog):
    real = train_module.build_train_loader
    monkeypatch.setattr(train_module, "build_train_loader", lambda *a, **k: SlowLoader(real(*a, **k)))
    with caplog.at_level(logging.WARNING, logger="forge_lm.trainer.train"):
        result = run(
            compose_config(*tiny_overrides(shared_output_root, "starved", "trainer.max_steps=6", "trainer.log_every=2",
                                           "model.n_layers=1", "eval.every=0", "eval.prompts=[]",
                                           "trainer.export_hf=false", "trainer.plot=false"))  # fmt: skip
        )
    shares = [r["data_wait_fraction"] for r in read_metrics(result.run_dir, "train")]
    assert min(shares) > 0.1, shares
    warnings = [r.getMessage() for r in caplog.records if "waited for data" in r.getMessage()]
    assert len(warnings) == 1, warnings  # then quiet for the next 10 log steps
    assert "trainer.data_stall_warn=0.1" in warnings[0] and "data.prefetch" in warnings[0]
