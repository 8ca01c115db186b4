"""Crash-safe, verified, layout-independent checkpoints of everything a run needs to continue exactly.

Layout of one checkpoint, `<run_dir>/checkpoints/step_<N>/`:

    *.distcp, .metadata   model and optimizer state through torch.distributed.checkpoint (DCP): every
                          rank writes its own shards; names are the model's own parameter names, so a
                          checkpoint saved under one parallel layout loads into any other (or into a
                          plain single-process model)
    train_state.pt        step, schedule, data-loader position, RNG state, run metadata (rank 0; tensors
                          and plain Python values only, loaded with weights_only=True)
    complete.json         written last, by rank 0, after every rank has finished writing; it records the
                          size and checksum (XXH3) of every other file (trainer/checkpoint_verify.py)

A checkpoint is assembled in `step_<N>.tmp` and renamed into place only once `complete.json` is
inside, so a save interrupted at any point (a killed job, a full disk) leaves nothing that resume
would pick; a failed save removes its partial directory, and the next save of that step clears any leftover.

Removing a checkpoint (keep_last pruning, or replacing a step saved before) first renames it out of the
way, to `step_<N>.deleting`, which is never taken for a checkpoint, and only then deletes it; so no
directory named `step_<N>` is ever marked complete without its data. Leftovers of a removal cut short
are deleted when the next run starts (`Checkpointer(...)`), which also finishes a replacement cut short
between its two renames.

Reading: every reader (resume, load_model, export, eval) verifies the files against complete.json first;
`latest_checkpoint` skips a corrupt checkpoint with a warning naming the file and returns the newest one
that verifies. Pickled parts are read through allow-lists, never with plain pickle (trainer/safe_pickle.py).
"""

from __future__ import annotations

import concurrent.futures
import errno
import io
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
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from forge_lm.trainer import checkpoint_verify as verify_mod
from forge_lm.trainer.checkpoint_verify import COMPLETE_MARKER, ChecksummingWriter, Verdict
from forge_lm.trainer.parallel import collectives
from forge_lm.trainer.safe_pickle import SafeFileSystemReader, SafeLoadPlanner, UnsafeCheckpointError

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")
DELETING_SUFFIX = ".deleting"
"""A checkpoint being removed is renamed `step_<N>.deleting` first; such a name is never a checkpoint."""
TRAIN_STATE = "train_state.pt"
_OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
SAVE_ERROR_POLICIES = ("stop", "continue")
_ITEM_OVERHEAD = 1536
"""Bytes of container around each item DCP writes (torch.save's zip records), for the size estimate."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match the model being resumed."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint's files do not match the checksums recorded when it was saved."""


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written (disk full, a file-size limit or quota, no permission)."""


@dataclass
class Checkpoint:
    path: Path
    step: int


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list[Checkpoint]:
    """Complete checkpoints in `checkpoint_dir`, oldest first. Incomplete ones are ignored (not verified)."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and (child / COMPLETE_MARKER).is_file():
            found.append(Checkpoint(child, int(m.group(1))))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(
    checkpoint_dir: str | os.PathLike, verify: bool = True, collective: Optional[bool] = None
) -> Optional[Checkpoint]:
    """The newest complete checkpoint in `checkpoint_dir` whose files verify (None if there is none at all).

    A checkpoint that fails verification is skipped with a warning naming the file; if every complete one
    fails, CheckpointCorruptError. collective: split the reading over the ranks of the process group (every
    rank must call this together, as train.py does); default: whenever a process group of several is up.
    """
    found = list_checkpoints(checkpoint_dir)
    if not verify or not found:
        return found[-1] if found else None
    failed = []
    for candidate in reversed(found):
        verdict = verify_checkpoint(candidate.path, collective)
        if verdict.usable:
            if failed:
                logger.warning("resuming from %s, the newest checkpoint that verifies", candidate.path)
            return candidate
        failed.append(verdict)
        logger.warning("skipping %s; trying the one before", verdict.describe())
    listed = "; ".join(f"{v.path.name}: {v.detail}" for v in failed)
    raise CheckpointCorruptError(
        f"every complete checkpoint in {checkpoint_dir} is corrupt ({listed}). The files changed on disk after "
        "they were saved (a storage, copy or transfer fault). Restore them from a copy, or start afresh with "
        "trainer.resume=never (or a new run_dir); `forge verify` re-checks them."
    )


def verify_checkpoint(path: str | os.PathLike, collective: Optional[bool] = None) -> Verdict:
    """Verify checkpoint `path` once per process (remembered while its files are unchanged).

    collective: every rank checks a share of the files and all ranks get the combined verdict; every rank
    must call this together. Default: whenever a process group of several processes is up."""
    path = Path(path)
    done = verify_mod.cached(path)
    if done is not None:
        return done
    if _collective(collective):
        rank, world = dist.get_rank(), dist.get_world_size()
        verdicts = collectives.all_gather_object(verify_mod.verify(path, share=(rank, world)))
        verdict = next((v for v in verdicts if not v.usable), verdicts[0])
    else:
        verdict = verify_mod.verify(path)
    return verify_mod.remember(verdict)


def require_verified(path: str | os.PathLike, collective: Optional[bool] = None) -> Verdict:
    """Verify a checkpoint named explicitly: corruption (or an unfinished save) is a one-line error."""
    path = Path(path)
    verdict = verify_checkpoint(path, collective)
    if verdict.status == "incomplete":
        raise CheckpointError(
            f"{path} is not a complete checkpoint (no {COMPLETE_MARKER}): its save was interrupted. "
            "Resume from an earlier checkpoint, or use trainer.resume=auto to pick the latest complete one."
        )
    if verdict.status == "corrupt":
        raise CheckpointCorruptError(
            f"cannot load {path}: it is corrupt: {verdict.detail}. This is damage to the files on disk (a storage, copy or transfer "
            "fault), not a config problem: load an earlier checkpoint (trainer.resume=auto takes the newest that "
            "verifies) or restore this one from a copy; `forge verify` checks them all."
        )
    return verdict


def _collective(collective: Optional[bool]) -> bool:
    if collective is None:
        return dist.is_initialized() and dist.get_world_size() > 1
    return collective and dist.is_initialized() and dist.get_world_size() > 1


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
    # Rank 0 often arrives last, after work of its own (recovery, publishing, pruning: long on a slow file
    # system): the others wait through the store, without the collective timeout (trainer.parallel.liveness).
    collectives.wait_for_all("checkpoint")


class Checkpointer:
    """Saves and loads checkpoints for one run; all ranks call every method together.

    With `async_save`, the tensors are staged and written in the background while training goes on;
    the checkpoint is completed (marker + rename) at the next save or at `wait()`.

    checksums: record every file's size and checksum in complete.json (False: as before they existed; such a
    checkpoint loads unverified; for measuring what they cost, tools/bench_checkpoint.py).
    on_save_error: what a save that fails for lack of room or rights (disk full, a file-size limit or quota,
    no permission) does: 'stop' raises CheckpointSaveError; 'continue' logs the same explanation as a warning,
    and `save` returns None so training goes on and the next interval tries again. Either way the partial
    checkpoint is removed and the earlier ones are untouched.
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike,
        keep_last: int = 2,
        async_save: bool = False,
        on_save_error: str = "stop",
        checksums: bool = True,
    ) -> None:
        if on_save_error not in SAVE_ERROR_POLICIES:
            raise ValueError(f"on_save_error={on_save_error!r}: use 'stop' or 'continue'")
        self.root = Path(checkpoint_dir)
        self.keep_last = keep_last
        self.async_save = async_save
        self.on_save_error = on_save_error
        self.checksums = checksums
        self._pending: Optional[tuple[concurrent.futures.Future, int, Path, int]] = None
        self._async_group = None
        if async_save and dist.is_initialized():
            # Background writes must not share a process group with training collectives (they would
            # interleave and hang), so they get their own gloo group.
            self._async_group = collectives.new_cpu_group()
        if _is_main():
            recover(self.root)
        _barrier()

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
    ) -> Optional[Path]:
        """A DCP checkpoint of `parts` and `optimizers` (in the background with `async_save`).

        Returns its directory, or None when it could not be written and on_save_error='continue'."""
        final, tmp = self.begin(step)
        state = {"model": model_state(parts), "optim": optimizer_state(parts, optimizers)}
        needed = _bytes_needed(state)
        failure = self._check_room(tmp, needed)
        if failure is None:
            failure = self._attempt(lambda: self.write_train_state(tmp, step, train_state))
        if failure is not None:
            return self._failed(step, tmp, failure, needed)
        writer = ChecksummingWriter(tmp) if self.checksums else FileSystemWriter(tmp)
        if self.async_save:
            try:
                future = dcp.async_save(state, storage_writer=writer, process_group=self._async_group)
            except (Exception, CheckpointException) as e:
                return self._failed(step, tmp, e, needed)
            self._pending = (future, step, final, needed)
            return final
        try:
            dcp.save(state, storage_writer=writer, no_dist=not dist.is_initialized())
        except (Exception, CheckpointException) as e:
            return self._failed(step, tmp, e, needed)
        return self.complete(step, tmp, final)

    def begin(self, step: int) -> tuple[Path, Path]:
        """Start checkpoint `step`: finish any background save, then an empty `step_<N>.tmp` that every rank
        writes into. Returns (final, temporary) directories; `complete` turns the one into the other."""
        self.wait()
        final, tmp = self.paths(step)
        error: Optional[BaseException] = None
        if _is_main():
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)  # left by a save that was interrupted
                tmp.mkdir()
            except OSError as e:
                error = e
        _barrier()  # rank 0 may have removed a large leftover directory
        if collectives.any_rank(error is not None):
            raise CheckpointSaveError(self._explain(step, tmp, error or OSError("see rank 0"), 0))
        return final, tmp

    def write_train_state(self, tmp: Path, step: int, train_state: dict[str, Any]) -> None:
        """Rank 0 writes what resuming needs besides the tensors: step, RNG state and `train_state`."""
        if _is_main():
            # Serialised in memory, then written as plain bytes: a full disk is then an OSError with its
            # errno, not a RuntimeError from deep inside torch's zip writer.
            buffer = io.BytesIO()
            torch.save({"step": step, "rng": rng_state(), **train_state}, buffer)
            with open(tmp / TRAIN_STATE, "wb") as f:
                f.write(buffer.getbuffer())

    def wait(self) -> Optional[Path]:
        """Finish a background save: wait for every rank's writes, then mark it complete."""
        if self._pending is None:
            return None
        future, step, final, needed = self._pending
        self._pending = None
        tmp = final.with_name(final.name + ".tmp")
        try:
            future.result()
        except (Exception, CheckpointException) as e:
            return self._failed(step, tmp, e, needed)
        return self.complete(step, tmp, final)

    def complete(self, step: int, tmp: Path, final: Path) -> Optional[Path]:
        """Record the checksums, mark `tmp` complete and move it to `final`, then prune (all ranks call this
        once their writes are done). Returns `final`, or None if that failed and on_save_error='continue'."""
        _barrier()  # every rank's shards (and their checksum records) are on disk
        failure = self._attempt(lambda: self._mark_and_publish(step, tmp, final))
        if failure is not None:
            return self._failed(step, tmp, failure, _dir_bytes(tmp))
        _barrier()
        return final

    def _mark_and_publish(self, step: int, tmp: Path, final: Path) -> None:
        """Rank 0: complete.json with every file's checksum, then the rename into place, then pruning."""
        if not _is_main():
            return
        marker: dict[str, Any] = {"step": step, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if self.checksums:
            marker.update(checksum=verify_mod.ALGORITHM, files=verify_mod.collect_records(tmp))
        for f in tmp.iterdir():
            _fsync_file(f)
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        _fsync_file(tmp / COMPLETE_MARKER)
        # A checkpoint of the same step from an earlier attempt (e.g. after trainer.resume=<older step>) is
        # set aside first: from here until the rename below, the new complete copy sits in step_<N>.tmp,
        # which `recover` promotes if the process dies in between.
        aside = _set_aside(final) if final.exists() else None
        os.replace(tmp, final)
        _fsync_dir(self.root)
        logger.info("saved checkpoint %s", final)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        for old in list_checkpoints(self.root)[: -self.keep_last]:
            try:
                remove_checkpoint(old.path)
            except OSError as e:  # the new checkpoint is saved; an old one staying is no reason to stop
                logger.warning("could not remove the old checkpoint %s (%s); remove it by hand", old.path, e)

    # ---- failures while saving -------------------------------------------------------------------------

    def _attempt(self, action) -> Optional[BaseException]:
        """Run `action` (rank 0's part of a save); every rank learns whether any rank failed."""
        error: Optional[BaseException] = None
        try:
            action()
        except Exception as e:  # told apart from lack of room or rights in `_failed`
            error = e
        _barrier()  # the action may be long (checksums, fsync, pruning old checkpoints)
        if collectives.any_rank(error is not None) and error is None:
            error = OSError("another rank could not write its part")
        return error

    def _check_room(self, tmp: Path, needed: int) -> Optional[BaseException]:
        """Refuse up front when the file system plainly lacks room for the whole checkpoint."""
        try:
            free = shutil.disk_usage(tmp).free
        except OSError:
            return None
        short = needed > free
        if collectives.any_rank(short) and not short:
            return OSError(errno.ENOSPC, "another rank's file system lacks room")
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) if short else None

    def _failed(self, step: int, tmp: Path, error: BaseException, needed: int) -> None:
        """A save failed on some rank: remove the partial directory, then stop or (on_save_error=continue) warn."""
        _barrier()  # every rank has stopped writing
        if _is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            # Side files of a ChecksummingWriter and the like live inside tmp; nothing else to clean.
        _barrier()
        if not _is_save_error(error):
            # Not a lack of room or rights: a bug or a model that cannot be saved, worth its traceback.
            if isinstance(error, CheckpointException):
                raise CheckpointSaveError(
                    f"could not save checkpoint step {step} to {tmp}: {_first_line(error)}"
                )
            raise error
        message = self._explain(step, tmp, error, needed)
        if self.on_save_error == "continue":
            logger.warning(
                "%s Training continues (trainer.on_save_error=continue); the next checkpoint is tried at the next "
                "interval.",
                message,
            )
            return None
        raise CheckpointSaveError(message) from None

    def _explain(self, step: int, tmp: Path, error: BaseException, needed: int) -> str:
        """One paragraph: which checkpoint, where, why, bytes needed against bytes free, what was kept."""
        cause = _root_cause(error)
        try:
            free = shutil.disk_usage(self.root if self.root.exists() else self.root.parent).free
            room = (
                f"; the checkpoint needs about {_size(needed)} and {_size(free)} are free there"
                if needed
                else (f"; {_size(free)} are free there")
            )
        except OSError:
            room = ""
        code = getattr(cause, "errno", None) or _likely_errno(needed, self.root)
        hint = {
            errno.ENOSPC: "the disk is full",
            errno.EDQUOT: "the disk quota is exhausted",
            errno.EFBIG: "a file exceeds the largest size this process may write (its file-size limit, "
            f"`ulimit -f`, is {_size(_file_size_limit() or 0)})",
            errno.EACCES: "no permission to write there",
            errno.EPERM: "no permission to write there",
            errno.EROFS: "the file system is read-only",
        }.get(code or -1, "the write failed")
        if code and not isinstance(cause, OSError):  # torch's writer hides the errno; this is the likely one
            hint += f" [errno {errno.errorcode.get(code, code)}]"
        kept = [c.path.name for c in list_checkpoints(self.root)]
        earlier = (
            f"the earlier checkpoints ({', '.join(kept)}) are untouched"
            if kept
            else "there is no earlier checkpoint"
        )
        return (
            f"could not save checkpoint step {step} to {tmp}: {hint} ({_describe(cause)}){room}. The partial "
            f"checkpoint was removed and {earlier}. Free space or rights there (or set run_dir elsewhere), or set "
            "trainer.on_save_error=continue to keep training and retry at the next checkpoint."
        )


def _is_save_error(error: BaseException) -> bool:
    """A failure to write for lack of room or rights (what on_save_error governs), wherever it is wrapped."""
    cause = _root_cause(error)
    if isinstance(cause, OSError):
        return True
    text = str(cause)
    return "file write failed" in text or "enforce fail at inline_container" in text


def _root_cause(error: BaseException) -> BaseException:
    """The underlying error of a DCP CheckpointException (per-rank failures) or of a chained exception."""
    if isinstance(error, CheckpointException):
        for wrapped in error.failures.values():
            exc = wrapped[0] if isinstance(wrapped, tuple) else wrapped
            if isinstance(exc, BaseException):
                return _root_cause(exc)
    seen = error
    while seen.__cause__ is not None and not isinstance(seen, OSError):
        seen = seen.__cause__
    return seen


def _file_size_limit() -> Optional[int]:
    """This process's RLIMIT_FSIZE in bytes (None: unlimited, or not a POSIX system)."""
    try:
        import resource
    except ImportError:
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def _likely_errno(needed: int, where: Path) -> Optional[int]:
    """Why a write failed when torch's zip writer reports it without an errno ("unexpected pos ..."):
    no room for what the save needs, or a file-size limit below it; None if neither explains it."""
    try:
        if shutil.disk_usage(where).free < needed:
            return errno.ENOSPC
    except OSError:
        pass
    limit = _file_size_limit()
    if limit is not None and limit < needed:
        return errno.EFBIG
    return None


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno:
        where = f" writing {Path(error.filename).name}" if error.filename else ""
        return f"{os.strerror(error.errno)} [errno {errno.errorcode.get(error.errno, error.errno)}]{where}"
    return _first_line(error)


def _bytes_needed(state: dict[str, Any]) -> int:
    """About the bytes this save will write, over all ranks: the tensors' (local shards') sizes, plus the
    ~1.5 KiB that DCP's per-item torch.save adds to every item (which dominates for tiny models)."""
    local = 0

    def add(value: Any) -> None:
        nonlocal local
        if isinstance(value, dict):
            for v in value.values():
                add(v)
            return
        if isinstance(value, torch.Tensor):
            t = value.to_local() if hasattr(value, "to_local") else value
            local += t.numel() * t.element_size()
        local += _ITEM_OVERHEAD

    add(state)
    if dist.is_initialized() and dist.get_world_size() > 1:
        total = collectives.all_reduce(torch.tensor([float(local)]), group=None)
        return int(total.item())
    return local


def _dir_bytes(path: Path) -> int:
    try:
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    except OSError:
        return 0


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


# ---- removal that never leaves a complete-looking directory without its data -----------------------------


def _set_aside(path: Path) -> Path:
    """Rename checkpoint `path` to `<name>.deleting` (never taken for a checkpoint) and make that durable."""
    aside = path.with_name(path.name + DELETING_SUFFIX)
    if aside.exists():
        shutil.rmtree(aside, ignore_errors=True)
    os.replace(path, aside)
    _fsync_dir(path.parent)
    return aside


def remove_checkpoint(path: str | os.PathLike) -> None:
    """Delete a checkpoint so that at no moment a `step_<N>` directory is marked complete without its data."""
    shutil.rmtree(_set_aside(Path(path)), ignore_errors=True)


def recover(checkpoint_dir: str | os.PathLike) -> None:
    """At start (rank 0): delete what removals cut short left behind, and finish a replacement cut short
    between setting the old copy aside and renaming the new one into place."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return
    for child in sorted(root.iterdir()):
        if child.name.endswith(DELETING_SUFFIX) and child.is_dir():
            logger.info("removing %s, left by a removal that was cut short", child)
            shutil.rmtree(child, ignore_errors=True)
    for child in sorted(root.iterdir()):
        if not (child.name.endswith(".tmp") and _STEP_DIR.match(child.name[: -len(".tmp")])):
            continue
        final = child.with_name(child.name[: -len(".tmp")])
        if (child / COMPLETE_MARKER).is_file() and not final.exists():
            if verify_mod.verify(child).usable:
                logger.info("finishing the save of %s, cut short just before its rename", final)
                os.replace(child, final)
                _fsync_dir(root)


# ---- loading ----------------------------------------------------------------------------------------------


def read_train_state(path: str | os.PathLike, collective: Optional[bool] = None) -> dict[str, Any]:
    """The train state of checkpoint `path`, after verifying the checkpoint's files (see `require_verified`)."""
    path = Path(path)
    require_verified(path, collective)
    try:
        return torch.load(path / TRAIN_STATE, map_location="cpu", weights_only=True)
    except Exception as e:
        unsafe = "Unsupported global" in str(e) or "weights_only" in str(e).lower()
        what = (
            "refused (it asks to load code or types no checkpoint holds; nothing of it was run)"
            if unsafe
            else e
        )
        raise CheckpointError(
            f"cannot read {path / TRAIN_STATE}: {_first_line(what) if unsafe else e}"
        ) from e


def load_checkpoint(
    path: str | os.PathLike,
    parts: list[nn.Module],
    optimizers: Optional[list[torch.optim.Optimizer]] = None,
) -> dict[str, Any]:
    """Load model (and optimizer) state into this rank's parts, whatever layout saved it.

    Returns the train state (step, schedule, loader, RNG, metadata). Works with or without a process group
    (with one, every rank calls it together).
    """
    path = Path(path)
    train_state = read_train_state(path)
    state: dict[str, Any] = {"model": model_state(parts)}
    if optimizers is not None:
        state["optim"] = optimizer_state(parts, optimizers)
    _dcp_load(state, path, no_dist=not dist.is_initialized())
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
    train_state = read_train_state(path, collective=False)
    state = {"model": model.state_dict()}
    _dcp_load(state, path, no_dist=True)
    model.load_state_dict(state["model"])
    return train_state


def _dcp_load(state: dict[str, Any], path: Path, no_dist: bool) -> None:
    """DCP's load through the safe reader and planner, its failures told as what they are."""
    try:
        dcp.load(
            state,
            storage_reader=SafeFileSystemReader(str(path)),
            planner=SafeLoadPlanner(),
            no_dist=no_dist,
        )
    except (
        Exception,
        CheckpointException,
    ) as e:  # refused pickles, missing keys, shape mismatches, bad files
        cause = _root_cause(e)
        if isinstance(cause, UnsafeCheckpointError):
            raise CheckpointError(str(cause)) from None
        if _looks_like_mismatch(e) or verify_checkpoint(path, collective=False).status == "ok":
            raise CheckpointError(
                f"cannot load {path} into this model: {_first_line(e)}. Its files verify, so the model differs "
                "from the one saved: use the model config the checkpoint was trained with (its run directory "
                "holds config.yaml)."
            ) from e
        raise CheckpointCorruptError(
            f"cannot read {path}: {_first_line(e)}. It was saved without checksums, and its files look damaged "
            "(truncated or overwritten): load an earlier checkpoint or restore this one from a copy."
        ) from e


def _looks_like_mismatch(e: BaseException) -> bool:
    """DCP's words for a checkpoint that is fine but holds another model's tensors."""
    text = str(e)
    return any(
        words in text
        for words in (
            "Missing key in checkpoint",
            "Size mismatch",
            "size mismatch",
            "mismatch sizes",
            "Unexpected key",
        )
    )


def _first_line(e: BaseException | str) -> str:
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
