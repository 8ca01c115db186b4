"""Stopping cleanly before a job is killed: warning signals, SIGTERM, a wall-clock budget, a stop file.

A scheduler that is about to end a job (a time limit, a preemption, `scancel`) warns it first: SLURM sends
SIGUSR1 `--signal=B:USR1@N` seconds before the time limit (to the batch script, which passes it on as a
stop file, see `launch/slurm.py`), and SIGTERM to the processes when it preempts or cancels. `StopSignal`
turns any of these into one decision that every rank takes after the same step:

    with StopSignal(time_budget_s=cfg.trainer.time_budget_s) as stop:
        while step < max_steps:
            train_step(); step += 1
            if step < max_steps and stop.should_stop():   # collective: every rank calls it every step
                save_checkpoint(step)
                stop.mark_requeue(step)                   # tells the batch script to requeue the job
                sys.exit(REQUEUE_EXIT_CODE)

The signal handlers only set a flag (nothing that could deadlock when a signal lands inside a lock, e.g. in
logging or the allocator); `should_stop` reads it, checks the budget and the stop file, and takes the
maximum over all ranks, so a signal that reaches only some processes (or reaches them at different
steps) still stops every rank after the same step. The requeued job resumes from the checkpoint.

Environment (set by the SLURM batch script; all optional):
    TRAINER_STOP_FILE       a path: once it exists, stop (the batch script creates it on SIGUSR1/SIGTERM)
    TRAINER_REQUEUE_FILE    a path that rank 0 writes when it stopped to be requeued, for the batch script
                            (any rank writes it when a peer died or went silent: trainer.parallel.liveness)
    TRAINER_TIME_BUDGET_S   wall-clock budget in seconds (used when the config sets none)
    SLURM_RESTART_COUNT     how many times SLURM has requeued this job (unset on the first run)
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Optional

logger = logging.getLogger(__name__)

REQUEUE_EXIT_CODE = 75
"""Exit status of a run that stopped early, with a complete checkpoint, to be started again: EX_TEMPFAIL
from sysexits.h ("temporary failure; the user is invited to retry"). Distinct from 0 (finished), 1 (a
crash) and 2 (a config or data error). Through torchrun the status of the workers is not passed on, so
the batch script reads TRAINER_REQUEUE_FILE instead."""

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

STOP_FILE_ENV = "TRAINER_STOP_FILE"
REQUEUE_FILE_ENV = "TRAINER_REQUEUE_FILE"
TIME_BUDGET_ENV = "TRAINER_TIME_BUDGET_S"


def restart_count() -> int:
    """How many times the scheduler has restarted this job: SLURM_RESTART_COUNT (unset, i.e. 0, at first)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def restart_message(step: int, resumed_from: Optional[os.PathLike | str]) -> str:
    """One line for the log at start: the restart count and where the run resumed."""
    job = os.environ.get("SLURM_JOB_ID")
    who = f"SLURM job {job}, restart {restart_count()}" if job else f"restart {restart_count()}"
    if resumed_from is None:
        return f"{who}: no complete checkpoint to resume from, starting at step 0"
    return f"{who}: resumed from {resumed_from} at step {step}"


def exit_on_stop_signals() -> None:
    """Until a `StopSignal` takes over, make SIGUSR1/SIGTERM end the process at once with REQUEUE_EXIT_CODE.

    The trainer calls this first thing, before its heavy imports (torch, Hydra: seconds), so that a
    preemption in those first seconds, when there is nothing to save yet, still says "requeue me" (75)
    instead of dying by the signal (143 or 138). Main thread only; signals with a handler already
    installed by someone else keep it."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, _exit_for_requeue)


def _exit_for_requeue(signum: int, frame: Optional[FrameType]) -> None:
    # Only async-signal-safe work: one write, then _exit (no atexit, no flushing of half-written state).
    name = signal.Signals(signum).name
    os.write(
        2,
        f"received {name} before training started: nothing to save, exiting {REQUEUE_EXIT_CODE} to be requeued\n".encode(),
    )
    os._exit(REQUEUE_EXIT_CODE)


class StopSignal:
    """Decides, together on every rank, when to stop for a requeue. See the module docstring.

    time_budget_s: stop once the next step would end past this many seconds after construction; 0 (and no
        TRAINER_TIME_BUDGET_S) means no budget. The step time is the longest seen so far, so the budget
        also covers the checkpoint only if it leaves room for it.
    stop_file: stop once this path exists (default: $TRAINER_STOP_FILE).
    signals: caught while installed (inside `with`, or between install() and uninstall()).
    """

    def __init__(
        self,
        time_budget_s: float = 0.0,
        stop_file: Optional[str | os.PathLike] = None,
        signals: tuple[signal.Signals, ...] = STOP_SIGNALS,
    ) -> None:
        if not time_budget_s:
            time_budget_s = float(os.environ.get(TIME_BUDGET_ENV, "0") or 0)
        if time_budget_s < 0:
            raise ValueError(f"time budget {time_budget_s} s must be >= 0 (0: none)")
        self.time_budget_s = time_budget_s
        stop_file = stop_file if stop_file is not None else os.environ.get(STOP_FILE_ENV)
        self.stop_file = Path(stop_file) if stop_file else None
        self.signals = signals
        self.reason: Optional[str] = None
        self._signal: Optional[int] = None  # set by the handler, nothing else happens there
        self._previous: dict[int, object] = {}
        self._started = time.monotonic()
        self._last_check: Optional[float] = None
        self._longest_step = 0.0

    # ---- handlers --------------------------------------------------------------------------------------

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        self._signal = signum

    def install(self) -> StopSignal:
        """Catch the stop signals (main thread only; elsewhere the signals keep their handlers, with a warning)."""
        if threading.current_thread() is not threading.main_thread():
            logger.warning("not in the main thread: SIGUSR1/SIGTERM will not stop training cleanly")
            return self
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Give the signals back their previous handlers."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()

    def __enter__(self) -> StopSignal:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    # ---- the decision ----------------------------------------------------------------------------------

    def local_reason(self) -> Optional[str]:
        """Why this process wants to stop (None: it does not). Cheap: no communication."""
        now = time.monotonic()
        if self._last_check is not None:
            self._longest_step = max(self._longest_step, now - self._last_check)
        self._last_check = now
        if self._signal is not None:
            return f"received {signal.Signals(self._signal).name}"
        if self.stop_file is not None and self.stop_file.exists():
            return f"stop file {self.stop_file} exists"
        if self.time_budget_s and now - self._started + self._longest_step > self.time_budget_s:
            return f"time budget of {self.time_budget_s:g} s would run out during the next step"
        return None

    def should_stop(self) -> bool:
        """Whether to stop after this step: True on every rank if any rank wants to. Call it on every rank
        at the same point (once per step); it is a collective when torch.distributed is initialised."""
        reason = self.local_reason()
        wanted = reason is not None
        from forge_lm.trainer.parallel import collectives

        # A CPU-side flag (gloo): asking every step costs no wait for the GPU.
        if collectives.any_rank(wanted) and not wanted:
            reason = "another rank was asked to stop"
            wanted = True
        if wanted and self.reason is None:
            self.reason = reason
        return wanted

    def mark_requeue(self, step: int, checkpoint: Optional[os.PathLike | str] = None) -> None:
        """Rank 0 tells the batch script that the run stopped at `step` with a complete checkpoint and wants to
        be requeued (writes $TRAINER_REQUEUE_FILE, if set). Call it after the checkpoint is complete."""
        if int(os.environ.get("RANK", "0")) != 0:
            return
        checkpoint = str(checkpoint) if checkpoint else None
        write_requeue_file({"step": step, "reason": self.reason, "checkpoint": checkpoint})


def write_requeue_file(record: dict) -> None:
    """Tell the batch script to requeue the job: `record` as JSON in $TRAINER_REQUEUE_FILE (nothing if unset).
    Atomic, and safe when several ranks write it at once (trainer.parallel.liveness: every survivor does)."""
    path = os.environ.get(REQUEUE_FILE_ENV)
    if not path:
        return
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, path)
