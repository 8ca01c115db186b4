"""Text generation for evaluation: samples for fixed prompts (and, through it, lm_eval's generate_until).

One process holding the whole model generates with the inference package's KV-cache `Generator`. A
model sharded over ranks (FSDP) cannot be called by one rank alone: every rank runs the same loop, rank 0
picks each token and broadcasts it, so all ranks make the same forward calls and stop together.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from forge_lm.data.tokenizer import Tokenizer
from forge_lm.trainer.eval.scorers import EvalModel, full_tensor
from forge_lm.trainer.inference import Generator, SamplingParams
from forge_lm.trainer.inference.sampling import next_tokens


def generate_ids(
    model: EvalModel,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    eos_id: Optional[int] = None,
    seed: int = 0,
    max_context: Optional[int] = None,
) -> list[list[int]]:
    """New token ids for each prompt (the EOS that ends one included). temperature 0: greedy.

    Prompts keep their last `max_context - max_new_tokens` tokens (default: the model's max_seq_len).
    """
    if model.sharded:
        keep = max(1, (max_context or model.module.cfg.max_seq_len) - max_new_tokens)
        return [
            _lockstep(model, p[-keep:], max_new_tokens, temperature, top_k, eos_id, seed + i)
            for i, p in enumerate(prompts)
        ]
    length = None  # the model's max_seq_len
    if max_context is not None:  # room for the new tokens even when they outnumber max_context
        length = min(model.module.cfg.max_seq_len, max(max_context, max_new_tokens + 1))
    gen = Generator(model.module, max_batch_size=max(len(prompts), 1), max_seq_len=length, compile=False)
    keep = max(1, gen.max_seq_len - max_new_tokens)
    sampling = SamplingParams(temperature=temperature, top_k=top_k or None, seed=seed)
    eos = (eos_id,) if eos_id is not None else ()
    with model.autocast or torch.autocast(model.device.type, enabled=False):
        done = gen.generate([p[-keep:] for p in prompts], max_new_tokens, sampling, eos_ids=eos)
    return [c.token_ids for c in done]


def sample_prompts(
    model: EvalModel,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    temperature: float,
    top_k: Optional[int],
    seed: int,
    max_context: Optional[int] = None,
) -> dict[str, str]:
    """prompt -> prompt + its sampled continuation (the end-of-text token not shown)."""
    ids = [tokenizer.encode(p) for p in prompts]
    for prompt, p_ids in zip(prompts, ids):
        if not p_ids:
            raise ValueError(f"eval.prompts: {prompt!r} encodes to no tokens; give a non-empty prompt.")
    with model.evaluating():
        new = generate_ids(
            model, ids, max_new_tokens, temperature, top_k, tokenizer.eos_id, seed, max_context
        )
    return {p: p + tokenizer.backend.decode(n, skip_special_tokens=True) for p, n in zip(prompts, new)}


@torch.no_grad()
def _lockstep(
    model: EvalModel,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float,
    top_k: Optional[int],
    eos_id: Optional[int],
    seed: int,
) -> list[int]:
    from forge_lm.trainer.parallel import collectives

    device = model.device
    sampling = SamplingParams(temperature=max(temperature, 0.0), top_k=top_k or None, seed=seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        with model.autocast or torch.autocast(device.type, enabled=False):
            logits = full_tensor(model.module(ids))[0, -1].float()
        next_id = next_tokens(logits[None], sampling, generator)
        collectives.broadcast(next_id, src=0)  # rank 0 decides: ranks never disagree on the token or on stopping
        token = int(next_id.item())
        new.append(token)
        if eos_id is not None and token == eos_id:
            break
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return new
