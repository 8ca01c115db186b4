"""Mixture-of-experts layers under tensor and expert parallelism.

Tensor parallelism: the router replicated, each expert's hidden size split across the tensor-parallel ranks
(the Megatron MLP split, applied to every expert at once).

    x (residual layout) --gather--> every token on every rank (an all-gather along the sequence with SP)
    router(x)           replicated weights: the same routing, statistics and auxiliary losses on every rank
    experts             w1, w3 [E, hidden/tp, d] and w2 [E, d, hidden/tp] on each rank: the same dispatch,
                        each rank's output a partial sum of every token's expert output
    output --sum over tp--> residual layout (an all-reduce, or a reduce-scatter along the sequence with SP)

Gradients: a rank's expert slices see only part of each expert's output, so the gradients they send back to
the experts' inputs (the tokens and their routing weights) are partial sums. `sum_gradients` adds them up
across the group, so the router and the residual stream get the complete gradient on every rank, and the
router (a replicated DTensor) needs no reduction of its own. The one module the model code knows this from is
GroupedExperts.weights(), which hands the grouped matmul each rank's local slice.

Expert parallelism (parallel.ep): whole experts split across the ep group (num_experts/ep each), borrowed from
the sharded data-parallel ranks (trainer/parallel/mesh.py). Every rank routes its own tokens, then

    counts  --all-to-all-->  how many rows each peer sends to each of my experts
    rows    --all-to-all-->  my experts' rows from every peer, regrouped by expert
    compute                  the grouped matmul over my experts only (dropless: every row is computed)
    results --all-to-all-->  back to the ranks the tokens came from, in the order they were sent

The router stays an ordinary FSDP-sharded parameter, so routing, statistics and auxiliary losses are those of
each rank's tokens, as in plain data parallelism. The experts are then FSDP-sharded over "expert_dp", the ranks
holding the same experts (trainer/parallel/parallelize.py). With tensor parallelism too, each rank holds the tp
slices of its experts and exchanges rows with the ep ranks of its own tp coordinate; what comes back is a
partial sum over tp, added up as above.
"""

from __future__ import annotations

import functools
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import (
    DTensor,
    Partial,
    Placement,
    Replicate,
    Shard,
    distribute_module,
    distribute_tensor,
)
from torch.distributed.tensor.parallel import PrepareModuleInputOutput
from torch.distributed.tensor.parallel.style import ParallelStyle

from forge_lm.trainer.model.moe import GroupedExperts, MoE
from forge_lm.trainer.parallel import collectives


def moe_tensor_parallel_plan(residual: Placement) -> dict[str, ParallelStyle]:
    """The plan for a block's `feed_forward` when it is an MoE layer; `residual` is the layout of the residual
    stream (Shard(1) with sequence parallelism, else Replicate())."""
    return {
        "feed_forward": PrepareModuleInputOutput(
            input_layouts=(residual,),
            desired_input_layouts=(Replicate(),),
            use_local_input=True,
            output_layouts=(Partial(),),
            desired_output_layouts=(residual,),
            use_local_output=True,
        ),
        "feed_forward.router": ReplicatedRouter(),
        "feed_forward.experts": ExpertHiddenParallel(),
    }


class ReplicatedRouter(ParallelStyle):
    """The router's weight as a replicated DTensor (so every parameter under tp is a DTensor, as the optimizers'
    foreach kernels and the gradient-norm groups want); it takes and returns plain tensors."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def replicated_input(_mod, inputs, mesh):
            return tuple(DTensor.from_local(t, mesh, [Replicate()], run_check=False) for t in inputs)

        def local_output(_mod, output, _mesh):
            return output.to_local()

        # No partition function: distribute_module replicates every parameter.
        return distribute_module(module, device_mesh, None, replicated_input, local_output)


class ExpertHiddenParallel(ParallelStyle):
    """GroupedExperts with w1/w3 split along their hidden rows (Shard(1) of [E, hidden, d]) and w2 along its
    hidden columns (Shard(2) of [E, d, hidden]); its output is left as this rank's partial sum."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def shard_hidden(_name, mod, mesh):
            for key, dim in (("w1", 1), ("w3", 1), ("w2", 2)):
                param = getattr(mod, key, None)
                if param is not None:
                    mod.register_parameter(key, nn.Parameter(distribute_tensor(param, mesh, [Shard(dim)])))

        def sum_input_gradients(_mod, inputs, mesh):
            x, experts, weights = inputs
            return sum_gradients(x, mesh), experts, sum_gradients(weights, mesh)

        return distribute_module(module, device_mesh, shard_hidden, sum_input_gradients)


def sum_gradients(t: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """`t` itself; in backward, its gradient summed over the mesh (each rank's is a partial sum)."""
    # A replicated DTensor whose local gradient is declared partial: DTensor's backward all-reduces it.
    return DTensor.from_local(t, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])


# ---- expert parallelism ----------------------------------------------------------------------------------------


def apply_expert_parallel(model: nn.Module, mesh: DeviceMesh) -> None:
    """Split the experts of every MoE layer of `model` across the "ep" dimension of `mesh` (in place; names
    unchanged). `mesh` is the ep mesh, or the (ep, tp) mesh when tensor parallelism has already split each
    expert's hidden size across tp."""
    for module in model.modules():
        if isinstance(module, MoE):
            ExpertParallel()._apply(module.experts, mesh)


class ExpertParallel(ParallelStyle):
    """GroupedExperts with w1, w3, w2 split along the experts (Shard(0) of [E, ., .]): each rank holds
    num_experts/ep whole experts (or, under tensor parallelism, their tp slices), and `run_experts` exchanges
    the rows with the other ranks of the ep group."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        assert isinstance(module, GroupedExperts)
        ep_mesh = device_mesh["ep"] if device_mesh.ndim > 1 else device_mesh
        for key in ("w1", "w3", "w2"):
            param = getattr(module, key)
            if isinstance(param, DTensor):  # split along the hidden size over tp already: add the expert split
                mine = param.to_local().chunk(ep_mesh.size(), dim=0)[ep_mesh.get_local_rank()]
                split = DTensor.from_local(mine, device_mesh, [Shard(0), *param.placements], run_check=False)
            else:
                split = distribute_tensor(param.data, device_mesh, [Shard(0)])
            module.register_parameter(key, nn.Parameter(split))
        # An instance attribute, as compile_loss_head does: the module's parameters keep their names.
        module.run_experts = functools.partial(run_experts_across, module, ep_mesh.get_group())
        return module


def run_experts_across(
    experts: GroupedExperts, group: dist.ProcessGroup, xs: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """GroupedExperts.run_experts under expert parallelism: xs [rows, d] sorted by (global) expert, counts [E]."""
    ep = dist.get_world_size(group)
    local = counts.numel() // ep
    # recv[s, e]: rows rank s sends to my expert e (row s of every rank's [ep, local] counts goes to rank s).
    recv = timed("all_to_all", lambda c: collectives.all_to_all(c, [1] * ep, [1] * ep, group), counts.view(ep, local))
    send_counts = counts.view(ep, local).sum(1).tolist()  # the sizes must be known on the host
    recv_counts = recv.sum(1).tolist()
    rows = timed("all_to_all", lambda x: collectives.all_to_all(x, send_counts, recv_counts, group), xs)
    # Rows arrive by source rank, then by expert: regroup them by expert (stable: within an expert, by source
    # rank) for the grouped matmul, and back after.
    expert_of_row = torch.repeat_interleave(torch.arange(local, device=xs.device).repeat(ep), recv.reshape(-1))
    order = expert_of_row.argsort(stable=True)
    # Each rank's loss is scaled by dp_size (Engine.train_step) and these experts' gradient gathers the rows of
    # all ep ranks, whose gradients FSDP then averages only over expert_dp: 1/ep makes it the mean of plain
    # data parallelism.
    weights = tuple(scale_gradient(w, 1.0 / ep) for w in experts.weights())
    ys = timed("grouped_gemm", lambda r: experts.compute(r, recv.sum(0), weights), rows[order])
    ys = ys[order.argsort()]
    return timed("all_to_all", lambda y: collectives.all_to_all(y, recv_counts, send_counts, group), ys)


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def scale_gradient(t: torch.Tensor, factor: float) -> torch.Tensor:
    """`t` itself; in backward, its gradient times `factor`."""
    return _ScaleGradient.apply(t, factor)


def timed(what: str, fn, x: torch.Tensor) -> torch.Tensor:
    """fn(x), its host seconds added to `dispatch_timer` under `what`, in forward and in backward (from the
    gradient reaching fn's output to the gradient leaving for x)."""
    clock: dict[str, float] = {}
    start = time.perf_counter()
    y = fn(_BackwardClock.apply(x, clock, what, False) if x.requires_grad else x)
    dispatch_timer.add(what, time.perf_counter() - start)
    return _BackwardClock.apply(y, clock, what, True) if y.requires_grad else y


class _BackwardClock(torch.autograd.Function):
    """The identity; in backward it starts (`start`) or stops the clock of a `timed` region."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, clock: dict, what: str, start: bool) -> torch.Tensor:
        ctx.clock, ctx.what, ctx.start = clock, what, start
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.start:
            ctx.clock["t0"] = time.perf_counter()
        elif "t0" in ctx.clock:
            dispatch_timer.add(ctx.what, time.perf_counter() - ctx.clock.pop("t0"))
        return grad, None, None, None


class DispatchTimer:
    """Host seconds spent in expert-parallel dispatch since the last `take`: the all-to-all exchanges and the
    grouped matmuls, forward and backward, as tools/bench_train reports them beside the step time. On the CPU
    the exchanges block, so host time is their time; on a GPU it is launch time unless the caller synchronises."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, what: str, seconds: float) -> None:
        self.seconds[what] = self.seconds.get(what, 0.0) + seconds

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {}
        return out


dispatch_timer = DispatchTimer()
