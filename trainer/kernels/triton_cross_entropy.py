"""Fused linear + cross-entropy that never holds the full [N, vocab] logits (reference:
reference.linear_cross_entropy and reference.linear_log_probs).

The logits are produced one tile at a time, [row_chunk, vocab_chunk] (cuBLAS matmuls, in the same dtype
as the reference's F.linear), and a Triton kernel folds each tile into per-row running statistics:
    running max m and sum of exp(z - m) (the online logsumexp), the target's logit, and for evaluation
    the running argmax (first index on ties, as torch.argmax).
z is the float32 logit, soft-capped (cap * tanh(logit / cap)) when asked. Then loss = m + log(sum) - z_target,
and log p(target) = z_target - logsumexp.

Backward: the gradient w.r.t. the logits is dloss * (softmax - onehot) (times 1 - tanh^2 under a soft-cap),
which needs the logsumexp (saved, one float per row) and the logits, recomputed tile by tile; a second
kernel turns each recomputed tile into its gradient in place, and two matmuls take it to the gradients of
hidden (accumulated in float32 over vocab chunks) and of the weight (one block of rows of it per chunk).
This costs one more matmul than the unfused version (the recomputation) and saves the N x vocab logits
and their gradient: at N=8192, vocab=128256 that is 4 GiB of float32 each.

Under bf16 autocast (single-GPU runs) the matmuls follow autocast in the backward as in the forward
(custom_fwd / custom_bwd), so the recomputed logits are the ones the forward saw.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from forge_lm.trainer.kernels.triton_common import tanh

VOCAB_CHUNK = 8192  # vocabulary columns per logits tile
TILE_ELEMENTS = 2**26  # rows per tile = TILE_ELEMENTS // VOCAB_CHUNK (8192): a 128 MiB tile in bf16
BLOCK_V = 2048  # columns a program reads at a time within a tile


@triton.jit
def _ce_fwd_tile(
    LOGITS,
    stride_l,
    TARGETS,
    RUN_MAX,
    RUN_SUM,
    TARGET_LOGIT,
    BEST,
    BEST_IDX,
    vocab_start,
    n_cols,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    TRACK_ARGMAX: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Fold one tile of logits (rows of this tile x columns vocab_start ..) into the rows' running stats."""
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(TARGETS + row).to(tl.int64) - vocab_start  # the target's column in this tile, if any
    m = tl.load(RUN_MAX + row)
    s = tl.load(RUN_SUM + row)
    z_target = tl.load(TARGET_LOGIT + row)
    if TRACK_ARGMAX:
        best = tl.load(BEST + row)
        best_idx = tl.load(BEST_IDX + row)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        z = tl.load(LOGITS + row * stride_l + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = softcap * tanh(z / softcap)
        z = tl.where(mask, z, float("-inf"))
        block_max = tl.max(z, axis=0)
        m_new = tl.maximum(m, block_max)  # finite: every block has at least one real column
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        z_target += tl.sum(tl.where(cols == target, z, 0.0), axis=0)
        if TRACK_ARGMAX:
            # Strictly greater: an earlier block (or tile) keeps a tie, as torch.argmax keeps the first index.
            take = block_max > best
            best_idx = tl.where(take, vocab_start + start + tl.argmax(z, axis=0).to(tl.int64), best_idx)
            best = tl.where(take, block_max, best)
    tl.store(RUN_MAX + row, m)
    tl.store(RUN_SUM + row, s)
    tl.store(TARGET_LOGIT + row, z_target)
    if TRACK_ARGMAX:
        tl.store(BEST + row, best)
        tl.store(BEST_IDX + row, best_idx)


@triton.jit
def _ce_bwd_tile(
    LOGITS,
    stride_l,
    TARGETS,
    LSE,
    DLOSS,
    vocab_start,
    n_cols,
    softcap,
    ignore_index,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Overwrite one tile of logits with the gradient of the loss w.r.t. them."""
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(TARGETS + row).to(tl.int64)
    grad = tl.load(DLOSS + row)
    grad = tl.where(target == ignore_index, 0.0, grad)  # ignored tokens have no loss, hence no gradient
    target -= vocab_start
    lse = tl.load(LSE + row)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        ptrs = LOGITS + row * stride_l + cols
        z = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            capped = tanh(z / softcap)
            z = softcap * capped
        dz = grad * (tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0))
        if HAS_SOFTCAP:
            dz = dz * (1.0 - capped * capped)  # d/dx cap * tanh(x / cap)
        tl.store(ptrs, dz.to(LOGITS.dtype.element_ty), mask=mask)


def _spans(total: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, total)) for start in range(0, total, size)]


def _tile_shape(vocab_chunk: Optional[int], row_chunk: Optional[int]) -> tuple[int, int]:
    vocab_chunk = vocab_chunk or VOCAB_CHUNK
    return vocab_chunk, row_chunk or max(1, TILE_ELEMENTS // vocab_chunk)


def _statistics(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    softcap: Optional[float],
    track_argmax: bool,
    vocab_chunk: Optional[int],
    row_chunk: Optional[int],
    block_v: Optional[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: logsumexp of the logits, the target's logit, and (if asked) the argmax column."""
    N, V = hidden.shape[0], weight.shape[0]
    vocab_chunk, row_chunk = _tile_shape(vocab_chunk, row_chunk)
    block = block_v or min(BLOCK_V, triton.next_power_of_2(min(vocab_chunk, V)))
    f32 = dict(dtype=torch.float32, device=hidden.device)
    run_max = torch.full((N,), float("-inf"), **f32)
    run_sum = torch.zeros(N, **f32)
    target_logit = torch.zeros(N, **f32)
    best = torch.full((N,), float("-inf"), **f32)
    best_idx = torch.zeros(N, dtype=torch.int64, device=hidden.device)
    for r0, r1 in _spans(N, row_chunk):
        h = hidden[r0:r1]
        for v0, v1 in _spans(V, vocab_chunk):
            logits = h @ weight[v0:v1].T  # [rows, cols] in the matmul's dtype, like F.linear
            _ce_fwd_tile[(r1 - r0,)](
                logits, logits.stride(0), targets[r0:r1], run_max[r0:r1], run_sum[r0:r1],
                target_logit[r0:r1], best[r0:r1], best_idx[r0:r1], v0, v1 - v0,
                1.0 if softcap is None else float(softcap),
                HAS_SOFTCAP=softcap is not None, TRACK_ARGMAX=track_argmax, BLOCK_V=block, num_warps=8,
            )  # fmt: skip
            del logits  # free the tile before the next one is allocated
    return run_max + run_sum.log(), target_logit, best_idx


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden, weight, targets, softcap, ignore_index, vocab_chunk, row_chunk, block_v):
        lse, target_logit, _ = _statistics(
            hidden, weight, targets, softcap, False, vocab_chunk, row_chunk, block_v
        )
        loss = torch.where(targets == ignore_index, 0.0, lse - target_logit)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.options = (softcap, ignore_index, vocab_chunk, row_chunk, block_v)
        return loss

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dloss: torch.Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        softcap, ignore_index, vocab_chunk, row_chunk, block_v = ctx.options
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N, V = hidden.shape[0], weight.shape[0]
        vocab_chunk, row_chunk = _tile_shape(vocab_chunk, row_chunk)
        block = block_v or min(BLOCK_V, triton.next_power_of_2(min(vocab_chunk, V)))
        dloss = dloss.float().contiguous()  # e.g. loss.sum()'s gradient is an expanded (stride-0) view
        dh = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_dh else None
        dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if need_dw else None
        for i, (r0, r1) in enumerate(_spans(N, row_chunk)):
            h = hidden[r0:r1]
            for v0, v1 in _spans(V, vocab_chunk):
                w = weight[v0:v1]
                dz = h @ w.T  # the forward's logits again, then their gradient in place
                _ce_bwd_tile[(r1 - r0,)](
                    dz, dz.stride(0), targets[r0:r1], lse[r0:r1], dloss[r0:r1], v0, v1 - v0,
                    1.0 if softcap is None else float(softcap), ignore_index,
                    HAS_SOFTCAP=softcap is not None, BLOCK_V=block, num_warps=8,
                )  # fmt: skip
                if need_dh:
                    dh[r0:r1] += dz @ w  # float32 accumulation over the vocabulary chunks
                if need_dw:
                    part = dz.T @ h
                    if i == 0:
                        dw[v0:v1] = part
                    else:
                        dw[v0:v1] += part
                del dz
        return (dh.to(hidden.dtype) if need_dh else None), dw, None, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    *,
    vocab_chunk: Optional[int] = None,
    row_chunk: Optional[int] = None,
    block_v: Optional[int] = None,
) -> torch.Tensor:
    """Per-token cross-entropy [N] fp32 of softcap(hidden [N, d] @ weight [V, d].T) against targets [N].

    vocab_chunk / row_chunk: the logits tile (default VOCAB_CHUNK columns, TILE_ELEMENTS in all);
    block_v: columns per kernel step. Only tests and benchmarks need to set them.
    """
    targets = targets.contiguous()
    return _LinearCrossEntropy.apply(
        hidden, weight, targets, softcap, int(ignore_index), vocab_chunk, row_chunk, block_v
    )


@torch.no_grad()
def linear_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    softcap: Optional[float] = None,
    *,
    vocab_chunk: Optional[int] = None,
    row_chunk: Optional[int] = None,
    block_v: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) [N] fp32 and whether the target is the (first) argmax [N] bool, without the logits."""
    targets = targets.contiguous()
    lse, target_logit, best_idx = _statistics(
        hidden, weight, targets, softcap, True, vocab_chunk, row_chunk, block_v
    )
    return target_logit - lse, best_idx == targets
