"""Crash-safe checkpoints of everything a run needs to continue exactly where it stopped.

Layout of one checkpoint, `<run_dir>/checkpoints/step_<N>/`:

    model.safetensors   model weights (tied tensors stored once)
    train_state.pt      optimizer, scheduler, data loader, RNG states, step, run metadata;
                        tensors and plain Python values only, loaded with weights_only=True
    complete.json       written last: its presence is what makes the checkpoint count

A checkpoint is assembled in a temporary sibling directory and renamed into place only after
`complete.json` is inside, so a save that is interrupted at any point leaves either nothing or a
`*.tmp` directory that resume never considers (and the next save removes).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_model, save_model
from torch import nn

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")
COMPLETE_MARKER = "complete.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match the model being resumed."""


@dataclass
class Checkpoint:
    path: Path
    step: int


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list[Checkpoint]:
    """Complete checkpoints in `checkpoint_dir`, oldest first. Incomplete ones are ignored."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and (child / COMPLETE_MARKER).is_file():
            found.append(Checkpoint(child, int(m.group(1))))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Optional[Checkpoint]:
    found = list_checkpoints(checkpoint_dir)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    checkpoint_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader_state: dict[str, Any],
    extra: Optional[dict[str, Any]] = None,
    keep_last: int = 2,
) -> Path:
    """Write a complete checkpoint for `step`, then prune to the `keep_last` newest."""
    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f"step_{step:07d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a save that was interrupted
    tmp.mkdir()

    save_model(model, str(tmp / "model.safetensors"))
    torch.save(
        {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "loader": loader_state,
            "rng": rng_state(),
            "extra": extra or {},
        },
        tmp / "train_state.pt",
    )
    marker = {"step": step, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for f in tmp.iterdir():  # contents durable before the marker says they are complete
        _fsync_file(f)
    (tmp / COMPLETE_MARKER).write_text(json.dumps(marker) + "\n")
    _fsync_file(tmp / COMPLETE_MARKER)
    _fsync_dir(tmp)

    if final.exists():  # a checkpoint of the same step from an earlier attempt: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    logger.info("saved checkpoint %s", final)

    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old.path, ignore_errors=True)
    return final


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
) -> dict[str, Any]:
    """Load weights (and, when given, optimizer and scheduler state) in place.

    Returns the rest of the training state: step, loader state, RNG state and run metadata.
    """
    path = Path(path)
    if not (path / COMPLETE_MARKER).is_file():
        raise CheckpointError(
            f"{path} is not a complete checkpoint (no {COMPLETE_MARKER}): its save was interrupted. "
            "Resume from an earlier checkpoint, or use trainer.resume=auto to pick the latest complete one."
        )
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    except Exception as e:  # shape mismatches and corrupt files surface here
        raise CheckpointError(f"cannot load weights from {path / 'model.safetensors'}: {e}") from e
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not match this model: missing {sorted(missing)}, unexpected "
            f"{sorted(unexpected)}. Resume with the model config the checkpoint was trained with."
        )
    state = torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    return state


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a directory's entries durable (a rename is only crash-safe once its directory is synced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
