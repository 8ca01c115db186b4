"""Every collective the framework itself issues, in one place, each on the device its group can move.

NCCL moves only CUDA tensors and gloo only CPU ones: a CPU tensor handed to an NCCL all-reduce fails with
"No backend type associated with device type cpu" on the first step of a multi-GPU run, and a CUDA tensor
handed to gloo fails the other way round. So every function here finds the device of the group's backend
and allocates (or copies) its tensors there. On CUDA the default group is "cpu:gloo,cuda:nccl"
(trainer.parallel.mesh), so CPU-side work (object broadcasts, barriers, stop flags) takes gloo and never
waits for the GPU, while tensors already on the GPU take NCCL.

Outside torch.distributed (a single process started without torchrun) every function is the identity: a
sum over one rank is the value itself. tests/unit/test_collectives.py fails if any other module of the
package calls a torch.distributed collective directly.

No collective waits longer than `parallel.collective_timeout_s` (`set_timeout`, applied to every group), so a
peer that hangs ends the run instead of holding the allocation. Where ranks legitimately wait longer for one
rank's solo work (rank 0 preparing the data, publishing a checkpoint, exporting at the end) they meet in
`wait_for_all` instead: through the rendezvous store, for as long as trainer.parallel.liveness sees every
peer alive.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterable
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.profiler import record_function

ProcessGroup = Optional[dist.ProcessGroup]

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}

_timeout: Optional[datetime.timedelta] = None
"""parallel.collective_timeout_s once `set_timeout` ran: groups made later get it too."""
_waits = 0
"""How many `wait_for_all` this process has passed (every rank counts the same: they name the store keys)."""


def active() -> bool:
    """Whether a process group exists (torchrun started this process, or a backend needed one)."""
    return dist.is_available() and dist.is_initialized()


def group_device(group: ProcessGroup = None, prefer_cuda: bool = True) -> torch.device:
    """The device this group's collectives run on: CUDA if the group has NCCL (and `prefer_cuda`), else CPU."""
    backend = str(dist.get_backend(group))
    if "nccl" in backend and (prefer_cuda or "gloo" not in backend):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(value: torch.Tensor, op: str = "sum", group: ProcessGroup = None) -> torch.Tensor:
    """Reduce `value` over the group, in place; returns it. A tensor on another device than the group's
    (e.g. a CPU count under NCCL) is reduced through a copy on the group's device and copied back."""
    if not active():
        return value
    device = group_device(group, prefer_cuda=value.device.type == "cuda")
    work = value if value.device == device else value.to(device)
    with record_function("forge/all_reduce"):  # a named range in profiler traces
        dist.all_reduce(work, op=_OPS[op], group=group)
    if work is not value:
        value.copy_(work)
    return value


def any_rank(flag: bool, group: ProcessGroup = None) -> bool:
    """True on every rank if it is True on any. CPU-side (gloo where the group has it): no GPU wait."""
    if not active():
        return flag
    device = group_device(group, prefer_cuda=False)
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    with record_function("forge/all_reduce"):  # a named range in profiler traces
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item() > 0)


def broadcast(value: torch.Tensor, src: int = 0, group: ProcessGroup = None) -> torch.Tensor:
    """Rank `src`'s `value` on every rank, in place (through the group's device when it differs)."""
    if not active():
        return value
    device = group_device(group, prefer_cuda=value.device.type == "cuda")
    work = value if value.device == device else value.to(device)
    with record_function("forge/broadcast"):  # a named range in profiler traces
        dist.broadcast(work, src=src, group=group)
    if work is not value:
        value.copy_(work)
    return value


def broadcast_object(obj: Any, src: int = 0, group: ProcessGroup = None) -> Any:
    """Rank `src`'s picklable `obj` on every rank (for small messages such as an error text)."""
    if not active():
        return obj
    box = [obj]
    with record_function("forge/broadcast_object_list"):  # a named range in profiler traces
        dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_object(obj: Any, group: ProcessGroup = None) -> list[Any]:
    """Every rank's picklable `obj`, in rank order, on every rank (small records such as statistics)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    with record_function("forge/all_gather_object"):  # a named range in profiler traces
        dist.all_gather_object(out, obj, group=group)
    return out


def barrier(group: ProcessGroup = None) -> None:
    if active():
        with record_function("forge/barrier"):  # a named range in profiler traces
            dist.barrier(group=group)


def send_tensor(value: torch.Tensor, dst: int, group: ProcessGroup = None) -> None:
    """Point-to-point: the shape (3 dims at most), then the float data, to global rank `dst`."""
    device = group_device(group, prefer_cuda=value.device.type == "cuda")
    shape = torch.zeros(3, dtype=torch.long)
    shape[: value.dim()] = torch.tensor(value.shape)
    with record_function("forge/send"):
        dist.send(shape.to(device), dst, group=group)
        dist.send(value.contiguous().float().to(device), dst, group=group)


def recv_tensor(src: int, device: torch.device, group: ProcessGroup = None) -> torch.Tensor:
    """The tensor `send_tensor` sent from global rank `src`, on `device`."""
    wire = group_device(group, prefer_cuda=device.type == "cuda")
    shape = torch.zeros(3, dtype=torch.long, device=wire)
    with record_function("forge/recv"):
        dist.recv(shape, src, group=group)
        dims = [int(n) for n in shape.tolist() if n > 0]
        value = torch.empty(dims, device=wire)
        dist.recv(value, src, group=group)
    return value.to(device)


def all_to_all(
    rows: torch.Tensor, send_counts: list[int], recv_counts: list[int], group: ProcessGroup = None
) -> torch.Tensor:
    """Rank i sends its next `send_counts[j]` rows to rank j and receives `recv_counts[j]` rows from rank j,
    in rank order (expert parallelism's token exchange, trainer/parallel/moe_parallel.py). Differentiable:
    the gradient travels the same way back, with the counts swapped."""
    if not active():
        return rows
    return _AllToAll.apply(rows, send_counts, recv_counts, group)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, send_counts, recv_counts, group):
        ctx.counts, ctx.group = (send_counts, recv_counts), group
        return _exchange(rows, send_counts, recv_counts, group)

    @staticmethod
    def backward(ctx, grad):
        send_counts, recv_counts = ctx.counts
        return _exchange(grad, recv_counts, send_counts, ctx.group), None, None, None


def _exchange(rows: torch.Tensor, send_counts: list[int], recv_counts: list[int], group: ProcessGroup) -> torch.Tensor:
    device = group_device(group, prefer_cuda=rows.device.type == "cuda")
    out = torch.empty((sum(recv_counts), *rows.shape[1:]), dtype=rows.dtype, device=device)
    with record_function("forge/all_to_all"):
        dist.all_to_all_single(out, rows.contiguous().to(device), recv_counts, send_counts, group=group)
    return out.to(rows.device)


def new_cpu_group() -> ProcessGroup:
    """A gloo group over all ranks, for work that must not share a queue with training collectives
    (background checkpoint writes would interleave with them and hang)."""
    return dist.new_group(backend="gloo", timeout=_timeout) if active() else None


def set_timeout(seconds: float, groups: Iterable[dist.ProcessGroup] = ()) -> None:
    """Bound every collective of the default group and of `groups` (and of groups made later through this
    module) by `seconds`. torch gives a group made without a timeout its backend's default (30 min for gloo,
    10 for NCCL), not the default group's, so every group is set explicitly."""
    global _timeout
    _timeout = datetime.timedelta(seconds=seconds)
    for group in (None, *groups):
        bound(group)


def bound(group: ProcessGroup) -> ProcessGroup:
    """Give `group` (None: the default group) the timeout of `set_timeout`; returns it."""
    if _timeout is not None and active():
        dist.distributed_c10d._set_pg_timeout(_timeout, group)
    return group


def wait_for_all(what: str = "") -> None:
    """A barrier without a time limit, through the rendezvous store: for the waits on one rank's solo work,
    which may last longer than the collective timeout. A peer that dies or stops meanwhile is noticed by the
    liveness watchdog (trainer.parallel.liveness), which ends the process; without it (no multi-rank group)
    there is nothing to wait for. `what` only names the wait for a reader of a stack dump."""
    global _waits
    if not active() or dist.get_world_size() < 2:
        return
    from forge_lm.trainer.parallel.liveness import forge_store

    store, world = forge_store(), dist.get_world_size()
    _waits += 1
    key = f"wait/{_waits}"
    with record_function("forge/wait_for_all"):
        if store.add(key, 1) == world:  # the last to arrive opens the gate
            store.set(f"{key}/open", what or "1")
        pause = 0.001
        # Polled: a store wait() that times out desynchronises the client.
        while not store.check([f"{key}/open"]):
            time.sleep(pause)
            pause = min(2 * pause, 0.5)
    if dist.get_rank() == 0 and _waits > 1:  # everyone has left the previous wait to arrive at this one
        for old in (f"wait/{_waits - 1}", f"wait/{_waits - 1}/open"):
            store.delete_key(old)
