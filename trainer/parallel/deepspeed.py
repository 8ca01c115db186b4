"""DeepSpeed ZeRO as an alternative training backend: `trainer.backend=deepspeed`.

`DeepSpeedEngine` has the surface of `forge_lm.trainer.engine.Engine` that `train.py` uses (`train_step`,
`evaluate`, `save`, `load`, `full_model`, `parts`, `precision`), so the model, data, metrics, evaluation
and checkpoint layout are the same whichever backend trains. What differs is who shards: DeepSpeed's
ZeRO stage 1 (optimizer state), 2 (+ gradients) or 3 (+ parameters) over all processes, instead of
FSDP2 on the device mesh. DeepSpeed runs data parallelism only (config validation refuses tp/pp).

There is no DeepSpeed JSON file: `deepspeed_config(cfg)` derives the whole DeepSpeed config from the
Hydra config. The optimizer is ours (`forge_lm.trainer.optim.build_optimizer`: torch AdamW, no weight decay on
norms, biases and embeddings) and so is the learning-rate schedule (`forge_lm.trainer.schedule`), so a step is
the same arithmetic as with the torch backend; ZeRO partitions the optimizer's parameter groups.

A checkpoint `<run_dir>/checkpoints/step_<N>/` holds DeepSpeed's own files (`*model_states.pt`, and
`*optim_states.pt`, one optimizer shard per rank) next to the `train_state.pt` and `complete.json` that
every checkpoint has; it is assembled in `step_<N>.tmp` and completed by the shared
`Checkpointer.complete`, so it is just as crash-safe. DeepSpeed also copies its consolidation scripts
into `checkpoints/` (`python checkpoints/zero_to_fp32.py checkpoints out_dir --tag step_<N>` writes
plain fp32 weights). DeepSpeed checkpoints resume with the DeepSpeed backend, the same ZeRO stage
family (1/2 or 3) and the same number of processes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import shutil
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from forge_lm.trainer import checkpoint as ckpt
from forge_lm.trainer.config import Config, ConfigError
from forge_lm.trainer.engine import model_inputs, wants_bf16
from forge_lm.trainer.loss import IGNORE_INDEX, lm_loss
from forge_lm.trainer.model import Decoder
from forge_lm.trainer.optim import build_optimizer
from forge_lm.trainer.parallel import collectives
from forge_lm.trainer.parallel.mesh import ParallelDims
from forge_lm.trainer.schedule import build_scheduler

logger = logging.getLogger(__name__)

_NEVER = 2**31 - 1  # "steps_per_print": DeepSpeed's own progress lines are off, train.py logs the metrics


def deepspeed_config(cfg: Config, bf16: bool, device_type: str = "cpu") -> dict[str, Any]:
    """The DeepSpeed config dict for this run, built from the Hydra config (no JSON file)."""
    t = cfg.trainer
    zero: dict[str, Any] = {"stage": t.deepspeed.zero_stage}
    if t.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * cfg.grad_accum_steps * cfg.parallel.dp_size,
        "gradient_clipping": t.grad_clip,  # 0 disables clipping, as trainer.grad_clip=0 does
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        # The optimizer is ours (torch AdamW, passed to deepspeed.initialize), also with ZeRO-Offload,
        # where DeepSpeed would otherwise insist on its JIT-compiled CPU Adam.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """The model wrapped by `deepspeed.initialize` with our optimizer and schedule; see the module doc."""

    def __init__(self, cfg: Config, dims: ParallelDims, device: torch.device, model: Decoder) -> None:
        if device.type == "cpu":  # say it, rather than let DeepSpeed probe for GPUs and warn
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # DeepSpeed probes its C++ ops by running gcc, which setuptools logs at INFO into train.log.
        logging.getLogger("compilers").setLevel(logging.WARNING)
        try:
            import deepspeed
        except ImportError as e:
            raise ConfigError(
                f"trainer.backend=deepspeed but DeepSpeed cannot be imported ({e}): install the extra, "
                "`pip install 'forge-lm[deepspeed]'`, or use trainer.backend=torch."
            ) from e
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines would flood train.log
        # ZeRO calls these torch.distributed functions on every step; the warning is DeepSpeed's to act on.
        warnings.filterwarnings(
            "ignore",
            message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
            category=FutureWarning,
        )

        self.cfg, self.dims, self.device = cfg, dims, device
        self.model_cfg = model.cfg
        bf16 = wants_bf16(cfg, device)
        self.precision = "bf16" if bf16 else "fp32"
        _ensure_process_group()  # a single-process run still needs a (1-rank) group for DeepSpeed
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self.ds_config = deepspeed_config(cfg, bf16, device.type)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=build_optimizer(model, cfg.trainer),
            # Built on the optimizer DeepSpeed wraps; DeepSpeed steps it once per optimizer step.
            lr_scheduler=lambda optimizer: build_scheduler(optimizer, cfg.trainer),
            config=self.ds_config,
        )
        self.parts = [self.engine.module]

    # ---- one optimizer step ----------------------------------------------------------------------------

    def _all_reduce(self, value: torch.Tensor) -> torch.Tensor:
        return collectives.all_reduce(value)

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Forward and backward over this rank's micro-batches, clip, step. Returns the global mean loss."""
        engine = self.engine
        if len(micro_batches) != engine.gradient_accumulation_steps():
            raise ValueError(
                f"DeepSpeed is configured for {engine.gradient_accumulation_steps()} micro-batches per step, "
                f"got {len(micro_batches)}"
            )
        n_local = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches)
        n_global = int(self._all_reduce(torch.tensor(float(n_local))).item())
        lr = self.optimizer.param_groups[0]["lr"]
        # As in Engine: every token weighs the same whichever rank and micro-batch it is in, so each
        # micro-batch contributes (sum of its token losses) / (global token count). DeepSpeed averages the
        # gradients over the data-parallel ranks, hence * world_size; it would also divide each backward
        # by the accumulation steps, which scale_wrt_gas=False turns off.
        scale = self.world_size / n_global
        loss_sum = torch.zeros((), device=self.device)
        for batch in micro_batches:
            logits = engine(**model_inputs(batch, self.device, self.cfg.data.document_masking))
            loss = lm_loss(logits, batch["labels"].to(self.device), reduction="sum")
            # MoE auxiliary losses (zero for dense models), a mean over micro-batches as in Engine.
            aux = engine.module.aux_loss() / len(micro_batches)
            engine.backward(loss * scale + aux, scale_wrt_gas=False)
            engine.step()  # reduces, clips (gradient_clipping) and steps at the last micro-batch only
            loss_sum += loss.detach().float()
        total = self._all_reduce(loss_sum)
        grad_norm = engine.get_global_grad_norm()
        return {
            "loss": total.item() / n_global,
            "grad_norm": float("nan") if grad_norm is None else float(grad_norm),
            "lr": lr,
            "tokens": n_global,
        }

    # ---- evaluation ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Token-weighted mean validation loss; every rank evaluates the same batches (ZeRO-3 gathers
        parameters collectively during forward, so all ranks must run the same forwards)."""
        self.engine.eval()
        total, tokens = 0.0, 0
        try:
            for batch in batches:
                labels = batch["labels"].to(self.device)
                logits = self.engine(**model_inputs(batch, self.device, self.cfg.data.document_masking))
                total += lm_loss(logits, labels, reduction="sum").item()
                tokens += int((labels != IGNORE_INDEX).sum())
        finally:
            self.engine.train()
        if tokens == 0:
            raise ValueError("the validation set is empty: raise data.val_fraction or lower data.seq_len")
        loss = total / tokens
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}

    # ---- checkpoints -----------------------------------------------------------------------------------

    def save(self, checkpointer: ckpt.Checkpointer, step: int, train_state: dict[str, Any]) -> Path:
        """DeepSpeed writes its files into step_<N>.tmp, rank 0 adds train_state.pt, then the shared
        `Checkpointer.complete` marks, renames and prunes. Always synchronous (trainer.async_checkpoint
        applies to the torch backend)."""
        checkpointer.wait()
        root = checkpointer.root
        final, tmp = checkpointer.paths(step)
        if self.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a save that was interrupted
            tmp.mkdir()
        collectives.barrier()
        self.engine.save_checkpoint(str(root), tag=tmp.name, save_latest=False)
        if self.rank == 0:
            state = {
                "step": step,
                "rng": ckpt.rng_state(),
                "scheduler": self.scheduler.state_dict(),
                **train_state,
            }
            torch.save(state, tmp / ckpt.TRAIN_STATE)
        checkpointer.complete(step, tmp, final)
        return final

    def load(self, path: Path) -> dict[str, Any]:
        """Restore model, optimizer and schedule; returns the train state (step, loader, RNG, metadata)."""
        path = Path(path)
        state = ckpt.read_train_state(path)
        self._check_layout(path)
        try:
            loaded, _ = self.engine.load_checkpoint(
                str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=False
            )
        except Exception as e:
            raise ckpt.CheckpointError(
                f"DeepSpeed cannot load {path} ({type(e).__name__}: {e}). Resume with the model config the "
                "checkpoint was trained with (its run directory holds config.yaml)."
            ) from e
        if loaded is None:
            raise ckpt.CheckpointError(f"DeepSpeed found no checkpoint to load in {path}")
        self.scheduler.load_state_dict(state["scheduler"])
        # The learning rate of the next step comes from the schedule, whatever the optimizer state held.
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        return state

    def _check_layout(self, path: Path) -> None:
        """Refuse, with the fix, what DeepSpeed cannot resume: another backend's checkpoint, another ZeRO
        stage family (3 keeps per-rank parameter files, 1 and 2 one model file) or another process count."""
        if not any(path.glob("*model_states.pt")):
            raise ckpt.CheckpointError(
                f"{path} was not written by the DeepSpeed backend (no *model_states.pt): resume it with "
                "trainer.backend=torch, or start this run in a new run directory."
            )
        saved_zero3 = any(path.glob("zero_pp_rank_*_model_states.pt"))
        zero3 = self.cfg.trainer.deepspeed.zero_stage == 3
        if saved_zero3 != zero3:
            raise ckpt.CheckpointError(
                f"{path} was saved with ZeRO-{'3' if saved_zero3 else '1/2'} but this run uses "
                f"trainer.deepspeed.zero_stage={self.cfg.trainer.deepspeed.zero_stage}: resume with the stage it "
                "was saved with."
            )
        saved_ranks = len(list(path.glob("zero_pp_rank_*_optim_states.pt")))
        if saved_ranks != self.world_size:
            raise ckpt.CheckpointError(
                f"{path} was saved by {saved_ranks} processes and this run has {self.world_size}: DeepSpeed "
                f"resumes a ZeRO checkpoint only on as many processes as saved it; launch {saved_ranks}."
            )

    def full_model(self, checkpoint: Optional[Path]) -> Optional[Decoder]:
        """An unsharded fp32 copy of the model on rank 0, for export and sampling; None on other ranks.

        Rebuilt from the checkpoint just written (DeepSpeed's zero_to_fp32 merges the fp32 master weights
        of all ranks, for any ZeRO stage); without a checkpoint, gathered from the live engine.
        """
        if checkpoint is None:
            return self._gather_model()
        if self.rank != 0:
            return None
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        checkpoint = Path(checkpoint)
        quiet = io.StringIO()  # it prints a line per parameter group, and a progress bar
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
        return self._plain_model(state)

    def _gather_model(self) -> Optional[Decoder]:
        """Collective: every rank takes part in gathering ZeRO-3 partitions; rank 0 keeps a copy."""
        import deepspeed

        module = self.engine.module
        params = list(module.parameters()) if self.cfg.trainer.deepspeed.zero_stage == 3 else []
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=bool(params)):
            state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
        return self._plain_model(state) if self.rank == 0 else None

    def _plain_model(self, state: dict[str, torch.Tensor]) -> Decoder:
        with torch.device("meta"):
            model = Decoder(self.model_cfg)
        model.to_empty(device="cpu")
        model.init_buffers()  # RoPE frequencies and the embedding/output tie
        model.load_state_dict(state)
        return model.to(self.device)


def _ensure_process_group() -> None:
    """DeepSpeed needs a torch.distributed process group. Under torchrun `init_parallel` has started one
    (gloo on CPU, nccl on CUDA) and DeepSpeed joins it; a single process gets a 1-rank gloo group over an
    in-memory store (no port to pick) and the rank variables torchrun would have set."""
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
        for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(name, value)  # DeepSpeed reads them
