"""What a configuration amounts to: its knob values, parameters per module, FLOPs per token, and the
difference between two presets. The logic behind tools/arch_show.py and tools/arch_diff.py.

Everything is computed on the meta device: no memory is allocated, so the largest presets cost nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch

from forge_lm.trainer.model.config import ModelConfig
from forge_lm.trainer.model.decoder import Decoder
from forge_lm.trainer.model.families import DEFAULT_SIZE, FAMILY_KNOBS, RELEASED, family_of, preset


def knob_values(cfg: ModelConfig) -> dict[str, Any]:
    """Every field of `cfg`, nested configs flattened with dots ("moe.top_k"), in declaration order."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            for g in dataclasses.fields(value):
                out[f"{f.name}.{g.name}"] = getattr(value, g.name)
        else:
            out[f.name] = value
    return out


def released_vocab(family: str) -> int:
    """The vocabulary of the family's first released checkpoint (what generic presets are measured with)."""
    return next(values["vocab_size"] for fam, values in RELEASED.values() if fam == family)


def resolve(name: str, size: str = DEFAULT_SIZE, vocab: int | None = None) -> tuple[str, ModelConfig]:
    """(preset name, config) for a family name (taken at `size`) or a full preset name. A null vocabulary is
    filled with `vocab`, or else with the family's released one, so that parameters can be counted."""
    full = f"{name}_{size}" if name in FAMILY_KNOBS else name
    cfg = preset(full)
    if cfg.vocab_size is None or vocab is not None:
        cfg.vocab_size = vocab or released_vocab(family_of(full))
    return full, cfg


def meta_model(cfg: ModelConfig) -> Decoder:
    with torch.device("meta"):
        return Decoder(cfg)


def counts(cfg: ModelConfig, seq_len: int) -> dict[str, int]:
    """Total parameters; without the embedding and output matrices; active per token (MoE: top_k of the
    experts); training FLOPs per token at `seq_len` (Decoder.flops_per_token)."""
    model = meta_model(cfg)
    vocab_matrices = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    return {
        "parameters": model.num_params(),
        "non-embedding": model.num_params() - vocab_matrices,
        "active per token": model.num_active_params(),
        "FLOPs per token": model.flops_per_token(seq_len),
    }


def module_rows(cfg: ModelConfig) -> Iterator[tuple[str, tuple[int, ...], int]]:
    """(name, shape, parameters) per tensor: the embedding, one block (all blocks have the same shapes), the
    final norm and the output; a tied output is reported as such, not counted twice."""
    model = meta_model(cfg)
    tied = cfg.tie_embeddings
    for name, p in model.named_parameters(remove_duplicate=False):
        if name.startswith("layers.") and not name.startswith("layers.0."):
            continue
        if name == "output.weight" and tied:
            yield "output.weight (tied: the embedding)", tuple(p.shape), 0
            continue
        yield name, tuple(p.shape), p.numel()


def differing_knobs(a: ModelConfig, b: ModelConfig) -> tuple[list[tuple[str, Any, Any]], list[str]]:
    """([(knob, value in a, value in b)] for the knobs that differ, [names of the knobs that are equal])."""
    ka, kb = knob_values(a), knob_values(b)
    differ = [(k, ka[k], kb[k]) for k in ka if ka[k] != kb[k]]
    same = [k for k in ka if ka[k] == kb[k]]
    return differ, same


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)
