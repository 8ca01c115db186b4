"""Fused kernels and their plain PyTorch references; which one runs is decided here, in one place.

Public functions (the model, the loss and the evaluation call only these):
    linear_cross_entropy(hidden, weight, targets, softcap=None, ignore_index=-100) -> per-token loss [N] fp32
    linear_log_probs(hidden, weight, targets, softcap=None) -> (log-probabilities [N] fp32, is-argmax [N] bool)

(Placeholder references; the Triton kernels and the dispatch land next.)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


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
