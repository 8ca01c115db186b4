"""Process groups and the device mesh.

The mesh always has the four named dimensions ("pp", "dp_replicate", "dp_shard", "tp"), sized from
`parallel.*` (a dimension of size 1 costs nothing), so every piece of code can ask for the slice it
needs by name. With expert parallelism (parallel.ep > 1) dp_shard is split into ("expert_dp", "ep") and
"dp_shard" names their flattened product. A single-device run goes through the same code with no process group and a 1x1 mesh
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
from forge_lm.trainer.parallel import collectives, liveness

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")
EP_MESH_DIMS = ("pp", "dp_replicate", "expert_dp", "ep", "tp")
"""With parallel.ep > 1; "dp_shard" is then the flattened (expert_dp, ep)."""


@dataclass
class ParallelDims:
    """Where this process sits in the layout."""

    cfg: ParallelConfig
    world_size: int
    rank: int
    local_rank: int
    mesh: Optional[DeviceMesh]
    dp_shard_mesh: Optional[DeviceMesh] = None
    """With expert parallelism: "dp_shard", the flattened (expert_dp, ep), kept here (torch deprecates slicing
    a flattened dimension from the root mesh)."""
    _groups: dict = field(default_factory=dict, repr=False)

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    def _coord(self, dim: str) -> int:
        return 0 if self.mesh is None else self.sub_mesh(dim).get_local_rank()

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
            mesh = self.sub_mesh(*dims)
            if mesh.ndim == 1:
                self._groups[dims] = mesh.get_group()
            else:
                flat = mesh._flatten("_".join(dims)).get_group()
                self._groups[dims] = collectives.bound(flat)  # a new group: it needs the timeout too
        return self._groups[dims]

    def sub_mesh(self, *dims: str) -> Optional[DeviceMesh]:
        if self.mesh is None:
            return None
        if self.dp_shard_mesh is not None and "dp_shard" in dims:
            # Expert parallelism runs with dp_replicate = 1 (ParallelConfig): the other dimensions add nothing.
            assert all(self.mesh[d].size() == 1 for d in dims if d != "dp_shard"), dims
            return self.dp_shard_mesh
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
    and losses through the same NCCL collectives as a cluster; only a plain `forge train` has none.

    Every collective of every group waits at most `cfg.collective_timeout_s`, and with several processes the
    liveness watchdog starts here: a peer that dies or goes silent ends this process within that bound."""
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
        # The timeout also bounds the rendezvous itself: a rank that never arrives ends the others.
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=cfg.collective_timeout_s))
    if world_size == 1:  # the process group serves the collectives; a 1x1 layout needs no mesh
        return ParallelDims(cfg, 1, 0, 0, None)
    liveness.start(rank, world_size, cfg.collective_timeout_s)
    if cfg.ep > 1:
        # Expert parallelism borrows its ranks from dp_shard: dp_shard = expert_dp x ep. Each ep group holds all
        # the experts between them; expert_dp links the ranks holding the same experts (their FSDP group).
        sizes = (cfg.pp, cfg.dp_replicate, cfg.dp_shard // cfg.ep, cfg.ep, cfg.tp)
        mesh = init_device_mesh(device_type, sizes, mesh_dim_names=EP_MESH_DIMS)
        flat = mesh[("expert_dp", "ep")]._flatten("dp_shard")  # dense parameters still shard over all of it
        collectives.set_timeout(cfg.collective_timeout_s, [*mesh.get_all_groups(), flat.get_group()])
        return ParallelDims(cfg, world_size, rank, local_rank, mesh, dp_shard_mesh=flat)
    sizes = (cfg.pp, cfg.dp_replicate, cfg.dp_shard, cfg.tp)
    mesh = init_device_mesh(device_type, sizes, mesh_dim_names=MESH_DIMS)
    collectives.set_timeout(cfg.collective_timeout_s, mesh.get_all_groups())
    return ParallelDims(cfg, world_size, rank, local_rank, mesh)


def shutdown() -> None:
    """Tear the process group down without the exit-time crash seen with gloo.

    Destroying the group while model/optimizer tensors still reference communication state
    occasionally aborts the process at exit: callers drop their references to the model, optimizers
    and losses first; collecting garbage and a barrier then make the teardown clean. The other ranks
    wait for rank 0's end-of-run work (export, samples) through the store first: it may take longer
    than the collective timeout.
    """
    gc.collect()
    if dist.is_initialized():
        collectives.wait_for_all("the end of the run")
        collectives.barrier()
        liveness.stop()
        dist.destroy_process_group()
