"""Choosing the next token from the logits: greedy, or sampling with temperature, top-k and top-p."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is picked. temperature 0 is greedy (top_k/top_p are then ignored)."""

    temperature: float = 0.0
    top_k: Optional[int] = None
    """Keep only the k most likely tokens (None or 0: all)."""
    top_p: Optional[float] = None
    """Keep the smallest set of most likely tokens whose probability reaches p (None or 1: all)."""
    seed: int = 0
    """Seeds the sampling generator: the same seed, prompts and model give the same tokens."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 is greedy).")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 or None keeps every token).")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1].")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def next_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator]
) -> torch.Tensor:
    """logits [B, vocab] -> token ids [B]."""
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens more likely than it already reach p; the most likely always stays.
        drop = probs.cumsum(dim=-1) - probs >= params.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
