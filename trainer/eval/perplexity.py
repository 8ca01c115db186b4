"""Validation loss and perplexity over a fixed, ordered set of held-out batches."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

import torch
from torch import nn

from trainer.loss import IGNORE_INDEX, lm_loss


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
) -> dict[str, float]:
    """Token-weighted mean loss over `batches`, its perplexity, and the number of tokens scored."""
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    try:
        for batch in batches:
            input_ids = batch["input_ids"].to(device)
            labels = batch["labels"].to(device)
            with autocast or contextlib.nullcontext():
                logits = model(input_ids, position_ids=batch["position_ids"].to(device))
            total_loss += lm_loss(logits, labels, reduction="sum").item()
            total_tokens += int((labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if total_tokens == 0:
        raise ValueError("the validation set is empty: raise data.val_fraction or lower data.seq_len")
    loss = total_loss / total_tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": total_tokens}
