"""Pipeline parallelism: split the layer stack into stages and drive them with a torch schedule.

Stage modules keep the Decoder's parameter names (`tok_embeddings`, `layers.<i>`, `norm`, `output`),
so checkpoints are the same whatever the pipeline layout, and can be loaded into any other layout.

What a stage passes to the next: the hidden states and, for mixture-of-experts models, the router
statistics of all layers so far (RouterStats.pack, one fp32 vector). The load-balancing loss pools its
statistics over every layer, so no stage can compute its share alone; the last stage computes the auxiliary
losses from the pooled statistics exactly as one process does, and their gradients flow back to each
stage's routers through the same sends as the activations' gradients. What every stage gets from the
batch: the micro-batch's position_ids or document_ids, as keyword arguments (the schedule splits them into
micro-batches like the inputs), so packed documents are masked and positioned as in one process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining import schedules as torch_schedules

from forge_lm.trainer.config import ParallelConfig
from forge_lm.trainer.model import Decoder
from forge_lm.trainer.model.moe import not_counting_load, pooled_router_stats
from forge_lm.trainer.parallel.mesh import ParallelDims


class PipelineStageModule(nn.Module):
    """The slice of a Decoder that one pipeline stage runs.

    The first stage embeds token ids; the others receive hidden states (and, for MoE models, the router
    statistics so far). The last stage applies the final norm and output projection.
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

    def forward(
        self,
        x: torch.Tensor,
        router_stats: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        document_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Dense models: hidden states (logits on the last stage). MoE models: (that, router statistics of
        this stage's layers plus `router_stats`, those of the stages before)."""
        out = self._decoder.forward_stage(
            x,
            list(self.layers.values()),
            embed=self.tok_embeddings is not None,
            head=self.output is not None,
            position_ids=position_ids,
            document_ids=document_ids,
        )
        if not self.cfg.is_moe:
            return out
        stats = pooled_router_stats(self.layers.modules()).pack()
        return out, stats if router_stats is None else router_stats + stats


class _Stage(PipelineStage):
    """A PipelineStage whose shape-probing forward does not count towards the experts' load.

    On its first step a schedule runs every stage once on the first micro-batch (later stages on placeholder
    activations) to learn the shapes of what stages send each other (torch's dynamic metadata inference).
    That forward belongs to no training step: MoE layers must not add it to the load that balance=bias
    evens out and that the logs report.
    """

    def _forward_metadata_inference(self, *args: Any, **kwargs: Any) -> Any:
        with not_counting_load(self.submod):
            return super()._forward_metadata_inference(*args, **kwargs)


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
        stages.append(_Stage(module, sid, n_stages, device, group=dims.group("pp")))
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
