"""The small building blocks of the decoder: RMSNorm and the gated MLP (SwiGLU / GeGLU).

Every numeric convention here follows the reference implementations in `transformers`, so that checkpoints
load 1:1 (no permutation) and our logits match theirs to float32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from forge_lm.trainer import kernels


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
        # Normalised in float32; Gemma's gain is applied before the cast, Llama's after (trainer/kernels).
        return kernels.rms_norm(x, self.weight, self.eps, self.unit_offset)

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
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(kernels.gated_activation(self.w1(x), self.w3(x), self.activation))

    def extra_repr(self) -> str:
        return f"activation={self.activation}"
