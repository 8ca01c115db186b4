"""Checkpoints a user can trust, in one process: checksums catch corruption and resume falls back past it,
pickled parts never run code, a failed save leaves nothing behind, and removal is atomic.

Writes that must fail (a file-size limit) and kills in the middle of pruning run in child processes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from forge_lm.tools.export_hf import main as export_main
from forge_lm.tools.verify_checkpoint import main as verify_main
from forge_lm.trainer import checkpoint as ckpt
from forge_lm.trainer.checkpoint_verify import COMPLETE_MARKER, file_record
from forge_lm.trainer.config import TrainerConfig
from forge_lm.trainer.inference import load_model
from forge_lm.trainer.model import Decoder, ModelConfig
from forge_lm.trainer.optim import build_optimizer
from tests.conftest import REPO

CFG = ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=True)


def _trained(seed: int = 0, steps: int = 2):
    torch.manual_seed(seed)
    model = Decoder(CFG)
    opt = build_optimizer(model, TrainerConfig(max_steps=10, warmup_steps=1))
    for _ in range(steps):
        model(torch.randint(0, 96, (2, 16))).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _save_steps(root: Path, steps, keep_last: int = 5) -> dict[int, Decoder]:
    """Checkpoints of differently trained models at `steps`; returns the model saved at each step."""
    saver = ckpt.Checkpointer(root, keep_last=keep_last)
    models = {}
    for i, step in enumerate(steps):
        model, opt = _trained(seed=i, steps=1 + i)
        extra = {"model_config": dataclasses.asdict(CFG)}
        saver.save(step, [model], [opt], {"extra": extra})
        models[step] = model
    return models


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _flip_bytes(path: Path, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _reseal(checkpoint: Path) -> None:
    """What someone who plants a file does too: rewrite complete.json's checksums to match the files."""
    marker = json.loads((checkpoint / COMPLETE_MARKER).read_text())
    marker["files"] = {f.name: file_record(f) for f in checkpoint.iterdir() if f.name != COMPLETE_MARKER}
    (checkpoint / COMPLETE_MARKER).write_text(json.dumps(marker))


class _Plant:
    """Unpickling this opens (so creates) a file: a harmless stand-in for any code a pickle can run."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# ---- checksums ---------------------------------------------------------------------------------------------


def test_every_file_is_recorded_and_verifies(tmp_path):
    _save_steps(tmp_path, [2])
    path = tmp_path / "step_0000002"
    record = json.loads((path / COMPLETE_MARKER).read_text())
    on_disk = {f.name for f in path.iterdir()} - {COMPLETE_MARKER}
    assert set(record["files"]) == on_disk and {".metadata", "train_state.pt"} <= on_disk
    assert not list(path.glob("*checksums.json")), "per-rank records are merged, then removed"
    assert ckpt.verify_checkpoint(path).status == "ok"


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_resume_skips_a_corrupt_newest_checkpoint_naming_the_file(tmp_path, caplog, damage):
    models = _save_steps(tmp_path, [2, 4])
    shard = next((tmp_path / "step_0000004").glob("*.distcp"))
    if damage == "flipped":
        _flip_bytes(shard)
    else:
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        chosen = ckpt.latest_checkpoint(tmp_path)
    assert chosen.step == 2
    assert shard.name in caplog.text and "corrupt" in caplog.text
    model = Decoder(CFG)
    ckpt.load_checkpoint(chosen.path, [model])
    assert _same_weights(model, models[2])

    # Named explicitly, the corrupt one is a one-line error that calls it corruption and names the file.
    with pytest.raises(ckpt.CheckpointCorruptError) as err:
        ckpt.load_checkpoint(tmp_path / "step_0000004", [Decoder(CFG)])
    message = str(err.value)
    assert "corrupt" in message and shard.name in message and "model config" not in message
    assert "\n" not in message


def test_every_checkpoint_corrupt_is_a_clear_error_and_verify_reports_each(tmp_path, capsys):
    _save_steps(tmp_path, [2, 4])
    for step in (2, 4):
        _flip_bytes(next((tmp_path / f"step_{step:07d}").glob("*.distcp")))
    with pytest.raises(ckpt.CheckpointCorruptError, match="every complete checkpoint .* is corrupt"):
        ckpt.latest_checkpoint(tmp_path)
    assert verify_main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert out.count("CORRUPT") == 2 and "__0_0.distcp" in out


def test_forge_verify_reports_ok_and_unverified(tmp_path, capsys):
    _save_steps(tmp_path, [2, 4])
    legacy = tmp_path / "step_0000002" / COMPLETE_MARKER
    legacy.write_text(json.dumps({"step": 2}))  # as written before checksums were recorded
    assert verify_main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "UNVERIFIED" in out and "step_0000004" in out


def test_checkpoints_without_checksums_still_load_with_a_note(tmp_path, caplog):
    models = _save_steps(tmp_path, [2])
    path = tmp_path / "step_0000002"
    (path / COMPLETE_MARKER).write_text(json.dumps({"step": 2, "saved_at": "2025-01-01T00:00:00"}))
    model = Decoder(CFG)
    with caplog.at_level(logging.WARNING):
        ckpt.load_model_weights(path, model)
    assert _same_weights(model, models[2])
    assert "without checksums" in caplog.text


def test_a_mismatched_model_is_still_told_apart_from_corruption(tmp_path):
    _save_steps(tmp_path, [2])
    other = Decoder(
        ModelConfig(vocab_size=96, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, tie_embeddings=True)
    )
    with pytest.raises(ckpt.CheckpointError, match="model config the checkpoint was trained with") as err:
        ckpt.load_checkpoint(tmp_path / "step_0000002", [other])
    assert not isinstance(err.value, ckpt.CheckpointCorruptError)


# ---- loading never runs code ------------------------------------------------------------------------------


def test_a_planted_metadata_pickle_is_refused_by_every_reader(tmp_path):
    _save_steps(tmp_path / "run" / "checkpoints", [2])
    path = tmp_path / "run" / "checkpoints" / "step_0000002"
    ran = tmp_path / "payload-ran"
    (path / ".metadata").write_bytes(pickle.dumps(_Plant(ran)))
    _reseal(path)
    # The payload is live: plain pickle, as DCP's own reader uses, would run it.
    pickle.loads((path / ".metadata").read_bytes())
    assert ran.exists()
    ran.unlink()

    with pytest.raises(ckpt.CheckpointError, match="refused to read .*metadata"):
        ckpt.load_checkpoint(path, [Decoder(CFG)])
    with pytest.raises(ckpt.CheckpointError, match="refused"):
        ckpt.load_model_weights(path, Decoder(CFG))
    with pytest.raises(ckpt.CheckpointError, match="refused"):
        load_model(tmp_path / "run")
    assert export_main([str(path), str(tmp_path / "hf")]) == 2
    assert verify_main([str(path)]) == 1
    assert not ran.exists(), "the planted code ran"
    assert not (tmp_path / "hf").exists()


def test_a_planted_payload_among_the_optimizer_items_is_refused(tmp_path):
    _save_steps(tmp_path, [2])
    path = tmp_path / "step_0000002"
    model, opt = _trained()
    state = {"model": ckpt.model_state([model]), "optim": ckpt.optimizer_state([model], [opt])}
    group_key = next(k for k in state["optim"] if k.startswith("param_groups.") and k.endswith(".lr"))
    ran = tmp_path / "payload-ran"
    state["optim"][group_key] = _Plant(ran)
    dcp.save(state, checkpoint_id=str(path), no_dist=True)  # the planted checkpoint replaces the real one
    _reseal(path)
    # The payload is live: DCP's default planner (torch.load with weights_only=False) would run it.
    probe = {"model": ckpt.model_state([Decoder(CFG)]), "optim": {group_key: 0.0}}
    dcp.load(probe, checkpoint_id=str(path), no_dist=True)
    assert ran.exists()
    ran.unlink()

    fresh = Decoder(CFG)
    fresh_opt = build_optimizer(fresh, TrainerConfig(max_steps=10, warmup_steps=1))
    with pytest.raises(ckpt.CheckpointError, match="refused to read the checkpoint item"):
        ckpt.load_checkpoint(path, [fresh], [fresh_opt])
    assert not ran.exists(), "the planted code ran"


# ---- a save that cannot be written --------------------------------------------------------------------------

_SAVE_CHILD = textwrap.dedent(
    """
    import sys, torch
    from forge_lm.trainer import checkpoint as ckpt
    from forge_lm.trainer.config import TrainerConfig
    from forge_lm.trainer.model import Decoder, ModelConfig
    from forge_lm.trainer.optim import build_optimizer

    root, policy = sys.argv[1], sys.argv[2]
    model = Decoder(ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=True))
    opt = build_optimizer(model, TrainerConfig(max_steps=10, warmup_steps=1))
    saver = ckpt.Checkpointer(root, on_save_error=policy)
    try:
        result = saver.save(4, [model], [opt], {})
    except ckpt.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print("saved" if result else "continued")
    """
)


def _limit_file_size(limit: int):
    def set_limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return set_limit


@pytest.mark.parametrize("policy", ["stop", "continue"])
def test_a_save_past_a_file_size_limit_fails_cleanly(tmp_path, policy):
    models = _save_steps(tmp_path, [2])
    shard = next((tmp_path / "step_0000002").glob("*.distcp"))
    limit = shard.stat().st_size // 2  # the tensors do not fit, the small files do
    out = subprocess.run(
        [sys.executable, "-c", _SAVE_CHILD, str(tmp_path), policy],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_limit_file_size(limit),
    )
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    if policy == "stop":
        assert out.returncode == 2, out.stderr[-3000:]
        message = out.stderr.strip().splitlines()[-1]
        assert "could not save checkpoint step 4" in message and "step_0000004.tmp" in message
        assert "needs about" in message and "free there" in message and "EFBIG" in message
        assert "step_0000002" in message and "untouched" in message
    else:
        assert out.returncode == 0 and out.stdout.strip() == "continued", out.stderr[-3000:]
        assert "on_save_error=continue" in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000002"], "partial checkpoint left behind"
    model = Decoder(CFG)
    ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path).path, [model])
    assert _same_weights(model, models[2])


# ---- removal and replacement cut short by a kill --------------------------------------------------------------

_KILL_CHILD = textwrap.dedent(
    """
    import os, shutil, signal, sys, torch
    from forge_lm.trainer import checkpoint as ckpt
    from forge_lm.trainer.config import TrainerConfig
    from forge_lm.trainer.model import Decoder, ModelConfig
    from forge_lm.trainer.optim import build_optimizer

    root, where = sys.argv[1], sys.argv[2]
    model = Decoder(ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=True))
    opt = build_optimizer(model, TrainerConfig(max_steps=10, warmup_steps=1))
    saver = ckpt.Checkpointer(root, keep_last=2)
    saver.save(2, [model], [opt], {"attempt": 1})
    saver.save(4, [model], [opt], {"attempt": 1})

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if where == "pruning":
        # Deleting the oldest checkpoint gets as far as its tensors, then the process is killed.
        real_rmtree = shutil.rmtree
        def rmtree(path, *args, **kwargs):
            for f in sorted(os.listdir(path)):
                if f.endswith(".distcp"):
                    os.remove(os.path.join(path, f))
            die()
        ckpt.shutil.rmtree = rmtree
        saver.save(6, [model], [opt], {"attempt": 1})
    else:
        # Step 4 saved again (as after trainer.resume=<step 2>): killed while the old copy is replaced.
        real_replace = os.replace
        def replace(src, dst):
            if str(src).endswith(".tmp"):
                die()
            real_replace(src, dst)
        ckpt.os.replace = replace
        real_rmtree = shutil.rmtree
        def rmtree(path, *args, **kwargs):
            if str(path).endswith("step_0000004"):  # (how an in-place delete would be cut short)
                for f in sorted(os.listdir(path)):
                    if f.endswith(".distcp"):
                        os.remove(os.path.join(path, f))
                die()
            real_rmtree(path, *args, **kwargs)
        ckpt.shutil.rmtree = rmtree
        saver.save(4, [model], [opt], {"attempt": 2})
    print("not killed")
    """
)


@pytest.mark.parametrize("where", ["pruning", "replacing"])
def test_a_kill_while_removing_or_replacing_leaves_resumable_checkpoints(tmp_path, where):
    out = subprocess.run(
        [sys.executable, "-c", _KILL_CHILD, str(tmp_path), where],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == -signal.SIGKILL, out.stdout + out.stderr[-3000:]
    # No manual step: the next start tidies up, and every checkpoint marked complete verifies and loads.
    ckpt.Checkpointer(tmp_path, keep_last=2)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".deleting")]
    for found in ckpt.list_checkpoints(tmp_path):
        assert ckpt.verify_checkpoint(found.path).status == "ok", found.path
        ckpt.load_checkpoint(found.path, [Decoder(CFG)])
    latest = ckpt.latest_checkpoint(tmp_path)
    if where == "pruning":
        assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [4, 6]
    else:
        assert latest.step == 4 and ckpt.read_train_state(latest.path)["attempt"] == 2
        assert not (tmp_path / "step_0000004.tmp").exists()


def test_removal_renames_before_deleting(tmp_path, monkeypatch):
    _save_steps(tmp_path, [2])
    seen = []
    monkeypatch.setattr(ckpt.shutil, "rmtree", lambda path, **kw: seen.append(Path(path).name))
    ckpt.remove_checkpoint(tmp_path / "step_0000002")
    assert seen == ["step_0000002.deleting"] and ckpt.list_checkpoints(tmp_path) == []
