"""Fused kernels and their plain PyTorch references; which one runs is decided here, in one place.

Public functions (the model, the loss and the evaluation call only these):
    rms_norm(x, weight, eps, unit_offset=False) -> x / rms(x) * weight, or * (1 + weight) (Gemma)
    apply_rotary(x, cos, sin, interleaved=False) -> RoPE of x [B, H, T, head_dim], cos/sin [B, T, rotary_dim]
        (half or interleaved pairs; dimensions past rotary_dim pass through)
    gated_activation(gate, up, activation) -> act(gate) * up; activation 'silu' (SwiGLU) or 'gelu_tanh'
        (GeGLU)
    linear_cross_entropy(hidden, weight, targets, softcap=None, ignore_index=-100) -> per-token loss [N] fp32
        (0 where ignored), without materialising the [N, vocab] logits on the fused path
    linear_log_probs(hidden, weight, targets, softcap=None) -> (log p(target) [N] fp32, is-argmax [N] bool)

All are differentiable (linear_log_probs is evaluation only, no grad). Each call goes to the Triton kernel
(trainer/kernels/triton_*.py) or to the reference (trainer/kernels/reference.py, exactly the model's math)
by the rule in trainer/kernels/dispatch.py: Triton for plain CUDA tensors when `triton` imports and we are
not inside torch.compile, else the reference; FORGE_KERNELS=auto|triton|reference overrides it. So CPU runs,
compiled blocks (Inductor fuses the reference) and DTensors (tensor parallelism) run the reference; FSDP2
alone keeps the kernels, as it hands forward plain unsharded parameters. The Triton modules are imported on
first use only, so a CPU run never imports triton. See docs/kernels.md.
"""

from __future__ import annotations

from typing import Optional

import torch

from forge_lm.trainer.kernels import reference
from forge_lm.trainer.kernels.dispatch import use_triton

__all__ = [
    "apply_rotary",
    "gated_activation",
    "linear_cross_entropy",
    "linear_log_probs",
    "rms_norm",
    "use_triton",
]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """RMSNorm over the last dimension: gain `weight` (Llama: x_hat cast to x's dtype first) or
    `1 + weight` applied in fp32, then cast (Gemma, unit_offset=True)."""
    if use_triton(x, weight):
        from forge_lm.trainer.kernels.triton_rms_norm import rms_norm as fused

        return fused(x, weight, eps, unit_offset)
    return reference.rms_norm(x, weight, eps, unit_offset)


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False
) -> torch.Tensor:
    """Rotate x [B, H, T, head_dim] by cos/sin [B, T, rotary_dim]; no gradient flows to cos/sin."""
    if use_triton(x, cos, sin):
        from forge_lm.trainer.kernels.triton_rope import apply_rotary as fused

        return fused(x, cos, sin, interleaved)
    return reference.apply_rotary(x, cos, sin, interleaved)


def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up for activation 'silu' or 'gelu_tanh' (gate and up of one shape)."""
    if use_triton(gate, up):
        from forge_lm.trainer.kernels.triton_gated import gated_activation as fused

        return fused(gate, up, activation)
    return reference.gated_activation(gate, up, activation)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Cross-entropy of softcap(hidden @ weight.T) against targets, per token (0 where ignored)."""
    if use_triton(hidden, weight, targets):
        from forge_lm.trainer.kernels.triton_cross_entropy import linear_cross_entropy as fused

        return fused(hidden, weight, targets, softcap, ignore_index)
    return reference.linear_cross_entropy(hidden, weight, targets, softcap, ignore_index)


@torch.no_grad()
def linear_log_probs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: Optional[float] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and whether the target is the argmax, per token."""
    if use_triton(hidden, weight, targets):
        from forge_lm.trainer.kernels.triton_cross_entropy import linear_log_probs as fused

        return fused(hidden, weight, targets, softcap)
    return reference.linear_log_probs(hidden, weight, targets, softcap)
