"""Batched generation with a KV cache: one prefill over the (left-padded) prompts, then one-token decode steps.

    gen = Generator(model)
    out = gen.generate([ids_a, ids_b], max_new_tokens=32, sampling=SamplingParams(temperature=0.8, top_p=0.95))
    for token in gen.stream(ids_a, max_new_tokens=64, tokenizer=tok, stop_strings=["\\n\\n"]): ...

The decode step is the hot loop: it sees the same shapes at every step (the cache is static), so it is
torch.compile'd once per (batch, cache length) with dynamic=False, and on CUDA captured as a CUDA graph
(mode="reduce-overhead"), which removes the per-step launch overhead that dominates small-batch decoding
(trainer/inference/compiled.py).
Cache lengths are rounded up to a multiple of CACHE_ROUNDING so that nearby request sizes share a graph.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from forge_lm.data.tokenizer import Tokenizer
from forge_lm.trainer.inference.cache import KVCache
from forge_lm.trainer.inference.compiled import compile_decode_step, mark_static
from forge_lm.trainer.inference.sampling import SamplingParams, next_tokens
from forge_lm.trainer.inference.split_matvec import split_matvecs
from forge_lm.trainer.model import Decoder

CACHE_ROUNDING = 64
GREEDY = SamplingParams()


@dataclass
class Completion:
    token_ids: list[int]
    """The new tokens, the EOS that ended them included."""
    text: Optional[str]
    """The decoded new tokens (when a tokenizer was given), cut before the first stop string; no EOS."""
    finish_reason: str
    """"eos", "stop" (a stop string appeared) or "length" (max_new_tokens reached)."""


class Generator:
    """Generates from a Decoder (unsharded, any family, dense or MoE) with a static KV cache.

    max_seq_len: the longest prompt + generation allowed (default: the model's max_seq_len).
    compile: torch.compile the decode step (default: on CUDA only; on CPU compilation costs tens of
    seconds, worth it for long generations, see tools/bench_inference.py).
    """

    def __init__(
        self,
        model: Decoder,
        max_batch_size: int = 8,
        max_seq_len: Optional[int] = None,
        compile: Optional[bool] = None,
    ) -> None:
        self.model = model.eval()
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len or model.cfg.max_seq_len
        self.compile = self.device.type == "cuda" if compile is None else compile
        self._cache: Optional[KVCache] = None
        self._decode = self._decode_step
        if self.compile:
            self._decode = compile_decode_step(self._decode_step, self.device)

    # ---- public API ------------------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: SamplingParams = GREEDY,
        eos_ids: Sequence[int] = (),
        stop_strings: Sequence[str] = (),
        tokenizer: Optional[Tokenizer] = None,
    ) -> list[Completion]:
        """Complete every prompt (token ids). Batches of more than max_batch_size prompts run in turns."""
        out: list[Completion] = []
        for start in range(0, len(prompts), self.max_batch_size):
            batch = prompts[start : start + self.max_batch_size]
            new: list[list[int]] = [[] for _ in batch]
            reasons = ["length"] * len(batch)
            for step in self._steps(batch, max_new_tokens, sampling, eos_ids, stop_strings, tokenizer):
                for row, (token, reason) in enumerate(step):
                    if token is not None:
                        new[row].append(token)
                    if reason is not None:
                        reasons[row] = reason
            for ids, reason in zip(new, reasons):
                out.append(Completion(ids, self._text(ids, eos_ids, stop_strings, tokenizer), reason))
        return out

    def stream(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        sampling: SamplingParams = GREEDY,
        eos_ids: Sequence[int] = (),
        stop_strings: Sequence[str] = (),
        tokenizer: Optional[Tokenizer] = None,
    ) -> Iterator[int]:
        """Yield the new token ids of one prompt as they are generated (the EOS included, if it comes)."""
        for step in self._steps([prompt], max_new_tokens, sampling, eos_ids, stop_strings, tokenizer):
            token, _ = step[0]
            if token is not None:
                yield token

    def cache_bytes(self) -> int:
        """Memory held by the KV cache of the last batch."""
        return self._cache.nbytes() if self._cache is not None else 0

    # ---- the loop --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _steps(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: SamplingParams,
        eos_ids: Sequence[int],
        stop_strings: Sequence[str],
        tokenizer: Optional[Tokenizer],
    ) -> Iterator[list[tuple[Optional[int], Optional[str]]]]:
        """Per step, each row's (new token or None once finished, finish reason when it just finished)."""
        self._check(prompts, max_new_tokens, stop_strings, tokenizer)
        if max_new_tokens == 0:
            return
        B, T = len(prompts), max(len(p) for p in prompts)
        cache = self._cache_for(B, T + max_new_tokens)
        ids = torch.zeros(B, T, dtype=torch.long)  # left padding; the pad id is never attended to
        for row, prompt in enumerate(prompts):
            ids[row, T - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        cache.reset(torch.tensor([T - len(p) for p in prompts], device=self.device))

        generator = None
        if not sampling.greedy:
            generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        eos = set(eos_ids)
        done = [False] * B
        new: list[list[int]] = [[] for _ in range(B)]

        cache.prefilling = True
        try:
            logits = self.model(ids.to(self.device), cache=cache)[:, -1].float()
        finally:
            cache.prefilling = False
        cache.slot.fill_(T)
        for i in range(max_new_tokens):
            tokens = next_tokens(logits, sampling, generator)
            step: list[tuple[Optional[int], Optional[str]]] = []
            for row, token in enumerate(tokens.tolist()):
                if done[row]:
                    step.append((None, None))
                    continue
                new[row].append(token)
                reason = None
                if token in eos:
                    reason = "eos"
                elif stop_strings and _contains_stop(tokenizer.decode(new[row]), stop_strings):
                    reason = "stop"
                elif i == max_new_tokens - 1:
                    reason = "length"
                done[row] = reason is not None
                step.append((token, reason))
            yield step
            if all(done):
                break
            logits = self._decode(tokens[:, None], cache)

    def _decode_step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Write one token per row at cache.slot, return the next logits [B, vocab] (fp32)."""
        with split_matvecs(self.device):  # on a CPU, every core streams weights (split_matvec.py)
            logits = self.model(tokens, cache=cache)[:, -1].float()
        cache.slot += 1
        return logits

    def _cache_for(self, batch_size: int, length: int) -> KVCache:
        length = min(self.max_seq_len, -(-length // CACHE_ROUNDING) * CACHE_ROUNDING)
        cache = self._cache
        if cache is None or cache.batch_size != batch_size or cache.max_len != length:
            cache = self._cache = KVCache(self.model.cfg, batch_size, length, self.device, self.dtype)
            if self.compile:
                mark_static([t for layer in cache.layers for t in (layer.k, layer.v)] + [cache.pad, cache.slot])
        return cache

    # ---- checks and text -------------------------------------------------------------------------------------

    def _check(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        stop_strings: Sequence[str],
        tokenizer: Optional[Tokenizer],
    ) -> None:
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0.")
        if stop_strings and tokenizer is None:
            raise ValueError("stop_strings need a tokenizer, to see the text the tokens spell.")
        vocab = self.model.cfg.vocab_size
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} is empty: give at least one token (e.g. the BOS token).")
            if len(prompt) + max_new_tokens > self.max_seq_len:
                raise ValueError(
                    f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} that is "
                    f"{len(prompt) + max_new_tokens}, longer than the context of {self.max_seq_len} tokens "
                    "(model.max_seq_len). Shorten the prompt or ask for fewer new tokens."
                )
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise ValueError(
                    f"prompt {i} has token id {bad[0]}, outside the model's vocabulary of {vocab}: the "
                    "tokenizer does not belong to this model."
                )

    @staticmethod
    def _text(
        ids: list[int], eos_ids: Sequence[int], stop_strings: Sequence[str], tokenizer: Optional[Tokenizer]
    ) -> Optional[str]:
        if tokenizer is None:
            return None
        if ids and ids[-1] in set(eos_ids):
            ids = ids[:-1]
        text = tokenizer.decode(ids)
        cut = min((text.find(s) for s in stop_strings if s in text), default=-1)
        return text[:cut] if cut >= 0 else text


def _contains_stop(text: str, stop_strings: Sequence[str]) -> bool:
    return any(s in text for s in stop_strings)
