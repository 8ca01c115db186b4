"""Autoregressive sampling: greedy, temperature and top-k, with a seed.

This first version recomputes the whole (cropped) context at every step, which is all a tiny
model's end-of-run sample needs; a KV-cache engine serves fast inference.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    eos_id: Optional[int] = None,
    seed: int = 0,
    max_context: Optional[int] = None,
) -> list[int]:
    """Return the new token ids (the prompt not included). temperature=0 means greedy."""
    if not prompt_ids:
        raise ValueError("generate() needs at least one prompt token")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    new: list[int] = []
    try:
        for _ in range(max_new_tokens):
            context = ids if max_context is None else ids[:, -max_context:]
            logits = model(context)[0, -1].float()
            if temperature <= 0:
                next_id = int(logits.argmax())
            else:
                logits = logits / temperature
                if top_k is not None and 0 < top_k < logits.numel():
                    kth = torch.topk(logits, top_k).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                next_id = int(torch.multinomial(probs, 1, generator=generator))
            new.append(next_id)
            if eos_id is not None and next_id == eos_id:
                break
            ids = torch.cat([ids, ids.new_tensor([[next_id]])], dim=1)
    finally:
        model.train(was_training)
    return new
