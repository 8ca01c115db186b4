"""Fused gated activation act(gate) * up, forward and backward (reference: reference.gated_activation).

act is silu (SwiGLU) or the tanh approximation of gelu (GeGLU). Unfused, the forward writes act(gate) and
the product, and autograd keeps gate, act(gate) and up; here one pass reads gate and up and writes the
product, and the backward recomputes act(gate) from the saved gate instead of storing it.

Roundings follow the reference's separate ops: act(gate) is rounded to the activation dtype before the
product, and in the backward dL/d(act) = dy * up is rounded before the chain rule, so bf16 results match
the eager reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from forge_lm.trainer.kernels.triton_common import tanh

ACTIVATIONS = ("silu", "gelu_tanh")
BLOCK = 1024


@triton.jit
def _act(g, ACTIVATION: tl.constexpr):
    """silu, or gelu's tanh approximation 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))) with PyTorch's
    constants written out (a kernel can only read constexpr globals; 0.7978845608028654 = sqrt(2/pi))."""
    if ACTIVATION == "silu":
        a = g / (1.0 + tl.exp(-g))
    else:
        a = 0.5 * g * (1.0 + tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
    return a


@triton.jit
def _act_grad(g, ACTIVATION: tl.constexpr):
    """d act / d g."""
    if ACTIVATION == "silu":
        s = 1.0 / (1.0 + tl.exp(-g))
        d = s * (1.0 + g * (1.0 - s))
    else:
        th = tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))
        d = 0.5 * (1.0 + th) + 0.5 * g * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
    return d


@triton.jit
def _gated_fwd(GATE, UP, OUT, n, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    a = _act(g, ACTIVATION).to(GATE.dtype.element_ty).to(tl.float32)
    tl.store(OUT + offs, (a * u).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gated_bwd(DY, GATE, UP, DGATE, DUP, n, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    a = _act(g, ACTIVATION).to(GATE.dtype.element_ty).to(tl.float32)
    d_act = (dy * u).to(GATE.dtype.element_ty).to(tl.float32)
    tl.store(DUP + offs, (dy * a).to(DUP.dtype.element_ty), mask=mask)
    tl.store(DGATE + offs, (d_act * _act_grad(g, ACTIVATION)).to(DGATE.dtype.element_ty), mask=mask)


class _Gated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
        if gate.shape != up.shape:
            raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate, dtype=torch.promote_types(gate.dtype, up.dtype))
        n = gate.numel()
        if n:
            _gated_fwd[(triton.cdiv(n, BLOCK),)](gate, up, out, n, ACTIVATION=activation, BLOCK=BLOCK)
        ctx.save_for_backward(gate, up)
        ctx.activation = activation
        return out

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        if n:
            _gated_bwd[(triton.cdiv(n, BLOCK),)](
                dy, gate, up, dgate, dup, n, ACTIVATION=ctx.activation, BLOCK=BLOCK
            )
        return dgate, dup, None


def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """Triton act(gate) * up for activation 'silu' or 'gelu_tanh'; as reference.gated_activation."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: expected one of {', '.join(ACTIVATIONS)}")
    return _Gated.apply(gate, up, activation)
