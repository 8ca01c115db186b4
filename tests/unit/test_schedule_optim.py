"""Learning-rate schedules and AdamW parameter groups."""

from __future__ import annotations

import math

import pytest
import torch

from forge_lm.trainer.config import TrainerConfig
from forge_lm.trainer.model import Decoder, ModelConfig
from forge_lm.trainer.optim import build_optimizer, param_groups
from forge_lm.trainer.schedule import build_scheduler, lr_multiplier


def test_cosine_warms_up_then_decays_to_floor():
    cfg = TrainerConfig(max_steps=100, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    m = [lr_multiplier(s, cfg) for s in range(100)]
    assert m[0] == pytest.approx(0.1) and m[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(m[:10], m[1:10]))  # rising during warmup
    assert all(a >= b for a, b in zip(m[10:], m[11:]))  # falling afterwards
    assert lr_multiplier(100, cfg) == pytest.approx(0.1)
    mid = lr_multiplier(55, cfg)  # halfway through the decay: halfway between peak and floor
    assert mid == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_wsd_holds_then_decays_linearly():
    cfg = TrainerConfig(max_steps=100, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_multiplier(10, cfg) == 1.0 and lr_multiplier(79, cfg) == 1.0
    assert lr_multiplier(89, cfg) == pytest.approx(0.5)
    assert lr_multiplier(99, cfg) == pytest.approx(0.0)


def test_scheduler_drives_optimizer_lr():
    model = torch.nn.Linear(4, 4)
    cfg = TrainerConfig(max_steps=20, warmup_steps=5, lr=1e-3)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(2e-4) and max(seen) == pytest.approx(1e-3)
    assert seen == pytest.approx([1e-3 * lr_multiplier(s, cfg) for s in range(20)])


@pytest.mark.parametrize("tied", [True, False])
def test_no_weight_decay_on_norms_biases_and_embeddings(tied):
    model = Decoder(
        ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=tied)
    )
    decay, no_decay = param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert "tok_embeddings.weight" in not_decayed
    assert all("norm" in n or n == "tok_embeddings.weight" for n in not_decayed)
    assert all(n.endswith(".weight") and "norm" not in n and "tok_embeddings" not in n for n in decayed)
    assert ("output.weight" in decayed) == (not tied)
    # every parameter is in exactly one group
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
