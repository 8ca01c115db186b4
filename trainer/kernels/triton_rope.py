"""Fused rotary position embedding, forward and backward (reference: reference.apply_rotary).

Layouts: `half` pairs dimension i with i + rotary_dim/2 (Llama, Qwen, Gemma, OLMo); `interleaved` pairs
2i with 2i + 1 (GLM-4). Dimensions from rotary_dim to head_dim pass through unchanged (partial rotary).

One program handles one (batch, position) and a block of heads, so each cos/sin row is loaded once and
shared by all heads. x may be any strided [B, H, T, head_dim] view with a unit stride on head_dim (the
attention passes q.transpose(1, 2)); the output keeps x's layout, as the reference's elementwise ops do.

For a pair (x1, x2) with angles (c1, s1) and (c2, s2) (equal within a pair for real tables):
    forward   y1 = x1 c1 - x2 s1          y2 = x2 c2 + x1 s2
    backward dx1 = dy1 c1 + dy2 s2       dx2 = dy2 c2 - dy1 s1      (the transpose: a rotation back)
Each product and each sum is rounded to the output dtype, as the reference's separate bf16 ops round, so
bf16 results match the eager reference rather than a more precise but different value.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(
    X,
    COS,
    SIN,
    Y,
    sx_b,
    sx_h,
    sx_t,
    sy_b,
    sy_h,
    sy_t,
    sc_b,
    sc_t,
    ss_b,
    ss_t,
    T,
    H,
    HALF,
    PASS,
    INTERLEAVED: tl.constexpr,
    BACKWARD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    bt = tl.program_id(0).to(tl.int64)
    b = bt // T
    t = bt % T
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    pairs = tl.arange(0, BLOCK_HALF)
    head_mask = heads < H
    pair_mask = pairs < HALF
    if INTERLEAVED:
        d1 = 2 * pairs
        d2 = 2 * pairs + 1
    else:
        d1 = pairs
        d2 = pairs + HALF

    cos_row = COS + b * sc_b + t * sc_t
    sin_row = SIN + b * ss_b + t * ss_t
    c1 = tl.load(cos_row + d1, mask=pair_mask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_row + d2, mask=pair_mask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_row + d1, mask=pair_mask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_row + d2, mask=pair_mask, other=0.0).to(tl.float32)[None, :]

    x_rows = X + b * sx_b + t * sx_t + heads[:, None].to(tl.int64) * sx_h
    y_rows = Y + b * sy_b + t * sy_t + heads[:, None].to(tl.int64) * sy_h
    mask = head_mask[:, None] & pair_mask[None, :]
    x1 = tl.load(x_rows + d1[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_rows + d2[None, :], mask=mask, other=0.0).to(tl.float32)

    dtype = Y.dtype.element_ty
    if BACKWARD:
        y1 = (x1 * c1).to(dtype).to(tl.float32) + (x2 * s2).to(dtype).to(tl.float32)
        y2 = (x2 * c2).to(dtype).to(tl.float32) - (x1 * s1).to(dtype).to(tl.float32)
    else:
        y1 = (x1 * c1).to(dtype).to(tl.float32) - (x2 * s1).to(dtype).to(tl.float32)
        y2 = (x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)
    tl.store(y_rows + d1[None, :], y1.to(dtype), mask=mask)
    tl.store(y_rows + d2[None, :], y2.to(dtype), mask=mask)

    if BLOCK_PASS > 0:  # partial rotary: the dimensions after the rotated ones are copied as they are
        rest = tl.arange(0, BLOCK_PASS)
        rest_mask = head_mask[:, None] & (rest < PASS)[None, :]
        keep = tl.load(x_rows + 2 * HALF + rest[None, :], mask=rest_mask, other=0.0)
        tl.store(y_rows + 2 * HALF + rest[None, :], keep.to(dtype), mask=rest_mask)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, backward: bool):
    B, H, T, D = x.shape
    rotary_dim = cos.shape[-1]
    if rotary_dim % 2 or rotary_dim > D:
        raise ValueError(f"rotary_dim must be even and at most head_dim ({D}), got {rotary_dim}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    # Broadcast a batch of 1 the way the reference does; an expanded view has stride 0 and costs nothing.
    cos, sin = cos.expand(B, T, rotary_dim), sin.expand(B, T, rotary_dim)
    if cos.stride(-1) != 1:
        cos = cos.contiguous()
    if sin.stride(-1) != 1:
        sin = sin.contiguous()
    out_dtype = x.dtype if backward else torch.promote_types(x.dtype, cos.dtype)
    y = torch.empty_like(x, dtype=out_dtype)  # same strides as x (the reference's ops preserve them)
    if x.numel() == 0:
        return y
    block_h = min(triton.next_power_of_2(H), 16)
    passthrough = D - rotary_dim
    _rope_kernel[(B * T, triton.cdiv(H, block_h))](
        x, cos, sin, y,
        x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        T, H, rotary_dim // 2, passthrough,
        INTERLEAVED=interleaved, BACKWARD=backward, BLOCK_H=block_h,
        BLOCK_HALF=triton.next_power_of_2(max(rotary_dim // 2, 1)),
        BLOCK_PASS=triton.next_power_of_2(passthrough) if passthrough else 0,
        num_warps=4,
    )  # fmt: skip
    return y


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool
    ) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.interleaved = interleaved
        ctx.x_dtype = x.dtype
        return _rotate(x, cos, sin, interleaved, backward=False)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        cos, sin = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        # dy has the output's dtype (x's promoted with the tables'); x's gradient has x's.
        dx = _rotate(dy, cos, sin, ctx.interleaved, backward=True).to(ctx.x_dtype)
        return dx, None, None, None


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False
) -> torch.Tensor:
    """Triton RoPE of x [B, H, T, head_dim] with cos/sin [B, T, rotary_dim]; as reference.apply_rotary.

    cos and sin get no gradient (they are tables of positions, not parameters).
    """
    return _Rotary.apply(x, cos, sin, bool(interleaved))
