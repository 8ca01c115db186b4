"""The training engine: one implementation of what a step, an evaluation and a checkpoint are.

Whatever shards the model (`parallel.*` through `parallelize`, or `trainer.backend=deepspeed`), the engine
counts the global tokens, weighs every token alike, accumulates micro-batches, collects the step's
statistics, evaluates and stages checkpoints; the strategy (trainer/strategy.py) only runs the model's
forward and backward, steps the optimizers and writes its own files. The training loop in `train.py`
calls `train_step`, `evaluate`, `save`, `load`, `full_model` and `eval_model`.

Nothing in a training step waits for the device: the statistics come back as device tensors and the loop
reads them at its log steps (tests/unit/test_host_syncs.py counts).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Optional

import torch

from forge_lm.trainer import checkpoint as ckpt
from forge_lm.trainer.config import Config
from forge_lm.trainer.debug import LayerStats, NonFiniteHunter
from forge_lm.trainer.eval.scorers import EvalModel
from forge_lm.trainer.loss import IGNORE_INDEX
from forge_lm.trainer.model import Decoder
from forge_lm.trainer.model.moe import update_expert_biases
from forge_lm.trainer.parallel import collectives
from forge_lm.trainer.parallel.mesh import ParallelDims
from forge_lm.trainer.profiling import phase
from forge_lm.trainer.spike import SpikeGuard
from forge_lm.trainer.strategy import Strategy, model_inputs, to_device, wants_bf16
from forge_lm.trainer.timing import StepClock

__all__ = ["Engine", "build_strategy", "model_inputs", "to_device", "wants_bf16"]

logger = logging.getLogger(__name__)


def build_strategy(cfg: Config, dims: ParallelDims, device: torch.device, model: Decoder) -> Strategy:
    """The strategy `trainer.backend` asks for, holding `model`."""
    if cfg.trainer.backend == "deepspeed":
        from forge_lm.trainer.parallel.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(cfg, dims, device, model)
    from forge_lm.trainer.parallel.torch_strategy import TorchStrategy

    return TorchStrategy(cfg, dims, device, model)


class Engine:
    def __init__(self, cfg: Config, dims: ParallelDims, device: torch.device, model: Decoder) -> None:
        self.cfg, self.dims, self.device = cfg, dims, device
        self.strategy = build_strategy(cfg, dims, device, model)
        self.steps_done = 0
        self.last_layer_stats: Optional[dict[str, float]] = None
        """The layer statistics of the last step that took them (trainer.debug.layer_stats_*), for the log."""
        self.hunter = NonFiniteHunter(self.strategy.parts) if cfg.trainer.debug.find_nonfinite else None
        self.layer_stats = LayerStats(cfg.trainer.debug) if cfg.trainer.debug.layer_stats_wanted else None
        self.clock = StepClock(device)
        """Where the steps' time goes; the training loop reads it at log steps (trainer/timing.py)."""
        self.objective: Optional[Any] = None
        """A loss other than the token loss (posttrain.objective=dpo: trainer/posttrain/dpo.py), or None."""
        self.spike: Optional[SpikeGuard] = None
        """Judges every step and drops outlier or non-finite updates on the device (trainer.spike), or None."""
        if cfg.trainer.spike.enabled and self.strategy.can_skip_steps:
            self.spike = SpikeGuard(cfg.trainer.spike, device)
        elif cfg.trainer.spike.enabled:
            logger.info(
                "trainer.spike is inactive with trainer.backend=%s: it steps the optimizer itself, so an update "
                "cannot be dropped; a non-finite loss stops the run instead", cfg.trainer.backend,
            )  # fmt: skip

    # What the loop and the tools read.
    @property
    def parts(self) -> list[torch.nn.Module]:
        return self.strategy.parts

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return self.strategy.optimizers

    @property
    def precision(self) -> str:
        return self.strategy.precision

    # ---- one optimizer step ----------------------------------------------------------------------------

    def train_step(
        self, micro_batches: list[dict[str, torch.Tensor]], grad_factor: Optional[float] = None
    ) -> dict[str, Any]:
        """Forward and backward over this rank's micro-batches, clip, step (or drop the step: trainer.spike).

        Returns the global mean token loss, the gradient norm, MoE statistics and the global token count as
        tensors on the device, and the learning rate as a float: nothing here waits for the device (no
        `.item()`), so the host runs ahead; the training loop reads the values at its log steps. With
        trainer.spike, "spike" is the step's verdict (trainer/spike.py: VERDICT), read by the loop's monitor.

        grad_factor: fault injection (trainer.debug.inject_spike_batches): back-propagate the loss times this,
        a planted gradient spike; the returned loss is the true one.
        """
        s = self.strategy
        self.steps_done += 1
        if self.hunter is not None:
            self.hunter.step = self.steps_done
        stats = self.layer_stats if self.layer_stats and self.layer_stats.due(self.steps_done) else None
        micro_batches = [to_device(b, self.device) for b in micro_batches]
        if self.objective is not None:
            return self._objective_step(micro_batches, grad_factor)
        n_local = torch.stack([(b["labels"] != IGNORE_INDEX).sum() for b in micro_batches]).sum()
        with self.clock.device("comm"):
            n_global = collectives.all_reduce(n_local.float(), group=s.dp_group)
        # Each token weighs the same whichever rank, micro-batch or pipeline stage it is in: every
        # strategy sums token losses and the engine divides by the global token count. Strategies average
        # gradients over their data-parallel ranks, hence * dp_size.
        scale = s.dp_size / n_global
        if grad_factor is not None:
            scale = scale * grad_factor
        lr = s.optimizers[0].param_groups[0]["lr"]
        out: dict[str, Any] = {}
        if stats is not None:
            stats.watch(s.parts)
        if s.runs_schedule:
            with phase("pipeline_schedule"), self.clock.device("fwd_bwd"):  # every micro-batch, interleaved
                loss_sum, aux_losses = s.schedule_step(micro_batches, scale)
            out.update(aux_losses)
        else:
            loss_sum = torch.zeros((), device=self.device)
            aux_sums: dict[str, torch.Tensor] = {}
            with self.clock.device("fwd_bwd"):
                for batch in micro_batches:
                    with s.loss_context():
                        with phase("forward"):
                            loss = s.loss_sum(batch)
                            # MoE routers' auxiliary losses (zero for dense models): a mean over
                            # micro-batches, averaged over dp ranks like the gradients themselves.
                            total = loss * scale + s.aux_loss() / len(micro_batches)
                        with phase("backward"):
                            s.backward(total)
                    loss_sum += _local(loss.detach()).float()
                    for name, value in s.aux_losses().items():
                        aux_sums[name] = aux_sums.get(name, 0.0) + value.detach().float() / len(micro_batches)
            with self.clock.device("comm"):
                for name, value in aux_sums.items():
                    out[name] = collectives.all_reduce(value, group=s.dp_group) / s.dp_size
                loss_sum = collectives.all_reduce(loss_sum, group=s.dp_group)
        if stats is not None:
            stats.before_update(s.parts)
        loss = loss_sum / n_global
        with phase("optimizer"), self.clock.device("optimizer"):
            grad_norm = s.optimizer_step(self._judge(loss, out))
            load = self._balance_experts()
        if load is not None:
            out["moe_load_max_over_mean"] = load
        if stats is not None:
            self.last_layer_stats = stats.after_update(s.parts)
        return {"loss": loss, **out, "grad_norm": grad_norm, "lr": lr, "tokens": n_global}

    def _judge(
        self, loss: torch.Tensor, out: dict[str, Any]
    ) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """trainer.spike: what decides, from the loss and the gradient norm, whether the update is dropped (it
        puts its verdict into `out["spike"]`); None when the policy is inactive."""
        if self.spike is None:
            return None

        def judge(grad_norm: torch.Tensor) -> torch.Tensor:
            out["spike"] = self.spike.judge(loss, grad_norm)
            return self.spike.found_inf

        return judge

    def _objective_step(
        self, micro_batches: list[dict[str, torch.Tensor]], grad_factor: Optional[float] = None
    ) -> dict[str, Any]:
        """A step of `self.objective` (DPO): its summed loss over the global count of its units (pairs), its
        metrics averaged the same way. One model part, no pipeline schedule (the objective refuses those)."""
        s, objective = self.strategy, self.objective
        units = torch.stack([objective.units(b) for b in micro_batches]).sum().float()
        tokens = torch.stack([(b["labels"] != IGNORE_INDEX).sum() for b in micro_batches]).sum().float()
        with self.clock.device("comm"):
            n_global, tokens = collectives.all_reduce(torch.stack([units, tokens]), group=s.dp_group).unbind()
        scale = s.dp_size / n_global
        if grad_factor is not None:  # fault injection, as in train_step
            scale = scale * grad_factor
        lr = s.optimizers[0].param_groups[0]["lr"]
        loss_sum = torch.zeros((), device=self.device)
        sums: dict[str, torch.Tensor] = {}
        with self.clock.device("fwd_bwd"):
            for batch in micro_batches:
                with phase("forward"), s.compute_context():
                    loss, metrics = objective.loss_sum(s.parts[0], batch, self.device)
                with phase("backward"):
                    s.backward(loss * scale)
                loss_sum += loss.detach().float()
                for name, value in metrics.items():
                    sums[name] = sums.get(name, 0.0) + value.float()
        with self.clock.device("comm"):
            loss_sum = collectives.all_reduce(loss_sum, group=s.dp_group)
            out = {name: collectives.all_reduce(v, group=s.dp_group) / n_global for name, v in sums.items()}
        loss = loss_sum / n_global
        with phase("optimizer"), self.clock.device("optimizer"):
            grad_norm = s.optimizer_step(self._judge(loss, out))
            load = self._balance_experts()
        if load is not None:
            out["moe_load_max_over_mean"] = load
        return {"loss": loss, **out, "grad_norm": grad_norm, "lr": lr, "tokens": tokens}

    @torch.no_grad()
    def evaluate_objective(self, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        """`self.objective`'s loss and metrics over held-out batches (every rank the same batches)."""
        assert self.objective is not None
        self.strategy.train(False)
        total: dict[str, float] = {}
        units = 0.0
        try:
            for batch in batches:
                batch = to_device(batch, self.device)
                with self.strategy.compute_context():
                    loss, metrics = self.objective.loss_sum(self.strategy.parts[0], batch, self.device)
                for name, value in {"loss": loss, **metrics}.items():
                    total[name] = total.get(name, 0.0) + float(value)
                units += float(self.objective.units(batch))
        finally:
            self.strategy.train(True)
        return {name: value / max(units, 1.0) for name, value in total.items()}

    def _balance_experts(self) -> Optional[torch.Tensor]:
        """MoE: the step's expert load over the global batch; with model.moe.balance=bias, the routing
        biases move towards balance (trainer/model/moe.py). None for dense models."""
        moe = self.cfg.model.moe
        if not moe.num_experts:
            return None
        loads = [
            update_expert_biases(
                part, moe.bias_update_rate, lambda t: collectives.all_reduce(t, group=self.strategy.dp_group)
            )
            for part in self.strategy.parts
        ]
        loads = [x for x in loads if x is not None]
        if not loads:
            return None
        load = torch.stack(loads).max()
        if self.dims.cfg.pp > 1:  # each pipeline rank holds only its own stages' layers: the worst of all
            collectives.all_reduce(load, op="max", group=self.dims.group("pp"))
        return load

    # ---- evaluation ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Token-weighted mean validation loss; every rank evaluates the same batches (so ZeRO-3 and FSDP
        gather their parameters together)."""
        self.strategy.train(False)
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        tokens = 0
        try:
            for batch in batches:
                batch = to_device(batch, self.device)
                total += _local(self.strategy.eval_loss_sum(batch)).double()
                tokens += int((batch["labels"] != IGNORE_INDEX).sum())
        finally:
            self.strategy.train(True)
        if tokens == 0:
            raise ValueError("the validation set is empty: raise data.val_fraction or lower data.seq_len")
        loss = total.item() / tokens
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}

    def eval_model(self) -> Optional[EvalModel]:
        return self.strategy.eval_model()

    # ---- checkpoints -----------------------------------------------------------------------------------

    def save(self, checkpointer: ckpt.Checkpointer, step: int, train_state: dict[str, Any]) -> Path:
        """The train state every checkpoint holds (step, RNG, schedule, loader, metadata) and the strategy's
        model and optimizer files, completed atomically by the checkpointer."""
        state = {"scheduler": self.strategy.schedulers[0].state_dict(), **train_state}
        # trainer.spike's window of recent steps, so a resumed run judges as this one would (None: inactive;
        # the key is there either way, so every backend's checkpoint holds the same train state).
        state["spike_window"] = self.spike.state_dict() if self.spike is not None else None
        return self.strategy.save(checkpointer, step, state)

    def load(self, path: Path) -> dict[str, Any]:
        state = self.strategy.load(Path(path))
        self.steps_done = state["step"]
        if self.spike is not None:
            self.spike.load_state_dict(state.get("spike_window"))
        for scheduler, optimizer in zip(self.strategy.schedulers, self.strategy.optimizers):
            scheduler.load_state_dict(_schedule_for_groups(state["scheduler"], len(optimizer.param_groups)))
            # The learning rate of the next step comes from the schedule, whatever the optimizer state held.
            for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr
        return state

    def full_model(self, checkpoint: Optional[Path]) -> Optional[Decoder]:
        """An unsharded copy of the model for export and sampling (rank 0; None on the others)."""
        return self.strategy.full_model(checkpoint)


def _schedule_for_groups(saved: dict[str, Any], n_groups: int) -> dict[str, Any]:
    """The saved schedule state for an optimizer of `n_groups` parameter groups. A layout whose optimizer
    splits its groups by mesh (trainer/optim.py) has more of them than one that does not; every group follows
    the same schedule from the same peak, so the first group's entries stand for all."""
    n_saved = len(saved["base_lrs"])
    if n_saved == n_groups:
        return saved
    return {
        k: [v[0]] * n_groups if isinstance(v, list) and len(v) == n_saved else v for k, v in saved.items()
    }


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t
