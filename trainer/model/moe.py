"""Mixture of experts: a top-k softmax router over experts whose weights are stored as 3-D tensors.

    probs = softmax(router(x))                  one distribution over the experts per token
    weights, experts = top_k(probs)             (renormalised to sum to 1 when cfg.moe.renormalize)
    y = sum_j weights_j * expert_j(x)           each expert a gated MLP, like the dense one

Dispatch has no Python loop over experts: the (token, choice) pairs are sorted by expert, and the experts
run as one grouped matmul (torch._grouped_mm, on CUDA in bf16) or, elsewhere, as one batched matmul over
a [num_experts, capacity, d] buffer whose capacity is the largest group (zero padding, no token dropped).
Outputs are scattered back with index_add. `benchmark_dispatch()` below times this against a per-expert loop.

Each MoE layer keeps a few statistics of its last forward (RouterStats); `moe_aux_losses(model)` turns
them into the load-balancing loss (exactly transformers' load_balancing_loss_func, pooled over layers)
and the router z-loss. Decoder.aux_loss() weights and sums them for the training loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from forge_lm.trainer.model.config import ModelConfig, MoEConfig
from forge_lm.trainer.model.layers import ACTIVATIONS


@dataclass
class RouterStats:
    """What the auxiliary losses need from one layer's routing, summed over its tokens.

    Sums, so the statistics of several layers (or several pipeline stages) add up to those of all of them.
    """

    expert_counts: torch.Tensor
    """[E] how many of the tokens' top-k slots went to each expert (no gradient)."""
    prob_sums: torch.Tensor
    """[E] router probability mass per expert, fp32 (differentiable)."""
    z_sum: torch.Tensor
    """sum over tokens of logsumexp(router logits)^2, fp32 (differentiable)."""
    tokens: int | torch.Tensor
    """Tokens routed (summed over layers): an int, or a 0-dim tensor once packed for a pipeline stage."""

    def __add__(self, other: RouterStats) -> RouterStats:
        return RouterStats(
            self.expert_counts + other.expert_counts,
            self.prob_sums + other.prob_sums,
            self.z_sum + other.z_sum,
            self.tokens + other.tokens,
        )

    def pack(self) -> torch.Tensor:
        """One fp32 tensor [2E + 2] (counts, probability sums, z sum, tokens), as pipeline stages pass it on
        with their activations; gradients flow back through the differentiable entries."""
        tokens = torch.as_tensor(self.tokens, dtype=torch.float32, device=self.prob_sums.device)
        return torch.cat([self.expert_counts.float(), self.prob_sums.float(), self.z_sum.float()[None], tokens[None]])

    @staticmethod
    def unpack(packed: torch.Tensor) -> RouterStats:
        E = (packed.shape[0] - 2) // 2
        return RouterStats(packed[:E].detach(), packed[E : 2 * E], packed[2 * E], packed[2 * E + 1].detach())


class GroupedExperts(nn.Module):
    """num_experts gated MLPs, each weight stored as one [E, out, in] parameter (an nn.Linear weight per expert)."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, activation: str = "silu") -> None:
        super().__init__()
        self.act = ACTIVATIONS[activation]
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))  # gate
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))  # up
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))  # down

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, d]; experts, weights [N, k] -> [N, d], the weighted sum of each token's k experts."""
        N, k = experts.shape
        flat = experts.reshape(-1)
        order = flat.argsort(stable=True)  # the N*k (token, choice) slots, grouped by expert
        token = order // k
        counts = torch.bincount(flat, minlength=self.w1.shape[0])
        xs = x[token]  # [N*k, d], expert 0's rows first
        ys = self.run_experts(xs, counts)
        ys = ys * weights.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, token, ys.to(x.dtype))

    def run_experts(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs [rows, d] sorted by expert, counts[e] rows for expert e -> each row through its expert.

        Expert parallelism replaces this per instance (trainer/parallel/moe_parallel.py): it sends the rows to
        the ranks holding their experts, calls `compute` there and sends the results back."""
        return self.compute(xs, counts, self.weights())

    def compute(
        self, xs: torch.Tensor, counts: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """Rows sorted by expert through the experts whose (w1, w3, w2) are `weights` (all, or one rank's)."""
        if _grouped_mm_available(xs):
            return self._grouped(xs, counts, weights)
        return self._padded(xs, counts, weights)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """w1, w3, w2 as plain tensors. Under tensor parallelism (trainer/parallel/moe_parallel.py) they are
        DTensors split along the hidden dimension: each rank multiplies by its own slice (and its output is
        then a partial sum, which the parallel style adds up across the group). Under expert parallelism they
        are split along the experts: each rank's own experts."""
        return tuple(w.to_local() if isinstance(w, DTensor) else w for w in (self.w1, self.w3, self.w2))

    def _grouped(self, xs: torch.Tensor, counts: torch.Tensor, weights) -> torch.Tensor:
        offsets = counts.cumsum(0).to(torch.int32)  # end row of each expert's group
        w1, w3, w2 = weights

        def mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return torch._grouped_mm(a, w.transpose(-2, -1), offs=offsets)

        return mm(self.act(mm(xs, w1)) * mm(xs, w3), w2)

    def _padded(self, xs: torch.Tensor, counts: torch.Tensor, weights) -> torch.Tensor:
        E = counts.numel()
        # Eagerly, the largest group (one host sync); nothing is dropped. Under torch.compile a data-dependent
        # size would break the graph, so the static bound is used: all rows in one group.
        capacity = xs.shape[0] if torch.compiler.is_compiling() else int(counts.max())
        expert = torch.repeat_interleave(torch.arange(E, device=xs.device), counts)
        slot = torch.arange(xs.shape[0], device=xs.device) - (counts.cumsum(0) - counts)[expert]
        buf = xs.new_zeros(E, capacity, xs.shape[1])
        buf[expert, slot] = xs
        # Padding rows are zero and stay zero (act(0) * 0 = 0); they are never read back.
        w1, w3, w2 = weights
        h = self.act(buf @ w1.transpose(1, 2)) * (buf @ w3.transpose(1, 2))
        return (h @ w2.transpose(1, 2))[expert, slot]


def _grouped_mm_available(x: torch.Tensor) -> bool:
    # torch._grouped_mm runs everywhere, but only its CUDA bf16 kernel is fast; the CPU fallback is slower
    # than the padded batched matmul in forward (see benchmark_dispatch and docs/architectures.md).
    return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")


class MoE(nn.Module):
    """Top-k softmax routing (Mixtral, Qwen3-MoE) over GroupedExperts.

    With `model.moe.balance=bias` the experts are chosen by probability + `expert_bias` (a buffer, saved in
    checkpoints, updated by `update_expert_biases` after each optimizer step) and mixed by probability.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k = cfg.moe.top_k
        self.renormalize = cfg.moe.renormalize
        self.router = nn.Linear(cfg.d_model, cfg.moe.num_experts, bias=False)
        self.experts = GroupedExperts(cfg.moe.num_experts, cfg.d_model, cfg.ffn_dim, cfg.activation)
        self.stats: Optional[RouterStats] = None
        self.step_counts: Optional[torch.Tensor] = None
        """[E] top-k slots per expert over the training forwards since the last optimizer step."""
        self.count_load = True
        """Whether training forwards add to step_counts (off for forwards that are not part of a step:
        `not_counting_load`)."""
        if cfg.moe.balance == "bias":
            self.register_buffer("expert_bias", torch.zeros(cfg.moe.num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x)  # [N, E]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        bias = getattr(self, "expert_bias", None)
        if bias is None:
            weights, experts = probs.topk(self.top_k, dim=-1)  # [N, k]
        else:  # the bias decides which experts, not how much of each
            experts = (probs + bias.float()).topk(self.top_k, dim=-1).indices
            weights = probs.gather(-1, experts)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        counts = torch.bincount(experts.reshape(-1), minlength=probs.shape[-1]).float()
        self.stats = RouterStats(
            expert_counts=counts,
            prob_sums=probs.sum(dim=0),
            z_sum=torch.logsumexp(logits.float(), dim=-1).pow(2).sum(),
            tokens=x.shape[0],
        )
        if self.training and self.count_load:
            self.step_counts = counts if self.step_counts is None else self.step_counts + counts
        return self.experts(x, experts, weights.to(x.dtype)).view(shape)

    def reset_parameters(self) -> None:
        if hasattr(self, "expert_bias"):
            self.expert_bias.zero_()


@contextlib.contextmanager
def not_counting_load(model: nn.Module) -> Iterator[None]:
    """Forwards inside do not count towards the experts' load of the step (e.g. the pipeline schedule's
    shape-probing forward, trainer/parallel/pipeline.py)."""
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    for m in layers:
        m.count_load = False
    try:
        yield
    finally:
        for m in layers:
            m.count_load = True


AUX_LOSSES = ("moe_load_balance", "moe_router_z")
"""The names of the auxiliary losses, as `moe_aux_losses` returns and the logs show them."""


def moe_aux_losses(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unweighted auxiliary losses of the last forward of every MoE layer in `model` ({} if none).

    moe_load_balance: E * sum_e f_e * P_e, where f_e is the fraction of top-k slots routed to expert e and P_e
        its mean router probability, both pooled over all MoE layers' tokens (Switch Transformer; identical
        to transformers' load_balancing_loss_func). 1 * top_k when perfectly balanced.
    moe_router_z: mean over tokens (and layers) of logsumexp(router logits)^2 (ST-MoE), keeps logits small.
    """
    stats = pooled_router_stats(model.modules())
    return {} if stats is None else aux_losses_of(stats)


def pooled_router_stats(modules: Iterable[nn.Module]) -> Optional[RouterStats]:
    """The sum of the last forward's RouterStats of the MoE layers among `modules` (None if there are none)."""
    stats = [m.stats for m in modules if isinstance(m, MoE) and m.stats is not None]
    return sum(stats[1:], stats[0]) if stats else None


def aux_losses_of(stats: RouterStats) -> dict[str, torch.Tensor]:
    """moe_aux_losses from statistics pooled over layers (see there)."""
    counts, probs, tokens = stats.expert_counts, stats.prob_sums, stats.tokens
    return {
        "moe_load_balance": counts.numel() * ((counts / tokens) * (probs / tokens)).sum(),
        "moe_router_z": stats.z_sum / tokens,
    }


def weighted_aux_loss(losses: dict[str, torch.Tensor], moe: MoEConfig) -> torch.Tensor | float:
    """What to add to the language-modelling loss: load_balance_coef * load-balancing loss + router_z_coef *
    z-loss (the load-balancing loss is left out with balance='bias', where the routing biases balance)."""
    if not losses:
        return 0.0
    balance = 0.0 if moe.balance == "bias" else moe.load_balance_coef
    return balance * losses["moe_load_balance"] + moe.router_z_coef * losses["moe_router_z"]


@torch.no_grad()
def update_expert_biases(model: nn.Module, rate: float, reduce=None) -> Optional[torch.Tensor]:
    """After an optimizer step: every MoE layer's load over the step (its training forwards, summed over the
    data-parallel ranks by `reduce`, a function that all-reduces a tensor in place); with balance='bias',
    each expert's bias moves by `rate` towards the mean load (up if it got fewer tokens, down if more).
    Returns the worst layer's max/mean expert load (1.0 is perfect balance) as a device tensor, or None for
    a dense model. Nothing waits for the device."""
    layers = [m for m in model.modules() if isinstance(m, MoE) and m.step_counts is not None]
    if not layers:
        return None
    counts = torch.stack([m.step_counts for m in layers])  # [layers, E], one all-reduce for all of them
    if reduce is not None:
        counts = reduce(counts)
    for layer, load in zip(layers, counts):
        layer.step_counts = None
        if hasattr(layer, "expert_bias"):
            layer.expert_bias += rate * torch.sign(load.mean() - load)
    return (counts.max(dim=1).values / counts.mean(dim=1).clamp_min(1e-9)).max()


def benchmark_dispatch(repeats: int = 5) -> None:
    """Time the dispatch against a per-expert Python loop (forward + backward) on this machine's CPU:
    python -c "from trainer.model.moe import benchmark_dispatch; benchmark_dispatch()"
    """
    import time

    torch.manual_seed(0)
    E, k, d, hidden, N = 8, 2, 512, 1408, 4096
    experts = GroupedExperts(E, d, hidden)
    for w in (experts.w1, experts.w2, experts.w3):
        nn.init.normal_(w, std=0.02)
    x = torch.randn(N, d, requires_grad=True)
    probs = torch.softmax(torch.randn(N, E), dim=-1)
    weights, chosen = probs.topk(k, dim=-1)

    def loop() -> torch.Tensor:  # what transformers' eager MoE does
        y = torch.zeros_like(x)
        for e in range(E):
            tok, j = torch.where(chosen == e)
            h = experts.act(x[tok] @ experts.w1[e].T) * (x[tok] @ experts.w3[e].T)
            y.index_add_(0, tok, (h @ experts.w2[e].T) * weights[tok, j, None])
        return y

    def grouped_cpu() -> torch.Tensor:  # torch._grouped_mm's CPU fallback, same sorting
        flat = chosen.reshape(-1)
        order = flat.argsort(stable=True)
        ys = experts._grouped(x[order // k], torch.bincount(flat, minlength=E), experts.weights())
        return torch.zeros_like(x).index_add(0, order // k, ys * weights.reshape(-1)[order, None])

    fns = {"sorted + padded bmm (ours, CPU)": lambda: experts(x, chosen, weights), "per-expert loop": loop}
    if hasattr(torch, "_grouped_mm"):
        fns["sorted + torch._grouped_mm"] = grouped_cpu
    ref = loop().detach()
    print(
        f"{N} tokens, {E} experts, top-{k}, d={d}, hidden={hidden}, fp32, {torch.get_num_threads()} threads"
    )
    for name, fn in fns.items():
        assert torch.allclose(fn().detach(), ref, atol=1e-5)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn().sum().backward()
            times.append(time.perf_counter() - t)
        print(
            f"  {name:34s} {1000 * sorted(times)[repeats // 2]:8.1f} ms  (median of {repeats}, forward + backward)"
        )
