"""Pipeline parallelism: split the layer stack into stages and drive them with a torch schedule.

Stage modules keep the Decoder's parameter names (`tok_embeddings`, `layers.<i>`, `norm`, `output`),
so checkpoints are the same whatever the pipeline layout, and can be loaded into any other layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining import schedules as torch_schedules

from forge_lm.trainer.config import ParallelConfig
from forge_lm.trainer.model import Decoder
from forge_lm.trainer.parallel.mesh import ParallelDims


class PipelineStageModule(nn.Module):
    """The slice of a Decoder that one pipeline stage runs.

    The first stage embeds token ids; the others receive hidden states. The last stage applies the
    final norm and output projection. Positions are the default 0..T-1 (packed-document position
    resets are not carried between stages).
    """

    def __init__(self, model: Decoder, layer_ids: list[int], first: bool, last: bool) -> None:
        super().__init__()
        self.cfg = model.cfg
        self.tok_embeddings = model.tok_embeddings if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
        self.norm = model.norm if last else None
        self.output = model.output if last else None
        # Not registered as a submodule (its other layers belong to other stages): only its forward is used.
        object.__setattr__(self, "_decoder", model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._decoder.forward_stage(
            x, list(self.layers.values()), embed=self.tok_embeddings is not None, head=self.output is not None
        )


@dataclass
class Pipeline:
    schedule: torch_schedules._PipelineSchedule
    stages: list[PipelineStage]
    modules: list[PipelineStageModule]
    has_first_stage: bool
    has_last_stage: bool


def split_layers(n_layers: int, n_stages: int) -> list[list[int]]:
    """Contiguous, as even as possible; earlier stages take the remainder (the last also runs the head)."""
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        size = base + (1 if s < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


def stage_ids_for_rank(cfg: ParallelConfig, pp_rank: int) -> list[int]:
    """Which stages this rank runs: one; or two, looped (r, r+pp) or V-shaped (r, 2pp-1-r)."""
    if cfg.stages_per_rank == 1:
        return [pp_rank]
    if cfg.pp_schedule in ("ZBVZeroBubble", "DualPipeV"):
        return [pp_rank, 2 * cfg.pp - 1 - pp_rank]
    return [pp_rank, pp_rank + cfg.pp]


def build_pipeline(
    model: Decoder,
    dims: ParallelDims,
    device: torch.device,
    n_microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    parallelize_stage: Callable[[nn.Module], nn.Module],
) -> Pipeline:
    cfg = dims.cfg
    n_stages = cfg.pp * cfg.stages_per_rank
    layer_split = split_layers(model.cfg.n_layers, n_stages)
    modules, stages = [], []
    for sid in stage_ids_for_rank(cfg, dims.pp_rank):
        module = PipelineStageModule(model, layer_split[sid], first=sid == 0, last=sid == n_stages - 1)
        module = parallelize_stage(module)
        modules.append(module)
        stages.append(PipelineStage(module, sid, n_stages, device, group=dims.group("pp")))
    schedule_cls = getattr(torch_schedules, f"Schedule{cfg.pp_schedule}")
    # `loss_fn` returns each micro-batch's summed token loss already divided by the global token count
    # (Engine.train_step): the schedule must not average over micro-batches as well (scale_grads=False),
    # or micro-batches with more padding would weigh as much as full ones.
    first = stages[0] if cfg.stages_per_rank == 1 else stages
    schedule = schedule_cls(first, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return Pipeline(
        schedule=schedule,
        stages=stages,
        modules=modules,
        has_first_stage=any(s.is_first for s in stages),
        has_last_stage=any(s.is_last for s in stages),
    )
