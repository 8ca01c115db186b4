"""Auxiliary-loss-free MoE balancing (model.moe.balance=bias): the routing biases even out the expert load
where the load-balancing loss does not in the same steps, and they resume exactly from a checkpoint."""

from __future__ import annotations

import pytest
import torch

from forge_lm.trainer.checkpoint import latest_checkpoint
from forge_lm.trainer.metrics import read_metrics
from forge_lm.trainer.train import run
from tests.conftest import compose_config, tiny_overrides

COMMON = ("model=qwen3_moe_tiny", "trainer.max_steps=40", "trainer.log_every=5", "trainer.checkpoint_every=20",
          "eval.every=0", "eval.prompts=[]", "trainer.export_hf=false", "trainer.plot=false")  # fmt: skip
BIAS = ("model.moe.balance=bias", "model.moe.bias_update_rate=0.01")
BOUND = 2.6
"""Worst layer's max/mean expert load, averaged over the logs of steps 25-40 (1.0 is perfect balance)."""


def _late_load(run_dir) -> float:
    late = [r["moe_load_max_over_mean"] for r in read_metrics(run_dir, "train") if r["step"] > 20]
    return sum(late) / len(late)


@pytest.fixture(scope="module")
def runs(shared_output_root):
    aux = run(compose_config(*tiny_overrides(shared_output_root, "moe_aux", *COMMON)))
    bias = run(compose_config(*tiny_overrides(shared_output_root, "moe_bias", *COMMON, *BIAS)))
    return aux, bias


def test_bias_balancing_evens_the_load_where_the_aux_loss_does_not(runs):
    aux, bias = runs
    assert _late_load(bias.run_dir) < BOUND < _late_load(aux.run_dir)


def _routing_biases(checkpoint_dir) -> dict[str, torch.Tensor]:
    from forge_lm.trainer.inference import load_model

    model, _ = load_model(checkpoint_dir)
    return {n: b.clone() for n, b in model.named_buffers() if n.endswith("expert_bias")}


def test_the_routing_biases_resume_exactly(runs, shared_output_root):
    _, whole = runs
    name = "moe_bias_resumed"
    overrides = tiny_overrides(shared_output_root, name, *COMMON, *BIAS)
    first = run(compose_config(*overrides, "trainer.exit_at_step=20"))
    assert first.step == 20
    resumed = run(compose_config(*overrides))
    want = {r["step"]: r["loss"] for r in read_metrics(whole.run_dir, "train")}
    got = {r["step"]: r["loss"] for r in read_metrics(resumed.run_dir, "train") if r["step"] > 20}
    assert got and all(got[s] == pytest.approx(want[s], abs=1e-6) for s in got), (got, want)
    a, b = (_routing_biases(latest_checkpoint(r.run_dir / "checkpoints").path) for r in (whole, resumed))
    assert len(a) == 2 and any(bool(t.any()) for t in a.values())  # both layers, and the biases moved
    assert all(torch.equal(a[k], b[k]) for k in a)
