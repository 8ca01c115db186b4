"""The run's configuration: typed dataclasses behind the Hydra config tree in `configs/`.

Hydra composes the YAML files and command-line overrides onto these dataclasses (registered as
structured configs in `trainer.config_store`), so an unknown field or a wrongly typed value fails
during composition, and `__post_init__` checks the values themselves before anything starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from data.config import DataConfig
from trainer.model.config import ConfigError, ModelConfig

__all__ = [
    "Config",
    "ConfigError",
    "EvalConfig",
    "ParallelConfig",
    "TrainerConfig",
    "WandbConfig",
]


@dataclass
class WandbConfig:
    """Weights & Biases logging. It never blocks a run: if it cannot start, the run goes on without it."""

    mode: str = "offline"
    """'offline' (written under the run directory, sync later with `wandb sync`), 'online', or 'disabled'."""
    project: str = "forge-lm"
    """wandb project name."""
    entity: Optional[str] = None
    """wandb entity (team or user); None: the default of your wandb login."""

    def __post_init__(self) -> None:
        if self.mode not in ("offline", "online", "disabled"):
            raise ConfigError(f"trainer.wandb.mode={self.mode!r}: use 'offline', 'online' or 'disabled'.")


@dataclass
class TrainerConfig:
    """The optimisation: batch, schedule, optimizer, precision, checkpoints."""

    max_steps: int = 1000
    """Optimizer steps to train for."""
    global_batch_tokens: int = 65536
    """Tokens per optimizer step across all data-parallel ranks; a multiple of data.seq_len * micro_batch_size * dp."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one rank; gradient accumulation makes up the rest of the batch."""
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of `lr`."""
    schedule: str = "cosine"
    """'cosine' (warmup then cosine decay to min_lr) or 'wsd' (warmup, stable, then linear decay)."""
    warmup_steps: int = 100
    """Linear warmup from 0 to `lr`."""
    decay_fraction: float = 0.2
    """For 'wsd': fraction of max_steps spent in the final decay."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay, applied to matrices only (not norms, biases or embeddings)."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    precision: str = "auto"
    """'auto' (bf16 autocast where the device supports it fast, i.e. CUDA with bf16; fp32 elsewhere), 'bf16' or 'fp32'."""
    device: str = "auto"
    """'auto' (cuda if available, else cpu), 'cpu' or 'cuda'."""
    seed: int = 0
    """Seed of the model initialisation (the data order has its own seed, data.seed)."""
    log_every: int = 10
    """Print and record metrics every this many steps."""
    checkpoint_every: int = 0
    """Save a checkpoint every this many steps; 0: only at the end."""
    keep_last: int = 2
    """Keep this many most recent checkpoints (older ones are deleted after a newer one is complete)."""
    resume: str = "auto"
    """'auto' (latest complete checkpoint of the run directory, if any), 'never', or a checkpoint directory."""
    exit_at_step: int = 0
    """Save a checkpoint and exit once this step is reached, as a preempted job would; 0: never.
    Running the same command again resumes from there."""
    export_hf: bool = True
    """Export a Hugging Face folder (run_dir/hf) at the end of training."""
    threads: int = 0
    """torch intra-op threads on CPU; 0: leave torch's default."""
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        for name in ("max_steps", "global_batch_tokens", "micro_batch_size", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"trainer.{name}={getattr(self, name)} must be positive.")
        if self.schedule not in ("cosine", "wsd"):
            raise ConfigError(f"trainer.schedule={self.schedule!r}: use 'cosine' or 'wsd'.")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"trainer.precision={self.precision!r}: use 'auto', 'bf16' or 'fp32'.")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"trainer.device={self.device!r}: use 'auto', 'cpu' or 'cuda'.")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"trainer.min_lr_ratio={self.min_lr_ratio} must be in [0, 1].")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ConfigError(f"trainer.decay_fraction={self.decay_fraction} must be in (0, 1].")
        if self.warmup_steps < 0 or self.checkpoint_every < 0 or self.keep_last < 1 or self.exit_at_step < 0:
            raise ConfigError(
                "trainer.warmup_steps, trainer.checkpoint_every and trainer.exit_at_step must be >= 0 and "
                f"trainer.keep_last >= 1 (got {self.warmup_steps}, {self.checkpoint_every}, {self.exit_at_step}, "
                f"{self.keep_last})."
            )


@dataclass
class ParallelConfig:
    """The device mesh. Its product must equal the number of processes (1 for a single-device run)."""

    dp_replicate: int = 1
    """Data-parallel replicas (DDP-style or the replicate dimension of HSDP)."""
    dp_shard: int = 1
    """Data-parallel ranks sharding parameters (FSDP)."""
    tp: int = 1
    """Tensor-parallel degree."""
    pp: int = 1
    """Pipeline stages."""

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "dp_shard", "tp", "pp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}={getattr(self, name)} must be >= 1.")

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.pp

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard


@dataclass
class EvalConfig:
    """Evaluation during and after training."""

    every: int = 0
    """Evaluate validation loss every this many steps; 0: only at the start and the end."""
    max_batches: int = 20
    """Validation batches per evaluation (a fixed, ordered prefix of the validation split)."""
    batch_size: int = 8
    """Sequences per validation batch."""
    prompts: list[str] = field(default_factory=lambda: ["def main("])
    """Prompts sampled from at the end of training."""
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 40

    def __post_init__(self) -> None:
        if self.every < 0 or self.max_batches < 1 or self.batch_size < 1:
            raise ConfigError(
                f"eval.every={self.every} must be >= 0, eval.max_batches={self.max_batches} and "
                f"eval.batch_size={self.batch_size} >= 1."
            )


@dataclass
class Config:
    """Everything a run needs; the resolved copy is saved as run_dir/config.yaml."""

    name: str = "run"
    """Run name; the run directory defaults to runs/<name>."""
    output_root: str = "runs"
    """Root of run directories, prepared data and trained tokenizers."""
    run_dir: str = "runs/run"
    """Where this run writes its config, metrics, checkpoints and export."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        seq, mbs, dp = self.data.seq_len, self.trainer.micro_batch_size, self.parallel.dp_size
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len={seq} is longer than model.max_seq_len={self.model.max_seq_len}: "
                f"raise model.max_seq_len to at least {seq} or shorten data.seq_len."
            )
        gbt = self.trainer.global_batch_tokens
        if gbt % seq != 0:
            lo, hi = (gbt // seq) * seq, (gbt // seq + 1) * seq
            raise ConfigError(
                f"trainer.global_batch_tokens={gbt} is not a multiple of data.seq_len={seq}: "
                f"use e.g. {max(lo, seq)} or {hi}."
            )
        per_step = seq * mbs * dp
        if gbt % per_step != 0:
            raise ConfigError(
                f"trainer.global_batch_tokens={gbt} is not a multiple of data.seq_len * trainer.micro_batch_size * "
                f"data-parallel size = {seq} * {mbs} * {dp} = {per_step}: set it to a multiple of {per_step} "
                "or change trainer.micro_batch_size."
            )

    @property
    def grad_accum_steps(self) -> int:
        return self.trainer.global_batch_tokens // (
            self.data.seq_len * self.trainer.micro_batch_size * self.parallel.dp_size
        )
