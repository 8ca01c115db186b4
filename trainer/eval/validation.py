"""Validation sets with their size in tokens and in bytes: loss, perplexity and bits per byte.

Loss per token depends on the tokenizer; bits per byte does not, so runs with different tokenizers (or
vocabulary sizes) compare on it:

    bits per byte = (sum of the token losses in nats) / ln 2 / (UTF-8 bytes of the predicted tokens)

Every predicted token counts in the loss; document separators (EOS, BOS: special tokens) count zero
bytes, being no text. A token's bytes are exact for byte-level BPE (GPT-2, Llama 3, Qwen, our trained
BPE: each character of a token is one byte) and for SentencePiece byte-fallback tokens (<0x..>).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from forge_lm.data.config import DataConfig
from forge_lm.data.tokenizer import Tokenizer
from forge_lm.trainer.config import EvalConfig
from forge_lm.trainer.loss import IGNORE_INDEX

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


@dataclass
class ValSet:
    """Re-iterable validation batches and what they hold. name '' is the whole validation split."""

    name: str
    batches: Iterable[Batch]
    tokens: int
    """Predicted (non-ignored) tokens."""
    bytes: int
    """UTF-8 bytes of those tokens."""


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes of the text of every token id (0 for special tokens), as an int64 array [vocab_size]."""
    backend = tokenizer.backend
    added = backend.get_added_tokens_decoder()
    byte_level = _is_byte_level(json.loads(backend.to_str()).get("decoder"))
    lengths = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for i in range(tokenizer.vocab_size):
        if i in added:
            # Added tokens are stored as plain text, not in the byte-level alphabet.
            lengths[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
            continue
        token = backend.id_to_token(i)
        if token is None:
            continue
        if byte_level:
            lengths[i] = len(token)  # one character of the byte-level alphabet per byte
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            lengths[i] = 1  # SentencePiece byte fallback
        else:
            lengths[i] = len(token.replace("\u2581", " ").encode("utf-8"))  # SentencePiece's word marker
    return lengths


def _is_byte_level(decoder: Any) -> bool:
    if not isinstance(decoder, dict):
        return False
    if decoder.get("type") == "ByteLevel":
        return True
    return any(_is_byte_level(d) for d in decoder.get("decoders") or [])


def measure(name: str, batches: Iterable[Batch], byte_lengths: np.ndarray) -> ValSet:
    """A ValSet of `batches`, counting their predicted tokens and bytes once (the batches never change)."""
    tokens = n_bytes = 0
    for batch in batches:
        labels = batch["labels"]
        kept = labels[labels != IGNORE_INDEX].numpy()
        tokens += int(kept.size)
        n_bytes += int(byte_lengths[kept].sum())
    return ValSet(name, batches, tokens, n_bytes)


def val_metrics(loss: float, tokens: int, n_bytes: int) -> dict[str, float]:
    """loss (mean nats per token), perplexity and bits per byte."""
    out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    if n_bytes > 0:
        out["bpb"] = loss * tokens / math.log(2) / n_bytes
    return out


LossFn = Callable[[Iterable[Batch]], dict[str, float]]
"""Mean validation loss of batches: `Engine.evaluate` in training (any layout), `plain_loss` otherwise."""


def plain_loss(
    model: torch.nn.Module, device: torch.device, document_masking: bool, autocast: Optional[Any] = None
) -> LossFn:
    """A LossFn for an unsharded model (stand-alone evaluation), the token-weighted mean like the engine's."""
    from forge_lm.trainer.engine import model_inputs

    @torch.no_grad()
    def evaluate(batches: Iterable[Batch]) -> dict[str, float]:
        total, tokens = 0.0, 0
        was_training = model.training
        model.eval()
        try:
            for batch in batches:
                labels = batch["labels"].to(device)
                with autocast or contextlib.nullcontext():
                    losses = model(**model_inputs(batch, device, document_masking), labels=labels)
                total += float(losses.float().sum())
                tokens += int((labels != IGNORE_INDEX).sum())
        finally:
            model.train(was_training)
        loss = total / max(tokens, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}

    return evaluate


def build_val_sets(
    data_cfg: DataConfig,
    eval_cfg: EvalConfig,
    tokenizer: Tokenizer,
    overall: Optional[Iterable[Batch]] = None,
) -> list[ValSet]:
    """The whole validation split (`overall`, or built from the config) and, with eval.per_source and several
    sources, each source's own held-out data; tokens and bytes counted once, here."""
    from forge_lm.data.pipeline import build_val_batches, build_val_batches_per_source

    byte_lengths = token_byte_lengths(tokenizer)
    if overall is None:
        overall = build_val_batches(data_cfg, tokenizer, eval_cfg.batch_size, eval_cfg.max_batches)
    sets = [measure("", overall, byte_lengths)]
    if eval_cfg.per_source:
        per_source = build_val_batches_per_source(
            data_cfg, tokenizer, eval_cfg.batch_size, eval_cfg.source_max_batches
        )
        for name, batches in per_source.items():
            vs = measure(name, batches, byte_lengths)
            if vs.tokens:
                sets.append(vs)
            else:
                logger.warning(
                    "source %s has no held-out sequence: no per-source validation numbers for it", name
                )
    return sets
