"""One-call sampling for a single prompt (the end-of-training samples), on top of the KV-cache Generator."""

from __future__ import annotations

from typing import Optional

from torch import nn

from trainer.inference.engine import Generator
from trainer.inference.sampling import SamplingParams


def generate(
    model: nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    eos_id: Optional[int] = None,
    seed: int = 0,
    max_context: Optional[int] = None,
    top_p: Optional[float] = None,
) -> list[int]:
    """Return the new token ids (the prompt not included; an EOS that ends them included).

    temperature=0 means greedy. max_context: keep only the last this many prompt tokens, so that prompt and
    generation fit (default: the model's max_seq_len).
    """
    if not prompt_ids:
        raise ValueError("generate() needs at least one prompt token")
    was_training = model.training
    try:
        generator = Generator(model, max_batch_size=1, max_seq_len=max_context, compile=False)
        keep = max(1, generator.max_seq_len - max_new_tokens)
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        eos = () if eos_id is None else (eos_id,)
        [completion] = generator.generate([prompt_ids[-keep:]], max_new_tokens, sampling, eos_ids=eos)
    finally:
        model.train(was_training)
    return completion.token_ids
