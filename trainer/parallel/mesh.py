"""Process groups and the device mesh.

The mesh always has the four named dimensions ("pp", "dp_replicate", "dp_shard", "tp"), sized from
`parallel.*` (a dimension of size 1 costs nothing), so every piece of code can ask for the slice it
needs by name. A single-device run goes through the same code with no process group and a 1x1 mesh
stand-in (`ParallelDims.mesh is None`).
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from forge_lm.trainer.config import ConfigError, ParallelConfig
from forge_lm.trainer.parallel import collectives

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass
class ParallelDims:
    """Where this process sits in the layout."""

    cfg: ParallelConfig
    world_size: int
    rank: int
    local_rank: int
    mesh: Optional[DeviceMesh]
    _groups: dict = field(default_factory=dict, repr=False)

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    def _coord(self, dim: str) -> int:
        return 0 if self.mesh is None else self.mesh.get_local_rank(dim)

    @property
    def dp_size(self) -> int:
        return self.cfg.dp_replicate * self.cfg.dp_shard

    @property
    def dp_rank(self) -> int:
        """Rank among data-parallel replicas and shards together: which slice of each global batch to read."""
        return self._coord("dp_replicate") * self.cfg.dp_shard + self._coord("dp_shard")

    @property
    def pp_rank(self) -> int:
        return self._coord("pp")

    @property
    def tp_rank(self) -> int:
        return self._coord("tp")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def group(self, *dims: str) -> Optional[dist.ProcessGroup]:
        """The process group spanning `dims` (None when not distributed); built once, then reused."""
        if self.mesh is None:
            return None
        if dims not in self._groups:
            if len(dims) == 1:
                self._groups[dims] = self.mesh.get_group(dims[0])
            else:
                self._groups[dims] = self.mesh[dims]._flatten("_".join(dims)).get_group()
        return self._groups[dims]

    def sub_mesh(self, *dims: str) -> Optional[DeviceMesh]:
        if self.mesh is None:
            return None
        return self.mesh[dims[0]] if len(dims) == 1 else self.mesh[dims]


def world_from_env() -> tuple[int, int, int]:
    """(world_size, rank, local_rank) as set by torchrun / SLURM launchers; (1, 0, 0) otherwise."""
    return (
        int(os.environ.get("WORLD_SIZE", "1")),
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


def check_layout(cfg: ParallelConfig, world_size: int) -> None:
    """The layout must use exactly the processes started. Called before any process group exists."""
    if cfg.world_size != world_size:
        sizes = f"dp_replicate={cfg.dp_replicate} x dp_shard={cfg.dp_shard} x tp={cfg.tp} x pp={cfg.pp}"
        raise ConfigError(
            f"the parallel layout {sizes} = {cfg.world_size} does not match the {world_size} process(es) "
            f"started: make the product {world_size} (e.g. parallel.dp_shard=-1 takes what the others leave)."
        )


def init_parallel(cfg: ParallelConfig, device_type: str) -> ParallelDims:
    """Start the process group (when more than one process runs, or torchrun started this one) and build
    the mesh. Under torchrun a single process gets a process group too, so a one-GPU run sends its counts
    and losses through the same NCCL collectives as a cluster; only a plain `forge train` has none."""
    world_size, rank, local_rank = world_from_env()
    check_layout(cfg, world_size)
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    if world_size == 1 and not under_torchrun:
        return ParallelDims(cfg, 1, 0, 0, None)
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # On CUDA, NCCL for tensors on the GPU and gloo for the CPU-side ones (object broadcasts, stop
        # flags, barriers): trainer.parallel.collectives picks per call.
        backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    if world_size == 1:  # the process group serves the collectives; a 1x1 layout needs no mesh
        return ParallelDims(cfg, 1, 0, 0, None)
    sizes = (cfg.pp, cfg.dp_replicate, cfg.dp_shard, cfg.tp)
    mesh = init_device_mesh(device_type, sizes, mesh_dim_names=MESH_DIMS)
    return ParallelDims(cfg, world_size, rank, local_rank, mesh)


def shutdown() -> None:
    """Tear the process group down without the exit-time crash seen with gloo.

    Destroying the group while model/optimizer tensors still reference communication state
    occasionally aborts the process at exit: callers drop their references to the model, optimizers
    and losses first; collecting garbage and a barrier then make the teardown clean.
    """
    gc.collect()
    if dist.is_initialized():
        collectives.barrier()
        dist.destroy_process_group()
