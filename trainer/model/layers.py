"""The small building blocks of the decoder: RMSNorm, the SwiGLU MLP and rotary position embeddings.

Every numeric convention here follows Hugging Face's Llama implementation, so that Llama-family
weights load 1:1 (no permutation) and our logits match theirs to float32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned gain (no bias, no mean subtraction)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 even when activations are bf16: the mean of squares is where precision is lost.
        # Cast back before the gain, exactly as HF Llama does, so results agree bit for bit in any dtype.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class SwiGLU(nn.Module):
    """The gated MLP of Llama: w2(silu(w1 x) * w3 x). w1 is the gate, w3 the up projection, w2 the down."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# ---- rotary position embeddings -------------------------------------------------------------------------


def rope_frequencies(head_dim: int, theta: float, device: torch.device | str | None = None) -> torch.Tensor:
    """The inverse frequencies theta^(-2i/head_dim), i = 0 .. head_dim/2 - 1, in float32.

    Always float32: in bf16 the high frequencies would be rounded enough to scramble positions.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    return 1.0 / (theta**exponents)


def rope_cos_sin(
    inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency, each [B, T, head_dim], computed in fp32 and cast to `dtype`.

    The angles are duplicated (cat, not interleave) to match `rotate_half`'s split into two halves.
    """
    angles = position_ids[..., None].float() * inv_freq.float()  # [B, T, head_dim/2]
    angles = torch.cat((angles, angles), dim=-1)  # [B, T, head_dim]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    # Pairs dimension i with i + head_dim/2 (the "non-interleaved" layout that HF checkpoints use).
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys ([B, H, T, head_dim]) by their positions; cos/sin are [B, T, head_dim]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
