"""Loss spikes and non-finite steps (`trainer.spike`): drop the update, count it, and rewind past a run of them.

A step is *skipped* when its loss or its gradient norm is non-finite, or is an outlier: more than
`z_threshold` standard deviations above the mean of the last `window` applied steps (one-sided, once the
window holds `min_steps` values; OLMo-core's rule). A skipped step leaves parameters, AdamW moments and
step counts exactly as they were; the learning-rate schedule and the data still move on by one step.

Two halves, one per side of the device:

- `SpikeGuard` (in `Engine.train_step`, on the device): judges each step between the gradient clipping
  and the optimizer step, and hands the verdict to the fused AdamW as its `found_inf` flag, which drops the
  whole update inside the kernel (torch.optim.AdamW(fused=True), as GradScaler uses it). The host reads
  nothing, so a step still never waits for the device. The verdict is all-reduced (max) over every rank:
  the inputs are global already (the loss is all-reduced, the norm is global), and the reduction makes
  "every rank skips together" hold even where ranks round them differently.
- `SpikeMonitor` (in the training loop, on the host): reads the verdicts at log steps (trainer.log_every),
  where the loop waits for the device anyway, logs a line per skipped step and counts them. When the host
  sees `max_consecutive_skips` skips in a row it rewinds: reload the newest checkpoint saved before them,
  and skip the data those steps trained on when the run gets there again. Reading late costs nothing but
  compute: until then every further bad step is skipped too, and a skipped step changes nothing.

The skipped data windows, counts and rewinds live in every checkpoint's train state, so a resumed run skips
the same data; the guard's window of recent values does too, so a resumed run judges like the original.
A run that cannot recover (no checkpoint from before the skips, or `max_rewinds` used up) stops with a
`SpikeStop` saying what it saw; a skip right after loading a checkpoint names that checkpoint as a suspect.

DeepSpeed steps its own optimizer inside its backward, where an update cannot be dropped: there the policy
is inactive and a non-finite loss stops the run, as before (trainer/engine.py says so at start).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from forge_lm.trainer import checkpoint as ckpt
from forge_lm.trainer.config import DebugConfig, SpikeConfig
from forge_lm.trainer.parallel import collectives

logger = logging.getLogger(__name__)

STD_FLOOR = 1e-3
"""The window's standard deviation counts as at least this fraction of its mean, so that a flat curve (a
constant loss, a run with lr=0) does not make rounding noise an outlier."""

VERDICT = ("skipped", "loss", "grad_norm", "loss_mean", "grad_norm_mean", "loss_std", "grad_norm_std")
"""The fields of a step's verdict tensor, in order."""


class SpikeStop(FloatingPointError):
    """The run cannot recover from its skipped steps; the message says what was seen and what to do."""


class SpikeGuard:
    """The device half: a window of the last applied steps' loss and gradient norm, and each step's verdict."""

    def __init__(self, cfg: SpikeConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.history = torch.zeros(2, cfg.window, device=device)
        """Row 0 losses, row 1 gradient norms, of applied steps: a ring buffer filled at `accepted % window`."""
        self.accepted = torch.zeros((), dtype=torch.long, device=device)
        """Applied steps recorded so far (on the device: the host never needs it during a step)."""
        self.found_inf = torch.zeros((), device=device)
        """The flag the fused optimizers read: 1.0 drops this step's update."""
        self._slots = torch.arange(cfg.window, device=device)

    def judge(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """The step's verdict (a tensor of the `VERDICT` fields); sets `found_inf` and records an applied
        step's values. Device operations only, and one tiny all-reduce."""
        new = torch.stack([loss.detach().float().reshape(()), grad_norm.detach().float().reshape(())])
        filled = (self._slots < self.accepted.clamp(max=self.cfg.window)).float()
        n = filled.sum()
        mean = (self.history * filled).sum(1) / n.clamp(min=1)
        var = ((self.history - mean[:, None]).square() * filled).sum(1) / (n - 1).clamp(min=1)
        std = var.sqrt().maximum(STD_FLOOR * mean.abs())
        ready = self.accepted >= self.cfg.min_steps
        outlier = ready & (new - mean > self.cfg.z_threshold * std).any()
        skip = (~torch.isfinite(new).all() | outlier).float()
        collectives.all_reduce(skip, op="max")  # every rank skips together (see the module doc)
        keep = skip == 0
        slot = (self.accepted % self.cfg.window).view(1)
        old = self.history.index_select(1, slot).squeeze(1)
        self.history.index_copy_(1, slot, torch.where(keep, new, old).unsqueeze(1))
        self.accepted += keep.long()
        self.found_inf.copy_(skip)
        return torch.cat([skip.view(1), new, mean, std])

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values for the checkpoint's train state (waits for the device: save time only)."""
        return {"history": self.history.tolist(), "accepted": int(self.accepted.item())}

    def load_state_dict(self, state: Optional[dict[str, Any]]) -> None:
        """Restore the window; a checkpoint from before trainer.spike (None) starts an empty one."""
        history = torch.tensor(state["history"]) if state else None
        self.history.zero_()
        self.accepted.zero_()
        if history is None:
            return
        if history.shape == self.history.shape:
            self.history.copy_(history)
            self.accepted.fill_(int(state["accepted"]))
            return
        # trainer.spike.window changed since the save: keep the newest values that fit, oldest first.
        saved = int(state["accepted"])
        width = history.shape[1]
        newest = [history[:, (saved - 1 - i) % width] for i in range(min(saved, width, self.cfg.window))][
            ::-1
        ]
        if newest:
            self.history[:, : len(newest)] = torch.stack(newest, dim=1)
        self.accepted.fill_(len(newest))


@dataclass
class SkippedStep:
    """What the host learnt about one skipped step."""

    step: int
    loss: float
    grad_norm: float
    loss_mean: float
    grad_norm_mean: float
    loss_std: float
    grad_norm_std: float
    samples: tuple[int, int]
    """[first, end) of the global samples it trained on (the loader's samples_seen before and after)."""
    suspect: Optional[str] = None
    """The checkpoint the run had just loaded, when no step was applied between that load and this one."""
    suspect_step: Optional[int] = None
    """The step of `suspect`."""

    def describe(self) -> str:
        """'loss nan, grad norm nan (non-finite)' or which value stood how far above the window."""
        values = f"loss {self.loss:.4g}, grad norm {self.grad_norm:.4g}"
        if not (math.isfinite(self.loss) and math.isfinite(self.grad_norm)):
            return f"{values} (non-finite)"
        parts = []
        for name, value, mean, std in (
            ("loss", self.loss, self.loss_mean, self.loss_std),
            ("grad norm", self.grad_norm, self.grad_norm_mean, self.grad_norm_std),
        ):
            z = (value - mean) / std if std > 0 else math.inf
            parts.append(f"{name} window mean {mean:.4g}, std {std:.3g} ({z:+.1f} sigma)")
        return f"{values}; {'; '.join(parts)}"


class SpikeMonitor:
    """The host half, driven by the training loop (trainer/train.py); every rank runs it alike.

    Per step: `skip_windows` (before drawing the step's data), `planted_factor` (fault injection),
    `record` (keeps the step's verdict tensor, no wait). At log steps: `review` (reads them all at once, logs,
    and says whether to rewind), then `rewind` picks the checkpoint. `state_dict` goes into checkpoints.
    """

    def __init__(self, cfg: SpikeConfig, debug: DebugConfig, samples_per_step: int, active: bool) -> None:
        self.cfg, self.debug, self.samples_per_step = cfg, debug, samples_per_step
        self.active = active
        """False when the engine has no guard (trainer.spike.enabled=false, or DeepSpeed)."""
        self.skipped_total = 0
        """Skipped steps in this run, over every resume and rewind."""
        self.rewinds = 0
        self.windows: list[dict[str, list[int]]] = []
        """Data the run skips: {"steps": [first, last] (as first met), "samples": [start, end)}."""
        self.streak: list[SkippedStep] = []
        """The skipped steps in a row up to the last step read."""
        self._pending: list[tuple[int, torch.Tensor, int, int]] = []
        self._loaded: Optional[tuple[str, int]] = None
        """(path, step) of the checkpoint last loaded, until a step is applied after it."""

    # ---- every step ---------------------------------------------------------------------------------------

    def skip_windows(self, loader: Iterator[Any], micro_batches_per_step: int) -> None:
        """Draw and drop whole steps' data while the loader stands inside a recorded window. (Drawing keeps
        every loader's own state exact: prepared shards, mixtures, online streams, post-training rows.)"""
        while (window := self._window_at(loader.samples_seen)) is not None:
            start, end = window["samples"]
            logger.warning(
                "trainer.spike: skipping the data of steps %d-%d (samples %d-%d), which made the run skip its "
                "updates before a rewind", *window["steps"], start, end,
            )  # fmt: skip
            while start <= loader.samples_seen < end:
                for _ in range(micro_batches_per_step):
                    next(loader)

    def _window_at(self, sample: int) -> Optional[dict[str, list[int]]]:
        return next((w for w in self.windows if w["samples"][0] <= sample < w["samples"][1]), None)

    def planted_factor(self, first_sample: int) -> Optional[float]:
        """trainer.debug.inject_spike_batches: the gradient factor of the batch starting at `first_sample`."""
        batch = first_sample // self.samples_per_step + 1
        return self.debug.inject_spike_factor if batch in self.debug.inject_spike_batches else None

    def record(self, step: int, verdict: Optional[torch.Tensor], first_sample: int, end_sample: int) -> None:
        """Keep step `step`'s verdict (a device tensor, read later) and the samples it trained on."""
        if verdict is not None:
            self._pending.append((step, verdict, first_sample, end_sample))

    # ---- at log steps -------------------------------------------------------------------------------------

    @property
    def in_streak(self) -> bool:
        """The last step read was skipped (the loop writes no periodic checkpoint then: a rewind must find one
        from before the skips, and keep_last could otherwise prune them all)."""
        return bool(self.streak)

    def read(self, log: Callable[[int, dict[str, Any], str], None]) -> None:
        """Read the verdicts since the last read (one wait for the device), log each skipped step."""
        if not self._pending:
            return
        values = torch.stack([verdict for _, verdict, _, _ in self._pending]).tolist()
        for (step, _, first, end), row in zip(self._pending, values):
            fields = dict(zip(VERDICT, row))
            if not fields.pop("skipped"):
                self.streak.clear()
                self._loaded = None
                continue
            skipped = SkippedStep(step, **fields, samples=(first, end))
            if self._loaded is not None:
                skipped.suspect, skipped.suspect_step = self._loaded
            self.skipped_total += 1
            self.streak.append(skipped)
            logger.warning("step %d skipped (its update was dropped on every rank): %s%s", step,
                           skipped.describe(), _suspect_note(skipped))  # fmt: skip
            record = {k: v for k, v in asdict(skipped).items() if v is not None and k != "samples"}
            log(step, {**record, "first_sample": first, "end_sample": end, "skipped_steps": self.skipped_total},
                "spike")  # fmt: skip
        self._pending.clear()

    def review(self, log: Callable[[int, dict[str, Any], str], None]) -> bool:
        """Read; True when a rewind is due (`rewind` next). SpikeStop when none is allowed any more."""
        self.read(log)
        if len(self.streak) < self.cfg.max_consecutive_skips:
            return False
        if self.rewinds >= self.cfg.max_rewinds:
            raise SpikeStop(self._stop_message(
                f"trainer.spike.max_rewinds={self.cfg.max_rewinds} rewinds are used up"
                if self.cfg.max_rewinds else "trainer.spike.max_rewinds=0 allows no rewind"
            ))  # fmt: skip
        return True

    def rewind(
        self, checkpoint_dir: Path, log: Callable[[int, dict[str, Any], str], None]
    ) -> ckpt.Checkpoint:
        """The newest checkpoint that verifies from before the skips (from before a suspect checkpoint, when the
        skips began right after loading it); records the skipped data and removes the checkpoints after it (they
        hold the steps being redone, and a later resume must not take them). Collective: all ranks call it."""
        first = self.streak[0]
        before = first.step if first.suspect_step is None else min(first.step, first.suspect_step)
        target = None
        for candidate in reversed(ckpt.list_checkpoints(checkpoint_dir)):
            if candidate.step < before and ckpt.verify_checkpoint(candidate.path).usable:
                target = candidate
                break
        if target is None:
            raise SpikeStop(self._stop_message(
                f"there is no checkpoint from before step {before} to rewind to"
                " (set trainer.checkpoint_every, or a smaller one)"
            ))  # fmt: skip
        last = self.streak[-1]
        window = {"steps": [first.step, last.step], "samples": [first.samples[0], last.samples[1]]}
        self.windows.append(window)
        self.rewinds += 1
        if not collectives.active() or _is_main():
            for newer in ckpt.list_checkpoints(checkpoint_dir):
                if newer.step > target.step:
                    logger.warning("removing %s: it holds steps the rewind redoes", newer.path)
                    ckpt.remove_checkpoint(newer.path)
        collectives.barrier()
        logger.warning(
            "trainer.spike: %d steps in a row were skipped (steps %d-%d): rewinding to %s (step %d), and the data "
            "of those steps (samples %d-%d) will be skipped; rewind %d of at most %d",
            len(self.streak), first.step, last.step, target.path, target.step, *window["samples"],
            self.rewinds, self.cfg.max_rewinds,
        )  # fmt: skip
        log(last.step, {"to_step": target.step, "checkpoint": str(target.path), "first_step": first.step,
                        "last_step": last.step, "rewinds": self.rewinds}, "rewind")  # fmt: skip
        self.streak.clear()
        self.loaded(target.path, target.step)
        return target

    def loaded(self, path: Path, step: int) -> None:
        """The loop loaded checkpoint `path` (resume or rewind): skips before the next applied step name it."""
        self._loaded = (str(path), step)

    def _stop_message(self, reason: str) -> str:
        first, last = self.streak[0], self.streak[-1]
        seen = "; ".join(f"step {s.step}: {s.describe()}" for s in self.streak[:3])
        if len(self.streak) > 3:
            seen += f"; ... step {last.step}: {last.describe()}"
        suspect = _suspect_note(first)
        return (
            f"trainer.spike: {len(self.streak)} steps in a row had their update skipped (steps {first.step}-"
            f"{last.step}, trainer.spike.max_consecutive_skips={self.cfg.max_consecutive_skips}) and the run "
            f"cannot recover: {reason}. What was seen: {seen}.{suspect} {self.skipped_total} steps were skipped "
            f"in this run and it rewound {self.rewinds} times. Lower trainer.lr or raise trainer.warmup_steps, "
            f"look at the data of samples {first.samples[0]}-{last.samples[1]}, or raise "
            "trainer.spike.z_threshold if these were not spikes."
        )

    # ---- checkpoints -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain values for the train state (read `read` first so the streak is complete)."""
        return {
            "skipped_total": self.skipped_total,
            "rewinds": self.rewinds,
            "windows": [dict(w) for w in self.windows],
            "streak": [{**asdict(s), "samples": list(s.samples)} for s in self.streak],
        }

    def load_state_dict(self, state: Optional[dict[str, Any]]) -> None:
        """From a resumed checkpoint (None: saved before trainer.spike existed)."""
        if not state:
            return
        self.skipped_total = int(state["skipped_total"])
        self.rewinds = int(state["rewinds"])
        self.windows = [{k: [int(x) for x in v] for k, v in w.items()} for w in state["windows"]]
        self.streak = [SkippedStep(**{**s, "samples": tuple(s["samples"])}) for s in state["streak"]]


def _suspect_note(skipped: SkippedStep) -> str:
    if skipped.suspect is None:
        return ""
    return (
        f" This came right after loading {skipped.suspect}, with no step applied since: that checkpoint is a "
        "suspect (`forge verify` it, or resume from an earlier one with trainer.resume=<dir>)."
    )


def _is_main() -> bool:
    return dist.get_rank() == 0
