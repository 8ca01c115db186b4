"""Crash-safe, layout-independent checkpoints of everything a run needs to continue exactly.

Layout of one checkpoint, `<run_dir>/checkpoints/step_<N>/`:

    *.distcp, .metadata   model and optimizer state through torch.distributed.checkpoint (DCP): every
                          rank writes its own shards; names are the model's own parameter names, so a
                          checkpoint saved under one parallel layout loads into any other (or into a
                          plain single-process model)
    train_state.pt        step, schedule, data-loader position, RNG state, run metadata (rank 0; tensors
                          and plain Python values only, loaded with weights_only=True)
    complete.json         written last, by rank 0, after every rank has finished writing

A checkpoint is assembled in `step_<N>.tmp` and renamed into place only once `complete.json` is
inside, so a save interrupted at any point (a killed job, a full disk) leaves nothing that resume
would pick; the next save of that step clears the leftover.
"""

from __future__ import annotations

import concurrent.futures
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
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from forge_lm.trainer.parallel import collectives

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")
COMPLETE_MARKER = "complete.json"
TRAIN_STATE = "train_state.pt"
_OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


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


# ---- model and optimizer state of one rank, keyed by the model's own parameter names ---------------------


def model_state(parts: list[nn.Module]) -> dict[str, Any]:
    """The model's state across this rank's parts (pipeline stages), as (sharded) DTensors or tensors."""
    state: dict[str, Any] = {}
    for part in parts:
        state.update(get_model_state_dict(part))
    return state


def optimizer_state(parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> dict[str, Any]:
    """Flattened ('state.<param>.<key>', 'param_groups.<param>.<key>') so the parts' dicts merge."""
    state: dict[str, Any] = {}
    for part, opt in zip(parts, optimizers):
        state.update(get_optimizer_state_dict(part, opt, options=_OPTIM_OPTIONS))
    return state


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    collectives.barrier()


class Checkpointer:
    """Saves and loads checkpoints for one run; all ranks call every method together.

    With `async_save`, the tensors are staged and written in the background while training goes on;
    the checkpoint is completed (marker + rename) at the next save or at `wait()`.
    """

    def __init__(
        self, checkpoint_dir: str | os.PathLike, keep_last: int = 2, async_save: bool = False
    ) -> None:
        self.root = Path(checkpoint_dir)
        self.keep_last = keep_last
        self.async_save = async_save
        self._pending: Optional[tuple[concurrent.futures.Future, int, Path]] = None
        self._async_group = None
        if async_save and dist.is_initialized():
            # Background writes must not share a process group with training collectives (they would
            # interleave and hang), so they get their own gloo group.
            self._async_group = collectives.new_cpu_group()

    def paths(self, step: int) -> tuple[Path, Path]:
        """(final, temporary) directories of the checkpoint of `step`."""
        final = self.root / f"step_{step:07d}"
        return final, final.with_name(final.name + ".tmp")

    def save(
        self,
        step: int,
        parts: list[nn.Module],
        optimizers: list[torch.optim.Optimizer],
        train_state: dict[str, Any],
    ) -> Path:
        """A DCP checkpoint of `parts` and `optimizers` (in the background with `async_save`)."""
        final, tmp = self.begin(step)
        state = {"model": model_state(parts), "optim": optimizer_state(parts, optimizers)}
        self.write_train_state(tmp, step, train_state)
        if self.async_save:
            future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._async_group)
            self._pending = (future, step, final)
            return final
        dcp.save(state, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
        self.complete(step, tmp, final)
        return final

    def begin(self, step: int) -> tuple[Path, Path]:
        """Start checkpoint `step`: finish any background save, then an empty `step_<N>.tmp` that every rank
        writes into. Returns (final, temporary) directories; `complete` turns the one into the other."""
        self.wait()
        final, tmp = self.paths(step)
        if _is_main():
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a save that was interrupted
            tmp.mkdir()
        _barrier()
        return final, tmp

    def write_train_state(self, tmp: Path, step: int, train_state: dict[str, Any]) -> None:
        """Rank 0 writes what resuming needs besides the tensors: step, RNG state and `train_state`."""
        if _is_main():
            torch.save({"step": step, "rng": rng_state(), **train_state}, tmp / TRAIN_STATE)

    def wait(self) -> None:
        """Finish a background save: wait for every rank's writes, then mark it complete."""
        if self._pending is None:
            return
        future, step, final = self._pending
        self._pending = None
        future.result()
        self.complete(step, final.with_name(final.name + ".tmp"), final)

    def complete(self, step: int, tmp: Path, final: Path) -> None:
        """Mark `tmp` complete and move it to `final` (all ranks call this once their writes are done)."""
        _barrier()  # every rank's shards are on disk
        if _is_main():
            for f in tmp.iterdir():
                _fsync_file(f)
            marker = {"step": step, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            (tmp / COMPLETE_MARKER).write_text(json.dumps(marker) + "\n")
            _fsync_file(tmp / COMPLETE_MARKER)
            if final.exists():  # a checkpoint of the same step from an earlier attempt
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            logger.info("saved checkpoint %s", final)
            for old in list_checkpoints(self.root)[: -self.keep_last]:
                shutil.rmtree(old.path, ignore_errors=True)
        _barrier()


def read_train_state(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not (path / COMPLETE_MARKER).is_file():
        raise CheckpointError(
            f"{path} is not a complete checkpoint (no {COMPLETE_MARKER}): its save was interrupted. "
            "Resume from an earlier checkpoint, or use trainer.resume=auto to pick the latest complete one."
        )
    try:
        return torch.load(path / TRAIN_STATE, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path / TRAIN_STATE}: {e}") from e


def load_checkpoint(
    path: str | os.PathLike,
    parts: list[nn.Module],
    optimizers: Optional[list[torch.optim.Optimizer]] = None,
) -> dict[str, Any]:
    """Load model (and optimizer) state into this rank's parts, whatever layout saved it.

    Returns the train state (step, schedule, loader, RNG, metadata). Works with or without a process group.
    """
    path = Path(path)
    train_state = read_train_state(path)
    state: dict[str, Any] = {"model": model_state(parts)}
    if optimizers is not None:
        state["optim"] = optimizer_state(parts, optimizers)
    try:
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as e:  # missing keys, shape mismatches, corrupt files
        raise CheckpointError(
            f"cannot load {path} into this model: {_first_line(e)}. Resume with the model config the "
            "checkpoint was trained with (its run directory holds config.yaml)."
        ) from e
    for part in parts:
        own = get_model_state_dict(part).keys()
        set_model_state_dict(part, {k: state["model"][k] for k in own})
    if optimizers is not None:
        for part, opt in zip(parts, optimizers):
            own = get_optimizer_state_dict(part, opt, options=_OPTIM_OPTIONS).keys()
            set_optimizer_state_dict(part, opt, {k: state["optim"][k] for k in own}, options=_OPTIM_OPTIONS)
    return train_state


def load_model_weights(path: str | os.PathLike, model: nn.Module) -> dict[str, Any]:
    """Load only the weights into a plain (unsharded) model, in this process alone: consolidation of a
    checkpoint from any layout, for export or inference."""
    path = Path(path)
    train_state = read_train_state(path)
    state = {"model": model.state_dict()}
    try:
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"cannot load the weights of {path} into this model: {_first_line(e)}") from e
    model.load_state_dict(state["model"])
    return train_state


def _first_line(e: Exception) -> str:
    """The informative part of an error: DCP wraps per-rank tracebacks, whose last error line says it all."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    errors = [line for line in lines if "Error:" in line or "Exception:" in line]
    return (errors or lines or [type(e).__name__])[-1]


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
