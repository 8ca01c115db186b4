"""Traces and memory snapshots of chosen steps: `trainer.profile.steps=[first,last]`,
`trainer.profile.memory_snapshot_step=N`.

The trace is torch.profiler's Chrome/Perfetto JSON (open it in https://ui.perfetto.dev's offline viewer, in
chrome://tracing or in TensorBoard's profiler plugin), one file per rank in <run_dir>/profile/. The training
code marks its phases with `phase(...)` (torch.profiler.record_function, a few microseconds when no
profiler runs): forge/data, forge/forward, forge/backward, forge/optimizer, and forge/<collective> for
every collective (trainer/parallel/collectives.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from forge_lm.trainer.config import ProfileConfig

logger = logging.getLogger(__name__)


def phase(name: str) -> record_function:
    """A named range in profiler traces (forge/<name>)."""
    return record_function(f"forge/{name}")


class StepProfiler:
    """Call `before(step)` and `after(step)` around every training step (steps count from 1)."""

    def __init__(self, cfg: ProfileConfig, run_dir: Path, rank: int, device: torch.device) -> None:
        self.cfg, self.folder, self.rank, self.device = cfg, Path(run_dir) / "profile", rank, device
        self._profile: Optional[profile] = None
        self.written: list[Path] = []

    def before(self, step: int) -> None:
        if self.cfg.steps and step == self.cfg.steps[0]:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self._profile = profile(activities=activities, record_shapes=False, with_stack=False)
            self._profile.__enter__()
        if step == self.cfg.memory_snapshot_step and self.device.type == "cuda":
            torch.cuda.memory._record_memory_history(max_entries=200_000)

    def after(self, step: int) -> None:
        if self._profile is not None and step == self.cfg.steps[1]:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._profile.__exit__(None, None, None)
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"trace_steps{self.cfg.steps[0]}-{step}_rank{self.rank}.json"
            self._profile.export_chrome_trace(str(path))
            self._profile = None
            self.written.append(path)
            logger.info("profiler trace of steps %d-%d: %s", self.cfg.steps[0], step, path)
        if step == self.cfg.memory_snapshot_step and self.device.type == "cuda":
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"memory_step{step}_rank{self.rank}.pickle"
            torch.cuda.memory._dump_snapshot(str(path))
            torch.cuda.memory._record_memory_history(enabled=None)
            self.written.append(path)
            logger.info("CUDA memory snapshot of step %d: %s (https://pytorch.org/memory_viz)", step, path)
