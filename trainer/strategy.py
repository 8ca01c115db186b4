"""How a model is sharded and stepped: the interface the training engine drives.

The engine (trainer/engine.py) owns what every layout shares: moving batches to the device, counting the
global tokens, scaling each micro-batch's loss by them, accumulation, the step's statistics, evaluation
and the checkpoint's train state. A strategy owns what differs between the two ways of sharding:

- `TorchStrategy` (trainer/parallel/torch_strategy.py): FSDP2 / HSDP, tensor and sequence parallelism and
  pipeline stages, applied by `parallelize`;
- `DeepSpeedStrategy` (trainer/parallel/deepspeed.py): DeepSpeed ZeRO stage 1, 2 or 3.

Also here: the helpers both sides use to feed the model (`to_device`, `model_inputs`, `summed_loss`).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from forge_lm.trainer import checkpoint as ckpt
from forge_lm.trainer.config import Config
from forge_lm.trainer.eval.scorers import EvalModel
from forge_lm.trainer.model import Decoder
from forge_lm.trainer.parallel.collectives import ProcessGroup


class Strategy(ABC):
    """One way of holding and stepping the model. All ranks call every method together."""

    parts: list[nn.Module]
    """The model parts this rank runs: the (wrapped) model, or its pipeline stages."""
    optimizers: list[torch.optim.Optimizer]
    schedulers: list[torch.optim.lr_scheduler.LRScheduler]
    precision: str
    """'bf16' or 'fp32', as the run reports it."""
    dp_size: int
    """Data-parallel ranks whose gradients the strategy averages (so the engine multiplies the loss back)."""
    dp_group: ProcessGroup
    """The group over which tokens are counted (None: all ranks, or no process group)."""
    runs_schedule: bool = False
    """True when a pipeline schedule runs forward and backward of all micro-batches itself (`schedule_step`)."""
    can_skip_steps: bool = False
    """True when `optimizer_step` can drop an update on the device as `judge` decides (trainer.spike)."""

    def loss_context(self) -> contextlib.AbstractContextManager:
        """Entered around each micro-batch's forward and backward (loss parallelism needs both inside)."""
        return contextlib.nullcontext()

    def compute_context(self) -> contextlib.AbstractContextManager:
        """Entered around a forward that does not go through `loss_sum` (post-training objectives): the
        precision the strategy computes in (autocast to bf16 where FSDP2 does not cast the parameters)."""
        return contextlib.nullcontext()

    @abstractmethod
    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward one micro-batch (already on the device): the sum of its token losses, a 0-dim tensor."""

    def aux_loss(self) -> torch.Tensor:
        """The weighted auxiliary loss of the last forward (MoE routers; zero for dense models)."""
        return self.parts[0].aux_loss()

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """The unweighted auxiliary losses of the last forward, by name, for the logs."""
        return self.parts[0].aux_losses()

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's (already scaled) loss, accumulating gradients."""

    def schedule_step(
        self, micro_batches: list[dict[str, torch.Tensor]], scale: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Pipelines only: forward and backward of all micro-batches; returns the global summed token loss and
        the auxiliary losses (MoE; {} for dense models) averaged over micro-batches and data-parallel ranks."""
        raise NotImplementedError

    @abstractmethod
    def optimizer_step(self, judge: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        """Clip, step the optimizers and schedules, clear gradients; returns the global gradient norm.

        judge (only where `can_skip_steps`): called with the global gradient norm before the update, returns
        a 0-dim float tensor on the device, 1.0 to drop this update on every rank (trainer/spike.py)."""

    def eval_loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Evaluation forward (no grad, eval mode): the summed token loss of one batch, the same on every rank."""
        with self.loss_context():
            return self.loss_sum(batch)

    def train(self, mode: bool = True) -> None:
        for part in self.parts:
            part.train(mode)

    @abstractmethod
    def save(self, checkpointer: ckpt.Checkpointer, step: int, train_state: dict[str, Any]) -> Path:
        """Write model and optimizer state plus `train_state` as checkpoint `step`; returns its directory."""

    @abstractmethod
    def load(self, path: Path) -> dict[str, Any]:
        """Restore model and optimizer state from `path`; returns its train state."""

    @abstractmethod
    def full_model(self, checkpoint: Optional[Path]) -> Optional[Decoder]:
        """An unsharded model for export and sampling on rank 0 (None elsewhere)."""

    def eval_model(self) -> Optional[EvalModel]:
        """The model as in-loop task scoring and sampling call it, or None where they run at the end."""
        return None


def wants_bf16(cfg: Config, device: torch.device) -> bool:
    precision = cfg.trainer.precision
    if precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return precision == "bf16"


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch on `device`: on CUDA from pinned memory and without blocking, so the copy overlaps compute."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: (v if v.is_cuda else v.pin_memory().to(device, non_blocking=True)) for k, v in batch.items()}


def model_inputs(
    batch: dict[str, torch.Tensor], device: torch.device, document_masking: bool
) -> dict[str, torch.Tensor]:
    """The model's keyword arguments for a batch (the one place that decides what the model sees).

    With document masking the model gets each token's document, attends within it, and numbers
    positions from each document's start; otherwise plain causal attention over the packed row.
    """
    inputs = {"input_ids": batch["input_ids"].to(device)}
    if document_masking:
        inputs["document_ids"] = batch["document_ids"].to(device)
    else:
        inputs["position_ids"] = batch["position_ids"].to(device)
    return inputs


def summed_loss(
    model: Any, batch: dict[str, torch.Tensor], device: torch.device, document_masking: bool
) -> torch.Tensor:
    """The summed next-token loss of a micro-batch through the model's own loss head (the fused linear +
    cross-entropy where the device runs it: the [tokens, vocab] logits are never held)."""
    labels = batch["labels"].to(device)
    return model(**model_inputs(batch, device, document_masking), labels=labels).sum()
