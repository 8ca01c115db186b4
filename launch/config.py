"""`launch.*`: where and how a run is launched, and the Hydra composition the launch tools share.

The launch tools (`forge slurm`, `forge plan`, `forge torchrun`) take the
same overrides as `forge train`, plus `launch.*` ones. They compose the primary config
`launch_job` (registered here, not a YAML file): the trainer's `config` tree plus the group `launch`
(`configs/launch/default.yaml` over the `LaunchConfig` schema). The `launch` node is then split off and the
rest validated exactly as the trainer validates it, with WORLD_SIZE set to `nodes * gpus_per_node`, so
`parallel.dp_shard=-1` resolves as it will in the job. The trainer's own schema knows nothing of `launch`.

On a CPU-only machine (trainer.device=cpu) `gpus_per_node` means processes per node (gloo).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Optional

from forge_lm.trainer.config import Config, ConfigError

PRIMARY = "launch_job"

# sbatch --time: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")


@dataclass
class LaunchConfig:
    """Where a run goes: its nodes and devices, the SLURM request, and the planner's assumptions."""

    nodes: int = 1
    """Nodes (machines). One SLURM task per node starts `torchrun` there."""
    gpus_per_node: int = 1
    """Training processes per node: one per GPU. With trainer.device=cpu: CPU processes per node (gloo), and
    no GPUs are requested from SLURM. nodes * gpus_per_node must equal the parallel layout's world size."""

    # ---- SLURM request ----
    partition: Optional[str] = None
    """SLURM partition (sbatch --partition); None: the cluster's default partition."""
    time: Optional[str] = None
    """Time limit (sbatch --time: minutes, HH:MM:SS or D-HH:MM:SS); None: the partition's default."""
    account: Optional[str] = None
    """sbatch --account; None: your default account."""
    qos: Optional[str] = None
    """sbatch --qos; None: the default QOS."""
    job_name: Optional[str] = None
    """sbatch --job-name; None: the run's `name`."""
    cpus_per_task: Optional[int] = None
    """CPUs for each node's task (torchrun and all its processes); None: the partition's default."""
    mem: Optional[str] = None
    """Memory per node (sbatch --mem, e.g. '400G'; '0' means all of it); None: the partition's default."""
    exclusive: bool = False
    """Ask for whole nodes (sbatch --exclusive)."""
    signal_seconds: int = 300
    """SLURM sends the batch script SIGUSR1 this many seconds before the time limit (--signal=B:USR1@N, which
    may come up to a minute early). The trainer then finishes its step, checkpoints and the job requeues
    itself; leave enough for one step plus a checkpoint save."""
    max_restarts: int = 20
    """Requeue the job at most this many times (SLURM_RESTART_COUNT); after that a stop ends it for good."""
    extra_sbatch_args: list[str] = field(default_factory=list)
    """More `#SBATCH` options, verbatim, e.g. ['--constraint=h100', '--reservation=big'] (see `man sbatch`)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run in the batch script before training (e.g. 'module load cuda/12.4',
    'source /path/venv/bin/activate')."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables for the job; they override the script's defaults (NCCL_*, OMP_NUM_THREADS...).
    Add one on the command line with `+launch.env.NCCL_DEBUG=INFO` (Hydra's `+` adds a key to a dict)."""
    python: Optional[str] = None
    """Python interpreter the job runs; None: the one running `forge_lm.launch.slurm` (the same environment)."""
    log_dir: Optional[str] = None
    """Where the batch script and per-job logs go; None: <run_dir>/slurm."""
    dry_run: bool = False
    """Print the batch script (and save it) without submitting it."""

    # ---- multi-node torchrun without SLURM ----
    rdzv_endpoint: Optional[str] = None
    """`forge_lm.launch.torchrun` with nodes > 1: host:port of the rendezvous (the first node); run the same command on
    every node."""

    # ---- planner (`forge plan`) ----
    gpu: str = "h100"
    """Device the planner assumes: one of launch.plan.GPUS (h100, h200, a100, b200, mi300x, ...)."""
    gpu_memory_gib: Optional[float] = None
    """Device memory the planner assumes, in GiB; None: the device's from the table."""
    memory_fraction: float = 0.9
    """Fraction of device memory a plan may fill; the rest is left for the CUDA context, NCCL and fragmentation."""
    assumed_mfu: float = 0.4
    """Model FLOPs utilisation the planner assumes to turn FLOPs into step time (0.3-0.5 is typical for dense
    models on H100 in bf16)."""

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node"):
            if getattr(self, name) < 1:
                raise ConfigError(f"launch.{name}={getattr(self, name)} must be >= 1.")
        if self.time is not None and not _TIME.match(str(self.time)):
            raise ConfigError(
                f"launch.time={self.time!r} is not a SLURM time limit: use minutes ('90'), 'HH:MM:SS' or "
                "'D-HH:MM:SS' (quote it on the command line: launch.time='\"02:00:00\"')."
            )
        if self.signal_seconds < 0 or self.max_restarts < 0:
            raise ConfigError(
                f"launch.signal_seconds={self.signal_seconds} and launch.max_restarts={self.max_restarts} must be >= 0."
            )
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise ConfigError(f"launch.cpus_per_task={self.cpus_per_task} must be >= 1 (or null).")
        if not 0.0 < self.assumed_mfu <= 1.0:
            raise ConfigError(f"launch.assumed_mfu={self.assumed_mfu} must be in (0, 1], e.g. 0.4.")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ConfigError(f"launch.memory_fraction={self.memory_fraction} must be in (0, 1], e.g. 0.9.")
        if self.gpu_memory_gib is not None and self.gpu_memory_gib <= 0:
            raise ConfigError(f"launch.gpu_memory_gib={self.gpu_memory_gib} must be positive (or null).")
        from forge_lm.launch.plan import GPUS  # the table lives with the planner

        if self.gpu.lower() not in GPUS:
            raise ConfigError(f"launch.gpu={self.gpu!r} is not known: choose one of {', '.join(GPUS)}.")
        self.gpu = self.gpu.lower()
        if self.rdzv_endpoint is not None and not re.match(r"^[^:\s]+:\d+$", self.rdzv_endpoint):
            raise ConfigError(
                f"launch.rdzv_endpoint={self.rdzv_endpoint!r}: use host:port, e.g. node001:29500."
            )
        for arg in self.extra_sbatch_args:
            if not str(arg).startswith("-"):
                raise ConfigError(
                    f"launch.extra_sbatch_args has {arg!r}: give sbatch options as they follow '#SBATCH', e.g. "
                    "'--constraint=h100'."
                )

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


def register() -> None:
    """Register the trainer's schema, the `launch` group's schema and the launch tools' primary config."""
    from hydra.core.config_store import ConfigStore

    from forge_lm.trainer.config_store import register as register_trainer

    register_trainer()
    cs = ConfigStore.instance()
    cs.store(group="launch", name="base_launch", node=LaunchConfig)
    cs.store(name=PRIMARY, node={"defaults": [{"launch": "default"}, "_self_"]})


@contextlib.contextmanager
def _world_size(n: int) -> Iterator[None]:
    old = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(n)
    try:
        yield
    finally:
        if old is None:
            del os.environ["WORLD_SIZE"]
        else:
            os.environ["WORLD_SIZE"] = old


def is_launch_override(override: str) -> bool:
    key = override.lstrip("+~").split("=", 1)[0]
    return key == "launch" or key.startswith("launch.")


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """(training overrides, launch overrides): `launch.*` and `launch=<preset>` go to the launch tools."""
    launch = [o for o in overrides if is_launch_override(o)]
    return [o for o in overrides if not is_launch_override(o)], launch


def compose(overrides: Sequence[str]) -> tuple[Config, LaunchConfig]:
    """Compose and validate: the run's Config (exactly as `forge_lm.trainer.train` will see it) and the LaunchConfig.

    The training config is composed from the trainer's own primary config with the non-launch overrides;
    the launch config from `launch_job` with the launch ones. Raises ConfigError naming the field and the
    fix, also when the parallel layout does not use exactly nodes * gpus_per_node processes.
    """
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from forge_lm.trainer.config_store import compose as compose_tree
    from forge_lm.trainer.config_store import config_dir_as_override, to_config

    register()
    train_overrides, launch_overrides = split_overrides(config_dir_as_override(overrides))
    # A user's config folder may hold launch presets as well as experiments: both compositions search it.
    search = [o for o in train_overrides if o.startswith("hydra.searchpath=")]
    try:
        launch = OmegaConf.to_object(compose_tree(search + launch_overrides, PRIMARY).launch)
        dcfg = compose_tree(train_overrides)
    except ConfigError:
        raise
    except (HydraException, OmegaConfBaseException) as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, ConfigError):
            raise ConfigError(str(cause)) from cause
        raise ConfigError(" ".join(str(e).strip().split("\n")[:2])) from e
    assert isinstance(launch, LaunchConfig)
    with _world_size(launch.world_size):
        cfg = to_config(dcfg)
    if cfg.parallel.world_size != launch.world_size:
        p = cfg.parallel
        raise ConfigError(
            f"launch.nodes={launch.nodes} x launch.gpus_per_node={launch.gpus_per_node} = {launch.world_size} "
            f"processes, but the parallel layout dp_replicate={p.dp_replicate} x dp_shard={p.dp_shard} x tp={p.tp} "
            f"x pp={p.pp} = {p.world_size}: make them equal (parallel.dp_shard=-1 takes what the others leave)."
        )
    return cfg, launch
