"""The run's configuration: typed dataclasses behind the Hydra config tree in `configs/`.

Hydra composes the YAML files and command-line overrides onto these dataclasses (registered as
structured configs in `forge_lm.trainer.config_store`), so an unknown field or a wrongly typed value fails
during composition, and `__post_init__` checks the values themselves before anything starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from forge_lm.data.config import DataConfig
from forge_lm.trainer.model.config import ConfigError, ModelConfig
from forge_lm.trainer.posttrain.config import PosttrainConfig

__all__ = [
    "Config",
    "ConfigError",
    "DeepSpeedConfig",
    "EvalConfig",
    "ParallelConfig",
    "SpikeConfig",
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
class DeepSpeedConfig:
    """DeepSpeed ZeRO, used when trainer.backend=deepspeed (the DeepSpeed JSON is generated from this)."""

    zero_stage: int = 2
    """ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters."""
    offload_optimizer: bool = False
    """Keep optimizer state (and its update) on the CPU (ZeRO-Offload)."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (1, 2, 3):
            raise ConfigError(f"trainer.deepspeed.zero_stage={self.zero_stage}: use 1, 2 or 3.")


@dataclass
class ProfileConfig:
    """torch.profiler traces and CUDA memory snapshots of chosen steps (trainer/profiling.py)."""

    steps: list[int] = field(default_factory=list)
    """[first, last]: record a trace of these steps (inclusive) into <run_dir>/profile/, a Chrome/Perfetto JSON
    per rank with named ranges forge/data, forge/forward, forge/backward, forge/optimizer and one per
    collective. [] (default): no profiling."""
    memory_snapshot_step: Optional[int] = None
    """On CUDA: record allocations during this step and dump a snapshot for PyTorch's memory visualizer
    (<run_dir>/profile/memory_step<N>_rank<R>.pickle). None: off."""

    def __post_init__(self) -> None:
        if self.steps and (len(self.steps) != 2 or not 1 <= self.steps[0] <= self.steps[1]):
            raise ConfigError(
                f"trainer.profile.steps={list(self.steps)}: give [first, last] with 1 <= first <= last, e.g. [5,6]."
            )
        if self.memory_snapshot_step is not None and self.memory_snapshot_step < 1:
            raise ConfigError(f"trainer.profile.memory_snapshot_step={self.memory_snapshot_step} must be >= 1.")


@dataclass
class DebugConfig:
    """Debugging aids for a run that went wrong (trainer/debug.py); all off by default."""

    find_nonfinite: bool = False
    """Check every module's output and input gradient as they are produced, and stop at the first NaN/Inf
    naming the module (and its non-finite parameters). Waits for the device once per module: slow."""
    layer_stats_steps: list[int] = field(default_factory=list)
    """Steps at which to record per-layer statistics (kind "layer_stats" in metrics.jsonl and TensorBoard,
    drawn by `forge plot` into plots/layer_stats.png): each block's output RMS and largest magnitude, its
    largest attention logit, and gradient and update RMS per parameter group. [] (default): none."""
    layer_stats_every: int = 0
    """Also record them every this many steps; 0 (default): only at `layer_stats_steps`. They wait for the
    device and copy the parameters once, so keep them to a few steps."""
    inject_spike_batches: list[int] = field(default_factory=list)
    """Fault injection, to see trainer.spike at work: the gradient of these global batches is multiplied by
    `inject_spike_factor` (the logged loss is not). Batches are numbered along the data stream from 1, so
    batch n is what step n trains on until a rewind makes the run skip data; a batch the run skipped is not
    met again, as bad data would not be. [] (default): none."""
    inject_spike_factor: float = 1.0e4
    """The factor of `inject_spike_batches`; nan or inf plants a non-finite gradient."""

    @property
    def layer_stats_wanted(self) -> bool:
        return bool(self.layer_stats_steps) or self.layer_stats_every > 0

    def __post_init__(self) -> None:
        if self.layer_stats_every < 0 or any(s < 1 for s in self.layer_stats_steps):
            raise ConfigError(
                f"trainer.debug.layer_stats_every={self.layer_stats_every} must be >= 0 and "
                f"trainer.debug.layer_stats_steps={list(self.layer_stats_steps)} hold steps >= 1, e.g. [1,100]."
            )
        if any(b < 1 for b in self.inject_spike_batches):
            raise ConfigError(
                f"trainer.debug.inject_spike_batches={list(self.inject_spike_batches)} must hold batch numbers >= 1, "
                "e.g. [20,21]."
            )


@dataclass
class SpikeConfig:
    """What a step whose loss or gradient norm is non-finite or far above its recent values does
    (trainer/spike.py, README "Loss spikes"): its update is dropped on every rank together, counted and
    logged; a run of such steps rewinds to the last checkpoint from before them and skips their data."""

    enabled: bool = True
    """Watch every step. Off: a non-finite loss stops the run at the next log step, as with trainer.backend=
    deepspeed, whose optimizer steps inside DeepSpeed where an update cannot be dropped (there it is inactive)."""
    z_threshold: float = 6.0
    """A step is an outlier when its loss or its gradient norm exceeds the mean of the window by more than this
    many standard deviations (one-sided: a drop is never an outlier). Non-finite values always are."""
    window: int = 128
    """The statistics are those of the last this-many steps whose update was applied."""
    min_steps: int = 64
    """No step is judged an outlier before the window holds this many values (non-finite ones still are)."""
    max_consecutive_skips: int = 5
    """This many skipped steps in a row rewind the run: it reloads the newest checkpoint saved before them and
    skips the batches they trained on. The host reads the skips at log steps (trainer.log_every), where it waits
    for the device anyway, so a run of skips is acted on at the first log step that sees it this long."""
    max_rewinds: int = 3
    """Rewinds allowed in a run; one more run of skips stops it with a message saying what was seen. 0: never
    rewind (the first run of skips stops the run)."""

    def __post_init__(self) -> None:
        if not self.z_threshold > 0:
            raise ConfigError(f"trainer.spike.z_threshold={self.z_threshold} must be > 0, e.g. 6.0.")
        if self.window < 2 or not 2 <= self.min_steps <= self.window:
            raise ConfigError(
                f"trainer.spike.window={self.window} and trainer.spike.min_steps={self.min_steps} need "
                "2 <= min_steps <= window (a standard deviation needs two values), e.g. window=128 min_steps=64."
            )
        if self.max_consecutive_skips < 1 or self.max_rewinds < 0:
            raise ConfigError(
                f"trainer.spike.max_consecutive_skips={self.max_consecutive_skips} must be >= 1 and "
                f"trainer.spike.max_rewinds={self.max_rewinds} >= 0, e.g. 5 and 3."
            )


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
    async_checkpoint: bool = False
    """Write checkpoints in the background while training continues (completed at the next save or the end)."""
    on_save_error: str = "stop"
    """What a checkpoint that cannot be written (disk full, file-size limit or quota, no permission) does:
    'stop' ends the run with an error naming the checkpoint, the path and the bytes needed and free;
    'continue' warns the same and keeps training, trying again at the next checkpoint. Either way the
    partial checkpoint is removed and the earlier ones are untouched."""
    resume: str = "auto"
    """'auto' (latest complete checkpoint of the run directory, if any), 'never', or a checkpoint directory."""
    exit_at_step: int = 0
    """Save a checkpoint and exit once this step is reached, as a preempted job would; 0: never.
    Running the same command again resumes from there."""
    time_budget_s: float = 0.0
    """Wall-clock budget of this run in seconds: once the next step would overrun it, save a checkpoint and
    exit with status 75 (trainer.preemption.REQUEUE_EXIT_CODE) to be started again; 0: no budget (or the
    TRAINER_TIME_BUDGET_S environment variable). SIGUSR1 and SIGTERM stop the run the same way."""
    export_hf: bool = True
    """Export a Hugging Face folder (run_dir/hf) at the end of training."""
    threads: int = 0
    """torch intra-op threads on CPU; 0: leave torch's default."""
    backend: str = "torch"
    """'torch' (FSDP2 / tensor / pipeline parallel on the device mesh) or 'deepspeed' (ZeRO, data parallel only)."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: bool = True
    """Also write the logged scalars (and samples as text) as TensorBoard event files into <run_dir>/tensorboard
    (rank 0 only): `tensorboard --logdir runs` then shows every run, offline."""
    plot: bool = True
    """At the end of a run, draw <run_dir>/plots/overview.png (`forge plot` on this run) and print its path."""
    data_stall_warn: float = 0.1
    """Warn when waiting for the data loader takes more than this fraction of the training time between two
    log steps (the loader cannot keep up: raise data.prefetch, or prepare the data offline with data.mode=offline);
    0: never."""

    def __post_init__(self) -> None:
        if self.backend not in ("torch", "deepspeed"):
            raise ConfigError(f"trainer.backend={self.backend!r}: use 'torch' or 'deepspeed'.")
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
        if not 0.0 <= self.data_stall_warn < 1.0:
            raise ConfigError(f"trainer.data_stall_warn={self.data_stall_warn} must be in [0, 1) (0: never warn).")
        if self.on_save_error not in ("stop", "continue"):
            raise ConfigError(f"trainer.on_save_error={self.on_save_error!r}: use 'stop' or 'continue'.")
        if self.time_budget_s < 0:
            raise ConfigError(f"trainer.time_budget_s={self.time_budget_s} must be >= 0 (0: no budget).")
        if self.warmup_steps < 0 or self.checkpoint_every < 0 or self.keep_last < 1 or self.exit_at_step < 0:
            raise ConfigError(
                "trainer.warmup_steps, trainer.checkpoint_every and trainer.exit_at_step must be >= 0 and "
                f"trainer.keep_last >= 1 (got {self.warmup_steps}, {self.checkpoint_every}, {self.exit_at_step}, "
                f"{self.keep_last})."
            )


PP_SCHEDULES = {
    # name -> pipeline stages each rank holds (multi-stage schedules interleave "virtual" stages)
    "GPipe": 1,
    "1F1B": 1,
    "Interleaved1F1B": 2,
    "LoopedBFS": 2,
    "InterleavedZeroBubble": 2,
    "ZBVZeroBubble": 2,
    "DualPipeV": 2,
}


@dataclass
class ParallelConfig:
    """The device mesh and how the model is spread over it. The product of the sizes must equal the
    number of processes started (1 for a single-device run)."""

    dp_replicate: int = 1
    """Data-parallel replicas: plain replication, or the replicate dimension of HSDP when dp_shard > 1."""
    dp_shard: int = -1
    """Data-parallel ranks sharding parameters, gradients and optimizer state (FSDP2).
    -1: the number of processes left after the other dimensions (WORLD_SIZE / (dp_replicate*tp*pp))."""
    tp: int = 1
    """Tensor-parallel degree (attention heads and MLP width split across ranks)."""
    pp: int = 1
    """Pipeline-parallel stages (ranks along the layer stack)."""
    ep: int = 1
    """Expert-parallel degree for mixture-of-experts models (1: experts are not split). The ep ranks are
    borrowed from dp_shard: each holds num_experts/ep whole experts, and tokens travel to their experts and
    back with all-to-all exchanges (trainer/parallel/moe_parallel.py). Must divide dp_shard and
    model.moe.num_experts; runs with tp and pp, not yet with dp_replicate > 1."""
    sequence_parallel: bool = True
    """With tp > 1, also split norms and residuals along the sequence (saves activation memory)."""
    loss_parallel: bool = True
    """With tp > 1, compute the cross-entropy on vocabulary-sharded logits without gathering them."""
    pp_schedule: str = "1F1B"
    """Pipeline schedule: GPipe, 1F1B, Interleaved1F1B, LoopedBFS, InterleavedZeroBubble, ZBVZeroBubble, DualPipeV."""
    activation_checkpointing: str = "none"
    """'none', 'full' (recompute every block in backward) or 'selective' (every second block)."""
    compile: bool = False
    """torch.compile each transformer block."""
    reshard_after_forward: bool = True
    """FSDP2: free gathered parameters after forward (ZeRO-3 behaviour); False keeps them until backward."""
    collective_timeout_s: float = 600.0
    """How long a rank waits for a peer that died or stopped answering before it ends itself (exit status 75,
    which `forge slurm` requeues; the restart resumes from the last complete checkpoint). It bounds every
    collective of every process group, and the silence of a peer's heartbeat (trainer.parallel.liveness).
    Work one rank does alone while the others wait (data preparation, checkpoint publication, the final
    export) may take longer: that wait goes through the store and lasts as long as the rank is alive.
    Raise it if one step, evaluation or checkpoint write can leave ranks this far apart."""

    def __post_init__(self) -> None:
        if not self.collective_timeout_s >= 5:
            raise ConfigError(
                f"parallel.collective_timeout_s={self.collective_timeout_s} is too short to tell a slow rank from a "
                "dead one: use at least 5 seconds (the default is 600)."
            )
        for name in ("dp_replicate", "tp", "pp", "ep"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}={getattr(self, name)} must be >= 1.")
        if self.dp_shard == -1:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            others = self.dp_replicate * self.tp * self.pp
            if world % others != 0:
                raise ConfigError(
                    f"parallel.dp_shard=-1 cannot fill {world} processes: dp_replicate*tp*pp = {others} "
                    f"does not divide {world}. Change parallel.tp/pp/dp_replicate or the number of processes."
                )
            self.dp_shard = world // others
        if self.dp_shard < 1:
            raise ConfigError(f"parallel.dp_shard={self.dp_shard} must be >= 1 (or -1 for 'the rest').")
        if self.pp_schedule not in PP_SCHEDULES:
            raise ConfigError(
                f"parallel.pp_schedule={self.pp_schedule!r}: use one of {', '.join(PP_SCHEDULES)}."
            )
        if self.activation_checkpointing not in ("none", "full", "selective"):
            raise ConfigError(
                f"parallel.activation_checkpointing={self.activation_checkpointing!r}: use 'none', 'full' or 'selective'."
            )
        if self.ep > 1 and self.dp_shard % self.ep:
            raise ConfigError(
                f"parallel.ep={self.ep} must divide parallel.dp_shard={self.dp_shard} (expert parallelism borrows "
                f"its ranks from the sharded data-parallel ones): choose parallel.ep among "
                f"{[d for d in range(1, self.dp_shard + 1) if self.dp_shard % d == 0]}."
            )
        if self.ep > 1 and self.dp_replicate > 1:
            raise ConfigError(
                f"parallel.ep={self.ep} borrows its ranks from parallel.dp_shard and does not run with HSDP yet: set "
                "parallel.dp_replicate=1 (and raise parallel.dp_shard), or parallel.ep=1."
            )

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.pp

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def stages_per_rank(self) -> int:
        return PP_SCHEDULES[self.pp_schedule] if self.pp > 1 else 1


@dataclass
class EvalConfig:
    """Evaluation during and after training, and of a saved model (`forge eval`); docs/eval.md.

    Each evaluation measures the validation loss, perplexity and bits per byte (overall and per data source),
    scores the benchmark tasks of `tasks`, and samples a continuation for each of `prompts`.
    """

    every: int = 0
    """Evaluate every this many steps; 0: only at the start and the end."""
    max_batches: int = 20
    """Validation batches per evaluation (a fixed, ordered prefix of the validation split)."""
    batch_size: int = 8
    """Sequences per validation batch."""
    per_source: bool = True
    """Also report loss, perplexity and bits per byte of each data source on its own (data with several sources)."""
    source_max_batches: int = 2
    """Validation batches of each source for the per-source numbers (batch_size sequences each)."""
    tasks: list[str] = field(default_factory=list)
    """Benchmark files scored at every evaluation: 'path' or 'name:path', in the public formats of HellaSwag,
    ARC, PIQA, LAMBADA, WikiText (JSON lines) or a BIG-bench task.json; the format is recognised from the file.
    Relative paths are looked up in the working directory, then among the task files shipped in the package
    (data/evalsets: 'bigbench/code_line_description/task.json')."""
    task_limit: Optional[int] = None
    """Score at most the first this-many examples of each task (as `lm_eval --limit`); None: all."""
    task_batch_size: int = 16
    """Sequences (context + continuation) per forward pass when scoring tasks."""
    max_length: Optional[int] = None
    """Longest sequence fed when scoring tasks (longer ones are cut from the left, as lm_eval does); None:
    model.max_seq_len, which is what lm_eval uses for the exported Hugging Face folder."""
    prompts: list[str] = field(default_factory=lambda: ["def main("])
    """Prompts sampled from at every evaluation (logged as 'generations') and printed at the end of training."""
    max_new_tokens: int = 64
    """Tokens sampled per prompt."""
    temperature: float = 0.8
    """Sampling temperature for the prompts; 0: greedy."""
    top_k: int = 40
    """Sample among the top-k tokens only; 0: all."""
    checkpoint: Optional[str] = None
    """`forge eval` only: the model to evaluate: a checkpoint directory (…/checkpoints/step_N, any
    parallel layout), a run directory (its latest complete checkpoint) or a Hugging Face model folder."""
    tokenizer: Optional[str] = None
    """`forge eval` only: tokenizer to use instead of the model's own (the one its run recorded, or
    the one in the Hugging Face folder)."""
    validation: bool = True
    """`forge eval` only: also measure the validation numbers on `data`, when the data's tokenizer
    is the model's (prepared first if missing); skipped with a note otherwise. Training always measures them."""
    output: Optional[str] = None
    """`forge eval` only: also write the results as JSON to this file."""

    def __post_init__(self) -> None:
        if self.every < 0 or self.max_batches < 1 or self.batch_size < 1:
            raise ConfigError(
                f"eval.every={self.every} must be >= 0, eval.max_batches={self.max_batches} and "
                f"eval.batch_size={self.batch_size} >= 1."
            )
        for name in ("source_max_batches", "task_batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval.{name}={getattr(self, name)} must be >= 1.")
        for name in ("task_limit", "max_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"eval.{name}={value} must be >= 1, or null (no limit).")
        if self.temperature < 0 or self.top_k < 0:
            raise ConfigError(
                f"eval.temperature={self.temperature} and eval.top_k={self.top_k} must be >= 0 (0: greedy / all)."
            )
        bad = [t for t in self.tasks if not isinstance(t, str) or not t.strip()]
        if bad:
            raise ConfigError(f"eval.tasks holds empty entries {bad}: give the path of each task file.")


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
    posttrain: PosttrainConfig = field(default_factory=PosttrainConfig)
    """Post-training objectives (sft, dpo) on conversations, from a pre-trained model (docs/posttrain.md)."""

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
                f"(e.g. {per_step * max(1, round(gbt / per_step))}) or change trainer.micro_batch_size"
                + (f" (e.g. {_micro_batch_that_fits(gbt, seq, dp)})." if _micro_batch_that_fits(gbt, seq, dp) else ".")
            )

        self._check_parallel_fits_model()

    def _check_parallel_fits_model(self) -> None:
        p, m = self.parallel, self.model
        if self.trainer.backend == "deepspeed" and self.trainer.debug.layer_stats_wanted:
            raise ConfigError(
                "trainer.debug.layer_stats_steps/layer_stats_every need trainer.backend=torch: DeepSpeed keeps the "
                "gradients in its own partitioned buffers. Set trainer.debug.layer_stats_steps=[] or use "
                "trainer.backend=torch."
            )
        if self.trainer.backend == "deepspeed" and (p.tp > 1 or p.pp > 1 or p.dp_replicate > 1):
            raise ConfigError(
                "trainer.backend=deepspeed runs ZeRO data parallelism only: set parallel.tp=1, parallel.pp=1 and "
                "parallel.dp_replicate=1 (use trainer.backend=torch for tensor/pipeline parallelism)."
            )
        # Each tensor-parallel rank holds whole heads and a slice of the MLP's (or each expert's) hidden size.
        tp_values = [
            d for d in range(1, m.n_kv_heads + 1) if m.n_heads % d == 0 and m.n_kv_heads % d == 0 and m.ffn_dim % d == 0
        ]
        if m.n_heads % p.tp or m.n_kv_heads % p.tp:
            raise ConfigError(
                f"parallel.tp={p.tp} must divide model.n_heads={m.n_heads} and model.n_kv_heads={m.n_kv_heads}: "
                f"each tensor-parallel rank holds whole heads. Choose parallel.tp among {tp_values}."
            )
        if p.tp > 1 and m.ffn_dim % p.tp:
            hidden = "each expert's hidden size" if m.is_moe else "the MLP's hidden size"
            raise ConfigError(
                f"parallel.tp={p.tp} must divide model.ffn_dim={m.ffn_dim} ({hidden}, split across the "
                f"tensor-parallel ranks): choose parallel.tp among {tp_values}, or change model.ffn_dim."
            )
        if p.ep > 1:
            if not m.is_moe:
                raise ConfigError(
                    f"parallel.ep={p.ep} splits the experts of a mixture-of-experts model, but model.moe.num_experts=0: "
                    "set parallel.ep=1."
                )
            if m.moe.num_experts % p.ep:
                raise ConfigError(
                    f"parallel.ep={p.ep} must divide model.moe.num_experts={m.moe.num_experts} (each rank holds "
                    f"whole experts): choose parallel.ep among "
                    f"{[d for d in range(1, p.dp_shard + 1) if p.dp_shard % d == 0 and m.moe.num_experts % d == 0]}."
                )
            if self.trainer.backend == "deepspeed":
                raise ConfigError(f"parallel.ep={p.ep} needs trainer.backend=torch (or parallel.ep=1).")
        if p.pp > 1:
            stages = p.pp * p.stages_per_rank
            if stages > m.n_layers:
                raise ConfigError(
                    f"parallel.pp={p.pp} with schedule {p.pp_schedule} needs {stages} stages but the model has only "
                    f"model.n_layers={m.n_layers}: lower parallel.pp to at most {max(1, m.n_layers // p.stages_per_rank)}, "
                    "or use a single-stage schedule (1F1B, GPipe)."
                )
            if m.tie_embeddings:
                raise ConfigError(
                    "model.tie_embeddings=true cannot be split across pipeline stages (the embedding lives on the "
                    "first stage, the output projection on the last): set model.tie_embeddings=false or parallel.pp=1."
                )
            if self.grad_accum_steps < stages and p.pp_schedule in (
                "DualPipeV",
                "ZBVZeroBubble",
                "Interleaved1F1B",
                "InterleavedZeroBubble",
                "LoopedBFS",
            ):
                raise ConfigError(
                    f"parallel.pp_schedule={p.pp_schedule} needs at least {stages} micro-batches per step, but "
                    f"trainer.global_batch_tokens gives {self.grad_accum_steps}: raise global_batch_tokens or lower "
                    "trainer.micro_batch_size."
                )

    @property
    def grad_accum_steps(self) -> int:
        return self.trainer.global_batch_tokens // (
            self.data.seq_len * self.trainer.micro_batch_size * self.parallel.dp_size
        )


def _micro_batch_that_fits(global_batch_tokens: int, seq_len: int, dp: int) -> int | None:
    """The largest micro-batch (sequences) with which `global_batch_tokens` splits evenly, or None."""
    sequences_per_rank, rest = divmod(global_batch_tokens // seq_len, dp)
    if rest or sequences_per_rank == 0:
        return None
    return max(d for d in range(1, min(sequences_per_rank, 64) + 1) if sequences_per_rank % d == 0)
