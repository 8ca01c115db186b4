"""FSDP2 / HSDP, tensor + sequence parallelism and pipeline stages: the PyTorch-native strategy.

The same code serves a single-device run (1x1 mesh: no process group, plain modules) and every torchrun
layout and their products. `parallelize` wraps the model (or each pipeline stage); this module runs the
micro-batches through it and steps the optimizers. Checkpoints are `torch.distributed.checkpoint` folders
under the model's own parameter names, so they load into any layout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from forge_lm.trainer import checkpoint as ckpt
from forge_lm.trainer.config import Config
from forge_lm.trainer.eval.scorers import EvalModel
from forge_lm.trainer.loss import lm_loss
from forge_lm.trainer.model import Decoder
from forge_lm.trainer.model.moe import AUX_LOSSES, RouterStats, aux_losses_of, weighted_aux_loss
from forge_lm.trainer.optim import build_optimizer, pin_implementation
from forge_lm.trainer.parallel import collectives
from forge_lm.trainer.parallel.mesh import ParallelDims
from forge_lm.trainer.parallel.parallelize import parallelize, uses_fsdp
from forge_lm.trainer.parallel.pipeline import Pipeline, build_pipeline, stage_ids_for_rank
from forge_lm.trainer.schedule import build_scheduler
from forge_lm.trainer.strategy import Strategy, model_inputs, summed_loss, wants_bf16


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


class TorchStrategy(Strategy):
    def __init__(self, cfg: Config, dims: ParallelDims, device: torch.device, model: Decoder) -> None:
        self.cfg, self.dims, self.device = cfg, dims, device
        self.model_cfg = model.cfg
        bf16 = wants_bf16(cfg, device)
        fsdp = uses_fsdp(dims)
        # FSDP2 does mixed precision itself (bf16 compute copies, fp32 master weights and reductions);
        # without it, autocast does.
        param_dtype = torch.bfloat16 if (bf16 and fsdp) else torch.float32
        self.autocast = (
            torch.autocast(device_type=device.type, dtype=torch.bfloat16)
            if (bf16 and not fsdp)
            else contextlib.nullcontext()
        )
        self.precision = "bf16" if bf16 else "fp32"
        self.dp_size = dims.dp_size
        self.dp_group = dims.group("dp_replicate", "dp_shard")
        self.tp_loss_parallel = dims.cfg.tp > 1 and dims.cfg.loss_parallel
        self.pipeline: Optional[Pipeline] = None
        if dims.cfg.pp > 1:
            self.pipeline = build_pipeline(
                model,
                dims,
                device,
                n_microbatches=cfg.grad_accum_steps,
                loss_fn=self._pipeline_loss,
                parallelize_stage=lambda m: parallelize(m, dims, param_dtype),
            )
            self.parts: list[nn.Module] = list(self.pipeline.modules)
            self.runs_schedule = True
        else:
            self.parts = [parallelize(model, dims, param_dtype)]
        # Fused AdamW everywhere: it can drop a step on the device (trainer.spike, `optimizer_step`).
        self.optimizers = [build_optimizer(p, cfg.trainer, fused=True) for p in self.parts]
        self.schedulers = [build_scheduler(o, cfg.trainer) for o in self.optimizers]
        self._pipeline_scale: Optional[torch.Tensor] = None
        self._pipeline_micro_batches = 1
        self._pipeline_records: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []

    # ---- forward, backward, step -------------------------------------------------------------------------

    def loss_context(self) -> contextlib.AbstractContextManager:
        return loss_parallel() if self.tp_loss_parallel else contextlib.nullcontext()

    def compute_context(self) -> contextlib.AbstractContextManager:
        return self.autocast

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Without tensor parallelism the model computes the loss from its last hidden states (fused where
        the device runs it). Under tensor parallelism the logits are sharded DTensors and loss_parallel
        computes it; the loss comes back as a plain tensor either way, so that MoE auxiliary losses (plain
        tensors: the routers are replicated) can be added to it."""
        model, masking = self.parts[0], self.cfg.data.document_masking
        with self.autocast:
            if self.dims.cfg.tp == 1:
                return summed_loss(model, batch, self.device, masking)
            logits = model(**model_inputs(batch, self.device, masking))
        return _local(lm_loss(logits, batch["labels"], reduction="sum"))

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _pipeline_loss(
        self, output: torch.Tensor | tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor
    ) -> torch.Tensor:
        """What the schedule back-propagates for one micro-batch: its summed token loss scaled by dp_size /
        global tokens, plus, for MoE models, the weighted auxiliary loss over all layers (from the router
        statistics the stages passed along) divided by the number of micro-batches: both as
        Engine.train_step weighs them outside pipelines. Each call's unweighted parts are recorded for
        `schedule_step`."""
        logits, stats = output if isinstance(output, tuple) else (output, None)
        aux = aux_losses_of(RouterStats.unpack(stats)) if stats is not None else {}
        token_loss = _local(lm_loss(logits, labels, reduction="sum"))  # plain, to add the aux loss to
        self._pipeline_records.append((token_loss.detach(), {k: v.detach() for k, v in aux.items()}))
        weighted_aux = weighted_aux_loss(aux, self.model_cfg.moe) / self._pipeline_micro_batches
        return token_loss * self._pipeline_scale + weighted_aux

    def schedule_step(
        self, micro_batches: list[dict[str, torch.Tensor]], scale: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The schedule runs every micro-batch; the loss function returns each one's summed token loss times
        `scale` (the schedule is built not to average over micro-batches), so padded micro-batches weigh by
        their tokens as in every other layout. Returns the global summed token loss and, for MoE models,
        the auxiliary losses averaged over micro-batches and data-parallel ranks."""
        pipe, n = self.pipeline, len(micro_batches)
        inputs = torch.cat([b["input_ids"] for b in micro_batches])
        labels = torch.cat([b["labels"] for b in micro_batches])
        # Positions or documents go to every stage (the schedule cuts them into micro-batches like inputs).
        per_batch = [model_inputs(b, self.device, self.cfg.data.document_masking) for b in micro_batches]
        stage_kwargs = {k: torch.cat([b[k] for b in per_batch]) for k in per_batch[0] if k != "input_ids"}
        args = (inputs,) if pipe.has_first_stage else ()
        self._pipeline_scale, self._pipeline_micro_batches, self._pipeline_records = scale, n, []
        # Loss parallelism needs its context around the cross-entropy's backward too, which the schedule runs.
        with self.autocast, self.loss_context():
            pipe.schedule.step(*args, target=labels if pipe.has_last_stage else None, **stage_kwargs)
        # The schedule's first step also calls the loss function once to probe shapes (pipeline._Stage):
        # this step's micro-batches are the last n calls.
        records = self._pipeline_records[-n:] if pipe.has_last_stage else []
        self._pipeline_records = []
        value = torch.zeros((), device=self.device)
        aux = torch.zeros(len(AUX_LOSSES), device=self.device)
        for token_loss, aux_losses in records:
            value += _local(token_loss).float()
            if aux_losses:
                aux += torch.stack([aux_losses[name] for name in AUX_LOSSES]).float() / n
        # Only the last stage has them: a sum over the pipeline ranks hands them to every rank.
        both = collectives.all_reduce(torch.cat([value[None], aux]), group=self.dims.group("pp"))
        both = collectives.all_reduce(both, group=self.dp_group)
        aux_out = dict(zip(AUX_LOSSES, both[1:] / self.dp_size)) if self.model_cfg.is_moe else {}
        return both[0], aux_out

    can_skip_steps = True

    def optimizer_step(self, judge: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        grad_norm = self._clip_gradients()
        if judge is not None:
            # The fused AdamW reads `found_inf` on the device: 1.0 leaves parameters, moments and step counts
            # untouched (no host sync). The schedule still moves on: the learning rate follows the step count.
            found_inf = judge(grad_norm)
            for opt in self.optimizers:
                opt.found_inf = found_inf
        for opt, sched in zip(self.optimizers, self.schedulers):
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        return grad_norm

    def _clip_gradients(self) -> torch.Tensor:
        """Clip by the global gradient norm over all parameters of all stages and ranks.

        Gradients come as plain tensors and as DTensors on different meshes (e.g. norms replicated
        while projections are tensor-parallel), which one fused norm cannot mix: norms are taken per
        mesh, made global with `full_tensor`, and combined as a sum of squares.
        """
        groups: dict[object, list[torch.Tensor]] = {}
        for part in self.parts:
            for p in part.parameters():
                if p.grad is not None:
                    key = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
                    groups.setdefault(key, []).append(p)
        sq = torch.zeros((), device=self.device)
        for params in groups.values():
            sq += _local(torch.nn.utils.get_total_norm([p.grad for p in params])).float().pow(2)
        if self.dims.cfg.pp > 1:  # each stage holds only its own parameters' gradients
            collectives.all_reduce(sq, group=self.dims.group("pp"))
        norm = sq.sqrt()
        max_norm = self.cfg.trainer.grad_clip
        if max_norm > 0:
            for params in groups.values():
                torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm

    # ---- evaluation ----------------------------------------------------------------------------------------

    def eval_loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.pipeline is not None:
            return self._pipeline_eval(batch)
        return super().eval_loss_sum(batch)

    def eval_model(self) -> Optional[EvalModel]:
        """Single process: the model itself, scored by `Decoder.score`. FSDP / HSDP: the sharded model, which
        every rank calls through `forward` with the same batches. None under pipeline or tensor parallelism,
        where no rank runs the whole forward: those evaluations run at the end, on the consolidated model."""
        if self.pipeline is not None or self.dims.cfg.tp > 1:
            return None
        return EvalModel(self.parts[0], self.device, sharded=self.dims.distributed, autocast=self.autocast)

    def _pipeline_eval(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward only, one stage after another, with plain point-to-point sends; the summed token loss.

        (The schedules' own `eval` does not run for every schedule: the zero-bubble ones plan
        backward-input steps even without a backward.)
        """
        pipe, cfg = self.pipeline, self.dims.cfg
        group = self.dims.group("pp")
        owner = {sid: r for r in range(cfg.pp) for sid in stage_ids_for_rank(cfg, r)}
        mine = {stage.stage_index: module for stage, module in zip(pipe.stages, pipe.modules)}
        me, last = self.dims.pp_rank, cfg.pp * cfg.stages_per_rank - 1
        inputs = model_inputs(batch, self.device, self.cfg.data.document_masking)
        h: Optional[torch.Tensor] = inputs.pop("input_ids")
        value = torch.zeros((), device=self.device)
        for sid in range(last + 1):
            if owner[sid] != me:
                continue
            if sid > 0 and owner[sid - 1] != me:
                h = collectives.recv_tensor(dist.get_global_rank(group, owner[sid - 1]), self.device)
            with self.autocast:
                h = mine[sid](h, **inputs)
            if isinstance(h, tuple):  # MoE: the router statistics are not needed for a validation loss
                h = h[0]
            if sid < last and owner[sid + 1] != me:
                collectives.send_tensor(_local(h), dist.get_global_rank(group, owner[sid + 1]))
            if sid == last:
                with self.loss_context():
                    value += _local(lm_loss(h, batch["labels"], reduction="sum")).float()
        return collectives.all_reduce(value, group=group)

    # ---- checkpoints -----------------------------------------------------------------------------------

    def save(self, checkpointer: ckpt.Checkpointer, step: int, train_state: dict[str, Any]) -> Path:
        return checkpointer.save(step, self.parts, self.optimizers, train_state)

    def load(self, path: Path) -> dict[str, Any]:
        state = ckpt.load_checkpoint(path, self.parts, self.optimizers)
        for opt in self.optimizers:  # a checkpoint also holds the AdamW flags it was saved with: keep ours
            pin_implementation(opt, fused=True)
        return state

    def full_model(self, checkpoint: Optional[Path]) -> Optional[Decoder]:
        """Single process: the model itself. Distributed: rank 0 rebuilds it from the checkpoint just
        written (any layout consolidates the same way); other ranks get None."""
        if not self.dims.distributed:
            return self.parts[0]
        if not self.dims.is_main or checkpoint is None:
            return None
        model = Decoder(self.model_cfg)
        ckpt.load_model_weights(checkpoint, model)
        return model.to(self.device)
