"""The training engine: a parallelized model with its optimizers, and what one step does with it.

The same code serves a single-device run (1x1 mesh: no process group, plain modules) and every
torchrun layout (FSDP2 / HSDP, tensor + sequence parallel, pipeline parallel, and their products).
The training loop in `train.py` only calls `train_step`, `evaluate`, `save`, `load` and `full_model`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
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
from forge_lm.trainer.loss import IGNORE_INDEX, lm_loss
from forge_lm.trainer.model import Decoder
from forge_lm.trainer.optim import build_optimizer
from forge_lm.trainer.parallel import collectives
from forge_lm.trainer.parallel.mesh import ParallelDims
from forge_lm.trainer.parallel.parallelize import parallelize, uses_fsdp
from forge_lm.trainer.parallel.pipeline import Pipeline, build_pipeline, stage_ids_for_rank
from forge_lm.trainer.schedule import build_scheduler


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


class Engine:
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
        else:
            self.parts = [parallelize(model, dims, param_dtype)]
        mixed_dtensors = dims.cfg.tp > 1 and not dims.cfg.sequence_parallel
        self.optimizers = [build_optimizer(p, cfg.trainer, foreach=not mixed_dtensors) for p in self.parts]
        self.schedulers = [build_scheduler(o, cfg.trainer) for o in self.optimizers]

    # ---- one optimizer step ----------------------------------------------------------------------------

    def _loss_context(self) -> contextlib.AbstractContextManager:
        return loss_parallel() if self.tp_loss_parallel else contextlib.nullcontext()

    def _pipeline_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One micro-batch's summed token loss, scaled by dp_size / global tokens (see train_step)."""
        with self._loss_context():
            return lm_loss(logits, labels, reduction="sum") * self._pipeline_scale

    def _all_reduce(self, value: torch.Tensor, *dims: str) -> torch.Tensor:
        return collectives.all_reduce(value, group=self.dims.group(*dims))

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """Forward and backward over this rank's micro-batches, clip, step.

        Returns the global mean token loss, the gradient norm, MoE statistics and the global token count as
        tensors on the device, and the learning rate as a float: nothing here waits for the device (no
        `.item()`), so the host runs ahead; the training loop reads the values at its log steps.
        """
        micro_batches = [to_device(b, self.device) for b in micro_batches]
        n_local = torch.stack([(b["labels"] != IGNORE_INDEX).sum() for b in micro_batches]).sum()
        n_global = self._all_reduce(n_local.float(), "dp_replicate", "dp_shard")
        # Each token weighs the same whichever rank, micro-batch or pipeline stage it is in: every layout
        # sums token losses and divides by the global token count. FSDP (and the pipeline's data-parallel
        # replicas) average gradients over the dp ranks, hence * dp_size.
        scale = self.dims.dp_size / n_global
        if self.pipeline is not None:
            out = {"loss": self._pipeline_step(micro_batches, scale) / n_global}
        else:
            out = self._accumulation_step(micro_batches, scale, n_global)
        grad_norm = self._clip_gradients()
        lr = self.optimizers[0].param_groups[0]["lr"]
        for opt, sched in zip(self.optimizers, self.schedulers):
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        return {**out, "grad_norm": grad_norm, "lr": lr, "tokens": n_global}

    def _accumulation_step(
        self, micro_batches: list[dict[str, torch.Tensor]], scale: torch.Tensor, n_global: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        model = self.parts[0]
        loss_sum = torch.zeros((), device=self.device)
        aux_sums: dict[str, torch.Tensor] = {}
        for batch in micro_batches:
            with self._loss_context():
                loss = self._loss_sum(model, batch)
                # MoE routers' auxiliary losses (zero for dense models): a mean over micro-batches,
                # averaged over dp ranks by FSDP like the gradients themselves.
                total = loss * scale + model.aux_loss() / len(micro_batches)
                total.backward()
            loss_sum += _local(loss.detach()).float()
            for name, value in model.aux_losses().items():
                aux_sums[name] = aux_sums.get(name, 0.0) + value.detach().float() / len(micro_batches)
        out = {"loss": self._all_reduce(loss_sum, "dp_replicate", "dp_shard") / n_global}
        for name, value in aux_sums.items():
            out[name] = self._all_reduce(value, "dp_replicate", "dp_shard") / self.dims.dp_size
        return out

    def _loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed next-token loss of one micro-batch.

        Without tensor parallelism the model computes it itself from its last hidden states (the fused
        linear + cross-entropy where the device runs it: the [tokens, vocab] logits are never held).
        Under tensor parallelism the logits are sharded DTensors and loss_parallel computes the loss.
        """
        labels = batch["labels"].to(self.device)
        with self.autocast:
            if self.dims.cfg.tp == 1:
                return model(**self._model_inputs(batch), labels=labels).sum()
            logits = model(**self._model_inputs(batch))
        return lm_loss(logits, labels, reduction="sum")

    def _model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return model_inputs(batch, self.device, self.cfg.data.document_masking)

    def _pipeline_step(self, micro_batches: list[dict[str, torch.Tensor]], scale: torch.Tensor) -> torch.Tensor:
        """Runs the schedule; returns the summed token loss over every rank's micro-batches.

        The schedule's loss function returns each micro-batch's summed token loss times `scale` (the schedule
        is built not to divide by the number of micro-batches), so padded micro-batches weigh by their
        tokens exactly as in the other layouts.
        """
        pipe = self.pipeline
        inputs = torch.cat([b["input_ids"] for b in micro_batches])
        labels = torch.cat([b["labels"] for b in micro_batches])
        losses: list[torch.Tensor] = []
        args = (inputs,) if pipe.has_first_stage else ()
        self._pipeline_scale = scale
        with self.autocast:
            pipe.schedule.step(
                *args,
                target=labels if pipe.has_last_stage else None,
                losses=losses if pipe.has_last_stage else None,
            )
        value = torch.zeros((), device=self.device)
        if pipe.has_last_stage:
            value += torch.stack([_local(x).detach().float() for x in losses]).sum() / scale
        self._all_reduce(value, "pp")
        return self._all_reduce(value, "dp_replicate", "dp_shard")

    def _clip_gradients(self) -> float:
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
            self._all_reduce(sq, "pp")
        norm = sq.sqrt()
        max_norm = self.cfg.trainer.grad_clip
        if max_norm > 0:
            for params in groups.values():
                torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm

    # ---- evaluation ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Token-weighted mean validation loss; every rank evaluates the same batches."""
        for part in self.parts:
            part.eval()
        total, tokens = 0.0, 0
        try:
            for batch in batches:
                labels = batch["labels"].to(self.device)
                n = int((labels != IGNORE_INDEX).sum())
                if self.pipeline is not None:
                    total += self._pipeline_eval(batch) * n
                else:
                    with self._loss_context():
                        total += _local(self._loss_sum(self.parts[0], batch)).item()
                tokens += n
        finally:
            for part in self.parts:
                part.train()
        if tokens == 0:
            raise ValueError("the validation set is empty: raise data.val_fraction or lower data.seq_len")
        loss = total / tokens
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}

    def eval_model(self) -> Optional[EvalModel]:
        """The model as task scoring and sampling call it during training (trainer.eval), or None.

        Single process: the model itself, scored by `Decoder.score`. FSDP / HSDP: the sharded model, which every
        rank calls through `forward` with the same batches. None under pipeline or tensor parallelism, where no
        rank runs the whole forward: those evaluations run at the end, on the consolidated model.
        """
        if self.pipeline is not None or self.dims.cfg.tp > 1:
            return None
        return EvalModel(self.parts[0], self.device, sharded=self.dims.distributed, autocast=self.autocast)

    def _pipeline_eval(self, batch: dict[str, torch.Tensor]) -> float:
        """Forward only, one stage after another, with plain point-to-point sends.

        (The schedules' own `eval` does not run for every schedule: the zero-bubble ones plan
        backward-input steps even without a backward.) Returns the batch's mean token loss.
        """
        pipe, cfg = self.pipeline, self.dims.cfg
        group = self.dims.group("pp")
        owner = {sid: r for r in range(cfg.pp) for sid in stage_ids_for_rank(cfg, r)}
        mine = {stage.stage_index: module for stage, module in zip(pipe.stages, pipe.modules)}
        me, last = self.dims.pp_rank, cfg.pp * cfg.stages_per_rank - 1
        h: Optional[torch.Tensor] = batch["input_ids"].to(self.device)
        value = torch.zeros((), device=self.device)
        for sid in range(last + 1):
            if owner[sid] != me:
                continue
            if sid > 0 and owner[sid - 1] != me:
                h = collectives.recv_tensor(dist.get_global_rank(group, owner[sid - 1]), self.device)
            with self.autocast:
                h = mine[sid](h)
            if sid < last and owner[sid + 1] != me:
                collectives.send_tensor(_local(h), dist.get_global_rank(group, owner[sid + 1]))
            if sid == last:
                with self._loss_context():
                    value += _local(lm_loss(h, batch["labels"].to(self.device))).float()
        return self._all_reduce(value, "pp").item()

    # ---- checkpoints -----------------------------------------------------------------------------------

    def save(self, checkpointer: ckpt.Checkpointer, step: int, train_state: dict[str, Any]) -> Path:
        state = {"scheduler": self.schedulers[0].state_dict(), **train_state}
        return checkpointer.save(step, self.parts, self.optimizers, state)

    def load(self, path: Path) -> dict[str, Any]:
        state = ckpt.load_checkpoint(path, self.parts, self.optimizers)
        for sched in self.schedulers:
            sched.load_state_dict(state["scheduler"])
        return state

    def full_model(self, checkpoint: Optional[Path]) -> Optional[Decoder]:
        """An unsharded copy of the model on this rank, for export and sampling.

        Single process: the model itself. Distributed: rank 0 rebuilds it from the checkpoint just
        written (any layout consolidates the same way); other ranks get None.
        """
        if not self.dims.distributed:
            return self.parts[0]
        if not self.dims.is_main or checkpoint is None:
            return None
        model = Decoder(self.model_cfg)
        ckpt.load_model_weights(checkpoint, model)
        return model.to(self.device)


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


def wants_bf16(cfg: Config, device: torch.device) -> bool:
    precision = cfg.trainer.precision
    if precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return precision == "bf16"
