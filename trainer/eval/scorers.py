"""The one model call evaluation needs: log p(target) per position, for a batch of token rows.

    scorer(input_ids [B, T], targets [B, T], greedy) -> (logprobs [B, T] fp32, is_argmax [B, T] bool | None)

`targets[b, t]` is the token expected after `input_ids[b, :t+1]`, or IGNORE (-100) where nothing is
scored (context and padding); the log-probability there is 0. `is_argmax` (whether the target is the
most likely token) is only needed for lm_eval's is_greedy and may be None when `greedy` is False.

Two implementations, because a sharded model must be called differently:

- `DecoderScorer`: an unsharded Decoder; `Decoder.score` runs the fused output-projection +
  log-softmax kernel and never materialises [B, T, vocab] logits.
- `ForwardScorer`: a model sharded over ranks (FSDP2 / ZeRO-3 gather their parameters in `forward`),
  so every rank calls `forward` with the same batch: `model(input_ids, labels=targets)` gives the
  per-token cross-entropy (= -log p) through the same fused kernel. The argmax needs the logits:
  with `greedy`, `model(input_ids)` is called instead (one [B, T, vocab] tensor per batch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional, Protocol

import torch
from torch import nn

IGNORE = -100


class TokenScorer(Protocol):
    def __call__(
        self, input_ids: torch.Tensor, targets: torch.Tensor, greedy: bool
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]: ...


class _ModelScorer:
    def __init__(
        self, model: nn.Module, autocast: Optional[contextlib.AbstractContextManager] = None
    ) -> None:
        self.model = model
        self.autocast = autocast


class DecoderScorer(_ModelScorer):
    """Scores with `Decoder.score` on a model that holds all its weights (one process, or rank 0's copy)."""

    @torch.no_grad()
    def __call__(
        self, input_ids: torch.Tensor, targets: torch.Tensor, greedy: bool
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        scored = targets != IGNORE
        with self.autocast or contextlib.nullcontext():
            # score() gathers at the targets, so ignored positions get a valid id; they are zeroed below.
            logprobs, is_argmax = self.model.score(input_ids, targets.clamp_min(0))
        return logprobs.float() * scored, is_argmax | ~scored


class ForwardScorer(_ModelScorer):
    """Scores through `forward`, which every rank of a sharded model must call with the same batch."""

    @torch.no_grad()
    def __call__(
        self, input_ids: torch.Tensor, targets: torch.Tensor, greedy: bool
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        scored = targets != IGNORE
        with self.autocast or contextlib.nullcontext():
            if not greedy:
                losses = self.model(input_ids, labels=targets)
                return -full_tensor(losses).float() * scored, None
            logits = full_tensor(self.model(input_ids)).float()
        logprobs = logits.log_softmax(-1).gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)
        return logprobs * scored, (logits.argmax(-1) == targets) | ~scored


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from what a parallel model returns (a replicated DTensor under some layouts)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


@dataclass
class EvalModel:
    """A model as evaluation calls it: where it runs, in what precision, and whether it is sharded.

    `sharded`: its parameters are spread over ranks, so every rank must make the same forward calls
    (scoring through `forward`, sampling in lock-step). Otherwise one process holds the whole model.
    """

    module: nn.Module
    device: torch.device
    sharded: bool = False
    autocast: Optional[contextlib.AbstractContextManager] = None

    def scorer(self) -> TokenScorer:
        return (
            ForwardScorer(self.module, self.autocast)
            if self.sharded
            else DecoderScorer(self.module, self.autocast)
        )

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Eval mode for the duration (restoring train mode after, as a training loop needs)."""
        was_training = self.module.training
        self.module.eval()
        try:
            yield
        finally:
            self.module.train(was_training)
