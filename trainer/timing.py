"""Where a training step's time goes: data wait, forward+backward, optimizer, communication, checkpoint and
evaluation, logged with every train record (`time_*_s`) and summed into the log line.

Device work is timed where it runs: on CUDA with events recorded into the stream (recording waits for
nothing; the elapsed times are read at the next log step, which waits for the device anyway), on the CPU
with the host clock (the CPU runs each kernel as it is called). Host-side phases (waiting for the data
loader, checkpointing, evaluating) take the host clock everywhere.

Communication is what the framework itself sends (the global token count and the loss all-reduce, a
pipeline's stage hand-offs are inside its schedule). FSDP's parameter all-gathers and gradient
reduce-scatters overlap the forward and backward and are counted there; a profiler trace
(`trainer.profile.steps`) shows them one by one.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

DEVICE_PHASES = ("fwd_bwd", "optimizer", "comm")
"""Timed on the device: forward and backward of all micro-batches, optimizer step (with clipping), the
framework's own collectives."""
HOST_PHASES = ("data", "checkpoint", "eval")
"""Timed on the host: waiting for the next batches, writing checkpoints, evaluating."""


class StepClock:
    """Accumulates phase times until `read()`, which returns the totals (seconds) and starts over."""

    def __init__(self, device: torch.device, enabled: bool = True) -> None:
        self.enabled = enabled
        self._cuda = device.type == "cuda"
        self._host: dict[str, float] = {}
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def device(self, name: str) -> Iterator[None]:
        """Time device work issued inside the block (one of DEVICE_PHASES)."""
        if not self.enabled:
            yield
            return
        if self._cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._pending.append((name, start, end))
        else:
            with self.host(name):
                yield

    @contextlib.contextmanager
    def host(self, name: str) -> Iterator[None]:
        """Time the block on the host clock (one of HOST_PHASES, or a device phase on the CPU)."""
        if not self.enabled:
            yield
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._host[name] = self._host.get(name, 0.0) + time.perf_counter() - t0

    def read(self) -> dict[str, float]:
        """Seconds per phase since the last read. On CUDA this waits for the last recorded event."""
        totals = dict.fromkeys(DEVICE_PHASES + HOST_PHASES, 0.0)
        totals.update(self._host)
        if self._pending:
            self._pending[-1][2].synchronize()
            for name, start, end in self._pending:
                totals[name] += start.elapsed_time(end) / 1000.0
        self._host, self._pending = {}, []
        return totals


def breakdown_record(totals: dict[str, float], steps: int) -> dict[str, float]:
    """The train record's fields: per-step means of the step phases, totals of checkpoint and evaluation
    (seconds spent on them since the previous log), and the share of the step spent waiting for data."""
    record = {f"time_{name}_s": totals[name] / steps for name in ("data",) + DEVICE_PHASES}
    record["time_checkpoint_s"] = totals["checkpoint"]
    record["time_eval_s"] = totals["eval"]
    return record
