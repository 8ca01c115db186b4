"""The small building blocks of the decoder: RMSNorm and the gated MLP (SwiGLU / GeGLU).

Every numeric convention here follows the reference implementations in `transformers`, so that checkpoints
load 1:1 (no permutation) and our logits match theirs to float32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned gain (no bias, no mean subtraction).

    unit_offset: the gain is (1 + weight) with weight starting at 0 (Gemma), rather than weight starting at 1.
    Same function at initialisation; it changes what weight decay pulls the gain towards (1 instead of 0).
    """

    def __init__(self, dim: int, eps: float = 1e-5, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, 0.0 if self.unit_offset else 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 even when activations are bf16: the mean of squares is where precision is lost.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            # Gemma applies the gain in float32 and casts last; Llama casts first. Both orders are kept so
            # that bf16 results agree bit for bit with each family's reference.
            return (x32 * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * x32.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}" + (", unit_offset=True" if self.unit_offset else "")


ACTIVATIONS = {
    "silu": F.silu,  # SwiGLU (Llama, Qwen, Mixtral, GLM, OLMo)
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GeGLU (Gemma)
}


class GatedMLP(nn.Module):
    """w2(act(w1 x) * w3 x): w1 is the gate, w3 the up projection, w2 the down projection."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "silu") -> None:
        super().__init__()
        self.activation = activation
        self.act = ACTIVATIONS[activation]
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)) * self.w3(x))

    def extra_repr(self) -> str:
        return f"activation={self.activation}"
