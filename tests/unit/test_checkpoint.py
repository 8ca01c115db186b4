"""Checkpoints in one process: complete-only resume, atomic layout, pruning, consolidation, clear errors.

(Multi-process saves, resharding across layouts and killed saves are in tests/distributed/.)
"""

from __future__ import annotations

import json

import pytest
import torch

from forge_lm.trainer import checkpoint as ckpt
from forge_lm.trainer.config import TrainerConfig
from forge_lm.trainer.model import Decoder, ModelConfig
from forge_lm.trainer.optim import build_optimizer
from forge_lm.trainer.schedule import build_scheduler

CFG = ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=True)


def _trained(seed=0, steps=2):
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


def _save(root, step, model, opt, keep_last=2, **state):
    return ckpt.Checkpointer(root, keep_last=keep_last).save(step, [model], [opt], state)


def test_save_load_round_trip_restores_weights_and_optimizer(tmp_path):
    model, opt, sched, tcfg = _trained()
    loader_state = {"epoch": 1, "position": 40, "seed": 3}
    path = _save(tmp_path, 2, model, opt, loader=loader_state, scheduler=sched.state_dict(), extra={"x": 4.5})
    assert path.name == "step_0000002" and (path / "complete.json").is_file()
    assert not list(tmp_path.glob("*.tmp"))

    torch.manual_seed(99)
    model2 = Decoder(CFG)
    opt2 = build_optimizer(model2, tcfg)
    state = ckpt.load_checkpoint(path, [model2], [opt2])
    assert state["step"] == 2 and state["loader"] == loader_state and state["extra"]["x"] == 4.5
    assert state["scheduler"] == sched.state_dict()
    for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), n
    assert model2.output.weight is model2.tok_embeddings.weight  # tying survives the load
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for k in s1["state"]:
        assert torch.equal(s1["state"][k]["exp_avg_sq"], s2["state"][k]["exp_avg_sq"])
    assert [g["lr"] for g in s1["param_groups"]] == [g["lr"] for g in s2["param_groups"]]


def test_weights_consolidate_into_a_plain_model(tmp_path):
    model, opt, _, _ = _trained()
    path = _save(tmp_path, 2, model, opt)
    plain = Decoder(CFG)
    ckpt.load_model_weights(path, plain)
    x = torch.randint(0, 96, (1, 12))
    assert torch.equal(plain(x), model(x))


def test_incomplete_checkpoints_are_never_chosen(tmp_path):
    model, opt, _, _ = _trained()
    _save(tmp_path, 2, model, opt)
    # Later saves cut short in two ways: still in the temp dir, and renamed without the marker.
    (tmp_path / "step_0000004.tmp").mkdir()
    (tmp_path / "step_0000004.tmp" / "__0_0.distcp").write_bytes(b"partial")
    cut = tmp_path / "step_0000006"
    cut.mkdir()
    (cut / "__0_0.distcp").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(tmp_path).step == 2
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        ckpt.load_checkpoint(cut, [model])
    # The next save of that step clears the leftover temp dir.
    _save(tmp_path, 4, model, opt)
    assert ckpt.latest_checkpoint(tmp_path).step == 4 and not (tmp_path / "step_0000004.tmp").exists()


def test_keep_last_prunes_oldest(tmp_path):
    model, opt, _, _ = _trained()
    saver = ckpt.Checkpointer(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        saver.save(step, [model], [opt], {})
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [3, 4]
    assert json.loads((tmp_path / "step_0000004" / "complete.json").read_text())["step"] == 4


def test_loading_into_a_different_model_names_the_mismatch(tmp_path):
    model, opt, _, _ = _trained()
    path = _save(tmp_path, 2, model, opt)
    other = Decoder(ModelConfig(vocab_size=96, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, tie_embeddings=True))
    with pytest.raises(ckpt.CheckpointError, match="cannot load .* into this model.*layers.2"):
        ckpt.load_checkpoint(path, [other])


def test_corrupt_shards_give_a_clear_error(tmp_path):
    model, opt, _, _ = _trained()
    path = _save(tmp_path, 2, model, opt)
    for shard in path.glob("*.distcp"):
        shard.write_bytes(b"\x00" * 16)
    with pytest.raises(ckpt.CheckpointError, match="cannot load"):
        ckpt.load_checkpoint(path, [model])
