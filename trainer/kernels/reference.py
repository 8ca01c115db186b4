"""Plain PyTorch references of the fused kernels: exactly the model's math, op for op.

These are what runs on CPU, under torch.compile (Inductor fuses them) and on DTensors; the Triton kernels
are tested against them. Changing an op here changes the model's numerics (and its match with the
`transformers` reference implementations), so keep them as they are.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """x / rms(x) over the last dimension, times the gain `weight` (or `1 + weight` with unit_offset)."""
    # Normalise in float32 even when activations are bf16: the mean of squares is where precision is lost.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        # Gemma applies the gain in float32 and casts last; Llama casts first. Both orders are kept so
        # that bf16 results agree bit for bit with each family's reference.
        return (x32 * (1.0 + weight.float())).to(x.dtype)
    return weight * x32.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # pairs dimension i with i + d/2
    return torch.cat((-x2, x1), dim=-1)


def _rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., 0::2], x[..., 1::2]  # pairs dimension 2i with 2i + 1
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False
) -> torch.Tensor:
    """Rotate x [B, H, T, head_dim] by its positions; cos/sin [B, T, rotary_dim], rotary_dim <= head_dim."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    rotary_dim = cos.shape[-1]
    rotate = _rotate_interleaved if interleaved else _rotate_half
    if rotary_dim == x.shape[-1]:
        return x * cos + rotate(x) * sin
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((x_rot * cos + rotate(x_rot) * sin, x_pass), dim=-1)


# The same two functions as trainer.model.layers.ACTIVATIONS (which this package cannot import: the model
# imports the kernels).
ACTIVATIONS = {
    "silu": F.silu,  # SwiGLU
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GeGLU
}


def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up, the inner product of a gated MLP."""
    return ACTIVATIONS[activation](gate) * up


def _logits(hidden: torch.Tensor, weight: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Cross-entropy of softcap(hidden @ weight.T) against targets, per token (0 where ignored)."""
    logits = _logits(hidden, weight, softcap)
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")


@torch.no_grad()
def linear_log_probs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: Optional[float] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and whether the target is the argmax, per token."""
    logits = _logits(hidden, weight, softcap)
    logprobs = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    return logprobs, logits.argmax(-1) == targets
