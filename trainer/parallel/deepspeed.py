"""DeepSpeed ZeRO as an alternative training backend: `trainer.backend=deepspeed`.

`DeepSpeedStrategy` is one of the two strategies (trainer/strategy.py) under the training engine: token
counting, loss scaling, accumulation, evaluation and the checkpoint's train state are the engine's, so
they are the same whichever backend trains. What differs is who shards: DeepSpeed's ZeRO stage 1
(optimizer state), 2 (+ gradients) or 3 (+ parameters) over all processes, instead of FSDP2 on the
device mesh. DeepSpeed runs data parallelism only (config validation refuses tp/pp).

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
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from forge_lm.trainer import checkpoint as ckpt
from forge_lm.trainer.config import Config, ConfigError
from forge_lm.trainer.model import Decoder
from forge_lm.trainer.optim import build_optimizer
from forge_lm.trainer.parallel.mesh import ParallelDims
from forge_lm.trainer.safe_pickle import UnsafeCheckpointError, safe_torch_load
from forge_lm.trainer.schedule import build_scheduler
from forge_lm.trainer.strategy import Strategy, summed_loss, wants_bf16

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


class DeepSpeedStrategy(Strategy):
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
            optimizer=build_optimizer(model, cfg.trainer, fused=False),  # DeepSpeed steps it itself
            # Built on the optimizer DeepSpeed wraps; DeepSpeed steps it once per optimizer step.
            lr_scheduler=lambda optimizer: build_scheduler(optimizer, cfg.trainer),
            config=self.ds_config,
        )
        self.parts = [self.engine.module]
        self.optimizers, self.schedulers = [self.optimizer], [self.scheduler]
        self.dp_size, self.dp_group = self.world_size, None  # ZeRO averages over all ranks

    # ---- forward, backward, step -------------------------------------------------------------------------

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return summed_loss(self.engine, batch, self.device, self.cfg.data.document_masking)

    def backward(self, loss: torch.Tensor) -> None:
        """DeepSpeed would divide each backward by the accumulation steps: scale_wrt_gas=False turns that off,
        since the engine has already divided by the global token count. `step()` after every micro-batch is
        DeepSpeed's protocol: it reduces, clips (gradient_clipping) and steps at the last one only."""
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()

    def optimizer_step(self, judge: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        # Stepped in `backward` at the accumulation boundary; the norm DeepSpeed measured for its clipping.
        # (No `judge`: the update has happened by now, so trainer.spike is inactive here, can_skip_steps=False.)
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return torch.tensor(float("nan"), device=self.device)
        return norm.detach().float() if isinstance(norm, torch.Tensor) else torch.tensor(float(norm), device=self.device)

    # ---- checkpoints -----------------------------------------------------------------------------------

    def save(self, checkpointer: ckpt.Checkpointer, step: int, train_state: dict[str, Any]) -> Path:
        """DeepSpeed writes its files into step_<N>.tmp, rank 0 adds train_state.pt, then the shared
        `Checkpointer.complete` marks, renames and prunes. Always synchronous (trainer.async_checkpoint
        applies to the torch backend)."""
        final, tmp = checkpointer.begin(step)
        self.engine.save_checkpoint(str(checkpointer.root), tag=tmp.name, save_latest=False)
        checkpointer.write_train_state(tmp, step, train_state)
        checkpointer.complete(step, tmp, final)
        return final

    def load(self, path: Path) -> dict[str, Any]:
        """Restore model and optimizer state; returns the train state (step, schedule, loader, RNG, metadata)."""
        path = Path(path)
        state = ckpt.read_train_state(path)  # verifies the checkpoint's files first
        self._check_layout(path)
        # DeepSpeed reads every file through its checkpoint engine with torch.load(weights_only=False); for
        # this load the engine reads weights-only instead, admitting just the DeepSpeed types its files hold.
        reader = self.engine.checkpoint_engine
        own_load = reader.load
        reader.load = safe_torch_load(_deepspeed_checkpoint_types())
        try:
            loaded, _ = self.engine.load_checkpoint(
                str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=False
            )
        except UnsafeCheckpointError as e:
            raise ckpt.CheckpointError(str(e)) from None
        except Exception as e:
            raise ckpt.CheckpointError(
                f"DeepSpeed cannot load {path} ({type(e).__name__}: {e}). Its files match their checksums, so the "
                "model differs from the one saved: resume with the model config the checkpoint was trained with "
                "(its run directory holds config.yaml)."
            ) from e
        finally:
            reader.load = own_load
        if loaded is None:
            raise ckpt.CheckpointError(f"DeepSpeed found no checkpoint to load in {path}")
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


def _deepspeed_checkpoint_types() -> tuple[Any, ...]:
    """The DeepSpeed classes a ZeRO checkpoint's pickles hold (loss scaler, ZeRO stage, fragment addresses):
    plain records, admitted by name to the weights-only unpickler."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)


def _ensure_process_group() -> None:
    """DeepSpeed needs a torch.distributed process group. Under torchrun `init_parallel` has started one
    (gloo on CPU, nccl on CUDA) and DeepSpeed joins it; a single process gets a 1-rank gloo group over an
    in-memory store (no port to pick) and the rank variables torchrun would have set."""
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
        for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(name, value)  # DeepSpeed reads them
