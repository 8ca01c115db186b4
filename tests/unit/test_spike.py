"""`trainer.spike` in one process: the device-side verdict, the dropped update, the fused AdamW it relies on.

(Whole runs, rewinds and two ranks are in tests/e2e/test_spike.py.)
"""

from __future__ import annotations

import math

import pytest
import torch

from forge_lm.trainer import checkpoint as ckpt
from forge_lm.trainer.config import ConfigError, SpikeConfig, TrainerConfig
from forge_lm.trainer.engine import Engine
from forge_lm.trainer.model import Decoder, ModelConfig
from forge_lm.trainer.optim import build_optimizer
from forge_lm.trainer.parallel.mesh import init_parallel
from forge_lm.trainer.schedule import build_scheduler
from forge_lm.trainer.spike import VERDICT, SpikeGuard
from tests.conftest import compose_config

MODEL = [
    "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=32",
    "model.vocab_size=256", "data.seq_len=32", "trainer.global_batch_tokens=64", "trainer.micro_batch_size=2",
    "trainer.precision=fp32", "trainer.device=cpu", "trainer.warmup_steps=1",
]  # fmt: skip


def _verdict(guard: SpikeGuard, loss: float, grad_norm: float) -> dict[str, float]:
    return dict(zip(VERDICT, guard.judge(torch.tensor(loss), torch.tensor(grad_norm)).tolist()))


def test_non_finite_values_are_skipped_from_the_first_step():
    guard = SpikeGuard(SpikeConfig(window=8, min_steps=4), torch.device("cpu"))
    assert _verdict(guard, float("nan"), 1.0)["skipped"] == 1.0
    assert guard.found_inf.item() == 1.0
    assert _verdict(guard, 3.0, float("inf"))["skipped"] == 1.0
    assert _verdict(guard, 3.0, 1.0)["skipped"] == 0.0 and guard.found_inf.item() == 0.0
    assert guard.accepted.item() == 1  # only the applied step entered the window


def test_an_outlier_is_judged_against_the_applied_steps_once_the_window_is_warm():
    guard = SpikeGuard(SpikeConfig(window=8, min_steps=4, z_threshold=6.0), torch.device("cpu"))
    assert _verdict(guard, 3.0, 1.0)["skipped"] == 0.0
    assert _verdict(guard, 3.0, 100.0)["skipped"] == 0.0  # not judged before min_steps values
    guard = SpikeGuard(SpikeConfig(window=8, min_steps=4, z_threshold=6.0), torch.device("cpu"))
    for loss, norm in [(3.0, 1.0), (3.1, 1.1), (2.9, 0.9), (3.0, 1.0)]:
        assert _verdict(guard, loss, norm)["skipped"] == 0.0
    spike = _verdict(guard, 3.0, 50.0)
    assert spike["skipped"] == 1.0
    assert spike["grad_norm_mean"] == pytest.approx(1.0) and spike["grad_norm_std"] == pytest.approx(
        0.0816, abs=1e-3
    )
    assert _verdict(guard, 9.0, 1.0)["skipped"] == 1.0  # a loss spike alone is enough
    assert _verdict(guard, 0.5, 0.1)["skipped"] == 0.0  # a drop is never an outlier
    assert guard.accepted.item() == 5  # the two skipped steps left the window as it was
    # A flat curve: rounding noise above a zero standard deviation is no outlier (the floor).
    flat = SpikeGuard(SpikeConfig(window=4, min_steps=2), torch.device("cpu"))
    for _ in range(4):
        _verdict(flat, 2.0, 1.0)
    assert _verdict(flat, 2.0 + 1e-6, 1.0 + 1e-6)["skipped"] == 0.0


def test_the_window_survives_a_checkpoint_also_into_another_window_size():
    guard = SpikeGuard(SpikeConfig(window=4, min_steps=2), torch.device("cpu"))
    for i in range(6):  # wraps around the ring
        _verdict(guard, 3.0 + i, 1.0 + i)
    state = guard.state_dict()
    same = SpikeGuard(SpikeConfig(window=4, min_steps=2), torch.device("cpu"))
    same.load_state_dict(state)
    assert torch.equal(same.history, guard.history) and same.accepted.item() == 6
    smaller = SpikeGuard(SpikeConfig(window=2, min_steps=2), torch.device("cpu"))
    smaller.load_state_dict(state)
    assert smaller.history[0].tolist() == [7.0, 8.0] and smaller.accepted.item() == 2  # the newest two
    fresh = SpikeGuard(SpikeConfig(window=4, min_steps=2), torch.device("cpu"))
    fresh.load_state_dict(None)  # a checkpoint from before trainer.spike
    assert fresh.accepted.item() == 0


def _engine(*overrides: str) -> Engine:
    cfg = compose_config(*MODEL, *overrides)
    return Engine(
        cfg, init_parallel(cfg.parallel, "cpu"), torch.device("cpu"), Decoder.build(cfg.model, seed=0)
    )


def _batch(seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "position_ids": torch.arange(32).expand(2, 32)}


def _snapshot(engine: Engine) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    opt = engine.optimizers[0]
    params = [p.detach().clone() for p in engine.parts[0].parameters()]
    states = [v.clone() for p in engine.parts[0].parameters() for v in opt.state[p].values()]
    return params, states


@pytest.mark.parametrize("factor", [float("nan"), 1e4])
def test_a_skipped_step_leaves_parameters_moments_and_step_counts_alone(factor):
    engine = _engine("trainer.spike.window=4", "trainer.spike.min_steps=2")
    for seed in range(3):
        assert engine.train_step([_batch(seed)])["spike"][0].item() == 0.0
    before = _snapshot(engine)
    out = engine.train_step([_batch(3)], grad_factor=factor)  # a planted gradient spike
    verdict = dict(zip(VERDICT, out["spike"].tolist()))
    assert verdict["skipped"] == 1.0 and math.isfinite(out["loss"].item())
    after = _snapshot(engine)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0])), "a parameter moved"
    assert all(torch.equal(a, b) for a, b in zip(before[1], after[1])), "optimizer state moved"
    assert engine.optimizers[0].param_groups[0]["lr"] != 0  # the schedule goes on
    out = engine.train_step([_batch(4)])  # the next healthy step is applied
    assert out["spike"][0].item() == 0.0
    assert not all(torch.equal(a, b) for a, b in zip(after[0], _snapshot(engine)[0]))


def test_with_the_policy_off_nothing_is_judged_and_the_update_happens():
    engine = _engine("trainer.spike.enabled=false")
    assert engine.spike is None
    before = _snapshot(engine)[0]
    out = engine.train_step([_batch(0)], grad_factor=1e4)
    assert "spike" not in out
    assert not all(torch.equal(a, b) for a, b in zip(before, _snapshot(engine)[0]))


def test_an_optimizer_state_saved_by_the_foreach_adamw_loads_into_the_fused_one(tmp_path):
    """Checkpoints from before trainer.spike hold foreach=True in their parameter groups: after loading, the
    optimizer is still the fused one (which alone can drop a step) and steps on."""
    cfg = ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)
    tcfg = TrainerConfig(max_steps=10, warmup_steps=1)
    model = Decoder(cfg)
    old = build_optimizer(model, tcfg, fused=False)
    build_scheduler(old, tcfg)  # as in a run: it sets each group's initial_lr
    model(torch.randint(0, 96, (2, 16))).logsumexp(-1).mean().backward()
    old.step()
    path = ckpt.Checkpointer(tmp_path).save(1, [model], [old], {})

    engine_cfg = compose_config(*MODEL)
    engine = Engine(engine_cfg, init_parallel(engine_cfg.parallel, "cpu"), torch.device("cpu"), Decoder(cfg))
    engine.strategy.load(path)
    groups = engine.optimizers[0].param_groups
    assert all(g["fused"] is True and not g["foreach"] for g in groups)
    state = engine.optimizers[0].state[next(engine.parts[0].parameters())]
    assert state["step"].item() == 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.spike.z_threshold=0", r"trainer.spike.z_threshold=0.0 must be > 0"),
        ("trainer.spike.min_steps=1", r"trainer.spike.min_steps=1 need 2 <= min_steps <= window"),
        ("trainer.spike.max_consecutive_skips=0", r"trainer.spike.max_consecutive_skips=0 must be >= 1"),
        ("trainer.debug.inject_spike_batches=[0]", r"must hold batch numbers >= 1"),
    ],
)
def test_bad_values_name_the_field_and_a_value_that_works(override, message):
    with pytest.raises(ConfigError, match=message):
        compose_config(override)
