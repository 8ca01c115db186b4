"""Checkpoints: complete-only resume, atomic layout, pruning and clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from trainer import checkpoint as ckpt
from trainer.config import TrainerConfig
from trainer.model import Decoder, ModelConfig
from trainer.optim import build_optimizer
from trainer.schedule import build_scheduler

CFG = ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=True)


def _train_state(seed=0, steps=2):
    torch.manual_seed(seed)
    model = Decoder(CFG)
    tcfg = TrainerConfig(max_steps=10, warmup_steps=1)
    opt = build_optimizer(model, tcfg)
    sched = build_scheduler(opt, tcfg)
    for _ in range(steps):
        x = torch.randint(0, 96, (2, 16))
        model(x).logsumexp(-1).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched, tcfg


def test_save_load_round_trip_restores_everything(tmp_path):
    model, opt, sched, tcfg = _train_state()
    loader_state = {"epoch": 1, "position": 40, "seed": 3}
    path = ckpt.save_checkpoint(tmp_path, 2, model, opt, sched, loader_state, extra={"initial_val_loss": 4.5})
    assert path.name == "step_0000002" and (path / "complete.json").is_file()
    assert not list(tmp_path.glob("*.tmp"))

    torch.manual_seed(99)
    model2 = Decoder(CFG)
    opt2 = build_optimizer(model2, tcfg)
    sched2 = build_scheduler(opt2, tcfg)
    state = ckpt.load_checkpoint(path, model2, opt2, sched2)
    assert (
        state["step"] == 2 and state["loader"] == loader_state and state["extra"]["initial_val_loss"] == 4.5
    )
    for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), n
    assert model2.output.weight is model2.tok_embeddings.weight  # tying survives the load
    assert sched2.state_dict() == sched.state_dict()
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)


def test_incomplete_checkpoints_are_never_chosen(tmp_path):
    model, opt, sched, _ = _train_state()
    ckpt.save_checkpoint(tmp_path, 2, model, opt, sched, {})
    # A later save cut short in two ways: still in its temp dir, and renamed without the marker.
    (tmp_path / "step_0000004.tmp").mkdir()
    (tmp_path / "step_0000004.tmp" / "model.safetensors").write_bytes(b"partial")
    cut = tmp_path / "step_0000006"
    cut.mkdir()
    (cut / "model.safetensors").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(tmp_path).step == 2
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        ckpt.load_checkpoint(cut, model)
    # The next save of that step clears the leftover temp dir.
    ckpt.save_checkpoint(tmp_path, 4, model, opt, sched, {})
    assert ckpt.latest_checkpoint(tmp_path).step == 4 and not (tmp_path / "step_0000004.tmp").exists()


def test_keep_last_prunes_oldest(tmp_path):
    model, opt, sched, _ = _train_state()
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, model, opt, sched, {}, keep_last=2)
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [3, 4]
    marker = json.loads((tmp_path / "step_0000004" / "complete.json").read_text())
    assert marker["step"] == 4


def test_loading_into_a_different_model_names_the_mismatch(tmp_path):
    model, opt, sched, _ = _train_state()
    path = ckpt.save_checkpoint(tmp_path, 2, model, opt, sched, {})
    other = Decoder(
        ModelConfig(vocab_size=96, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, tie_embeddings=True)
    )
    with pytest.raises(ckpt.CheckpointError, match="does not match this model.*layers.2"):
        ckpt.load_checkpoint(path, other)


def test_corrupt_weights_give_a_clear_error(tmp_path):
    model, opt, sched, _ = _train_state()
    path = ckpt.save_checkpoint(tmp_path, 2, model, opt, sched, {})
    (path / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ckpt.CheckpointError, match="cannot load weights"):
        ckpt.load_checkpoint(path, model)
