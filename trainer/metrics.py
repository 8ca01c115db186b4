"""Training metrics: one JSON line per record in <run_dir>/metrics.jsonl, mirrored to TensorBoard and wandb.

TensorBoard event files go to <run_dir>/tensorboard (`tensorboard --logdir runs`), scalars as
'<kind>/<name>' and samples as text. wandb is offline by default (files under <run_dir>/wandb, `wandb sync`
later). Neither ever stops a run: if one cannot start or write, the run continues with a warning.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

from forge_lm.trainer.config import WandbConfig

logger = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(
        self,
        run_dir: str | os.PathLike,
        wandb_cfg: WandbConfig,
        run_name: str,
        config: dict[str, Any],
        tensorboard: bool = True,
    ):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tensorboard = _start_tensorboard(Path(run_dir) / "tensorboard") if tensorboard else None
        self._wandb = _start_wandb(Path(run_dir), wandb_cfg, run_name, config)

    def log(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
        record = {"kind": kind, "step": step, "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            try:
                for key, value in record.items():
                    if key in ("kind", "step", "time"):
                        continue
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        self._tensorboard.add_scalar(f"{kind}/{key}", value, step)
                    elif isinstance(value, str):
                        self._tensorboard.add_text(f"{kind}/{key}", value, step)
            except Exception as e:  # never let logging stop training
                logger.warning("TensorBoard logging failed (%s); continuing without it", e)
                self._tensorboard = None
        if self._wandb is not None:
            try:
                self._wandb.log(
                    {f"{kind}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step
                )
            except Exception as e:  # never let logging stop training
                logger.warning("wandb.log failed (%s); continuing without wandb", e)
                self._wandb = None

    def log_text(self, step: int, key: str, texts: dict[str, str]) -> None:
        """Mirror texts (prompt -> generation) to wandb as a table; the metrics file gets them through `log`."""
        if self._wandb is None:
            return
        try:
            import wandb

            table = wandb.Table(
                columns=["step", "prompt", "text"], data=[[step, p, t] for p, t in texts.items()]
            )
            self._wandb.log({key: table}, step=step)
        except Exception as e:  # never let logging stop training
            logger.warning("wandb table logging failed (%s); continuing without wandb", e)
            self._wandb = None

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception as e:
                logger.warning("wandb.finish failed: %s", e)
            self._wandb = None


def _start_tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(folder), flush_secs=10)
    except Exception as e:  # e.g. the tensorboard package is missing: the run goes on
        logger.warning("TensorBoard event files are off (%s)", e)
        return None


def read_metrics(run_dir: str | os.PathLike, kind: Optional[str] = None) -> list[dict[str, Any]]:
    """All records of a run's metrics file (optionally only one kind), in the order written."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _start_wandb(run_dir: Path, cfg: WandbConfig, run_name: str, config: dict[str, Any]):
    if cfg.mode == "disabled":
        return None
    try:
        import wandb

        return wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=run_name,
            mode=cfg.mode,
            dir=str(run_dir),
            config=config,
            resume="allow",
            id=_run_id(run_dir),
        )
    except Exception as e:
        logger.warning(
            "wandb could not start (%s); the run continues, metrics are in %s", e, run_dir / "metrics.jsonl"
        )
        return None


def _run_id(run_dir: Path) -> str:
    """A stable wandb id per run directory, so a resumed run appends to the same wandb run."""
    id_file = run_dir / "wandb_id.txt"
    if id_file.exists():
        return id_file.read_text().strip()
    import secrets

    run_id = secrets.token_hex(4)
    id_file.write_text(run_id + "\n")
    return run_id


# Peak dense bf16 tensor-core FLOP/s per device (vendor datasheets, without sparsity). Matched by
# substring of torch.cuda.get_device_name(), most specific first. MFU is not reported elsewhere (CPU).
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("MI300X", 1307e12),
    ("MI250X", 383e12),
]


def peak_flops(device_name: str) -> Optional[float]:
    """Peak bf16 FLOP/s of a device by name, or None when unknown (e.g. a CPU)."""
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def peak_memory_gib(device) -> float:
    """Peak memory of this process: allocated CUDA memory on a GPU, peak resident set size on a CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
