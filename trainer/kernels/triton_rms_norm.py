"""Fused RMSNorm, forward and backward, in both gain conventions (reference: reference.rms_norm).

Forward: one program per row holds the whole row, so x is read once and y written once; the row's
1 / rms is kept (one float per row) for the backward instead of re-reducing.
Backward: a few persistent programs per SM walk over rows; each writes dx for its rows and accumulates its
share of dw in float32, and the shares are summed at the end (no atomics, deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from forge_lm.trainer.kernels.triton_common import num_programs, rows_2d, warps_for

MAX_DIM = 65536  # a row lives in one program's registers


@triton.jit
def _rms_norm_fwd(
    X,
    W,
    Y,
    RSTD,
    stride_x,
    stride_y,
    D,
    eps,
    UNIT_OFFSET: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    x_hat = x * rstd
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if UNIT_OFFSET:
        y = x_hat * (1.0 + w)  # Gemma: gain in float32, one rounding at the store
    else:
        # Llama: x_hat is rounded to the input dtype first, then multiplied by the gain (as the model does).
        y = x_hat.to(X.dtype.element_ty).to(tl.float32) * w
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd(
    DY,
    X,
    W,
    RSTD,
    DX,
    DW_PARTS,
    stride_dy,
    stride_x,
    stride_dx,
    N,
    D,
    rows_per_program,
    UNIT_OFFSET: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if UNIT_OFFSET:
        gain = 1.0 + w
    else:
        gain = w
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    first = pid * rows_per_program
    for i in range(0, rows_per_program):
        row = (first + i).to(tl.int64)
        if row < N:
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            x_hat = x * rstd
            if UNIT_OFFSET:
                dw += dy * x_hat
            else:
                dw += dy * x_hat.to(X.dtype.element_ty).to(tl.float32)  # the gain saw the rounded x_hat
            g = dy * gain  # gradient w.r.t. x_hat
            # d/dx of x * rsqrt(mean(x^2) + eps): rstd * (g - x_hat * mean(g * x_hat))
            dx = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=0) / D))
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTS + pid * D + cols, dw, mask=mask)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool) -> torch.Tensor:
        D = x.shape[-1]
        if D > MAX_DIM:
            raise ValueError(f"fused RMSNorm handles rows of at most {MAX_DIM} elements, got {D}")
        x2 = rows_2d(x)
        N = x2.shape[0]
        # The reference's output dtype: x's for Gemma's order, x's promoted with the gain's for Llama's.
        out_dtype = x.dtype if unit_offset else torch.promote_types(weight.dtype, x.dtype)
        y = torch.empty((N, D), dtype=out_dtype, device=x.device)
        rstd = torch.empty(N, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(D)
        if N > 0:
            _rms_norm_fwd[(N,)](
                x2, weight, y, rstd, x2.stride(0), y.stride(0), D, eps,
                UNIT_OFFSET=unit_offset, BLOCK_D=block, num_warps=warps_for(block),
            )  # fmt: skip
        ctx.save_for_backward(x2, weight, rstd)
        ctx.unit_offset = unit_offset
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        N, D = x2.shape
        dy2 = rows_2d(dy)
        dx = torch.empty((N, D), dtype=x2.dtype, device=x2.device)
        programs = num_programs(x2.device, N)
        dw_parts = torch.zeros((programs, D), dtype=torch.float32, device=x2.device)
        block = triton.next_power_of_2(D)
        if N > 0:
            _rms_norm_bwd[(programs,)](
                dy2, x2, weight, rstd, dx, dw_parts, dy2.stride(0), x2.stride(0), dx.stride(0),
                N, D, triton.cdiv(N, programs),
                UNIT_OFFSET=ctx.unit_offset, BLOCK_D=block, num_warps=warps_for(block),
            )  # fmt: skip
        dw = dw_parts.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(ctx.x_shape) if ctx.needs_input_grad[0] else None, dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """Triton RMSNorm over the last dimension; same contract as reference.rms_norm."""
    return _RMSNorm.apply(x, weight, float(eps), bool(unit_offset))
