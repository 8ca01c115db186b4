"""Load a model to generate from or evaluate: a Hugging Face folder, a framework checkpoint of any parallel
layout (consolidated into one plain model), or a run directory (its latest complete checkpoint)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

import torch

from forge_lm.data.tokenizer import Tokenizer, has_tokenizer, load_tokenizer
from forge_lm.trainer.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_model_weights,
    read_train_state,
)
from forge_lm.trainer.hub import from_hf
from forge_lm.trainer.model import Decoder, ModelConfig

# What makes two configurations different architectures (weights of one cannot serve the other).
ARCHITECTURE_FIELDS = (
    "family", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
    "tie_embeddings", "qk_norm", "qkv_bias", "pre_norm", "post_norm",
)  # fmt: skip


def load_model(
    path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    expect: Optional[ModelConfig] = None,
    tokenizer_path: Optional[str] = None,
) -> tuple[Decoder, Optional[Tokenizer]]:
    """The model at `path` in eval mode, and its tokenizer when one is found.

    expect: the configuration the caller means to evaluate; a model of another architecture is refused
    with the differing fields named. tokenizer_path overrides the tokenizer found beside the model.
    """
    path = Path(path)
    if (path / "config.json").is_file():
        model = from_hf(path, dtype=dtype, device=device)
        tokenizer_path = tokenizer_path or (str(path) if has_tokenizer(str(path)) else None)
    else:
        checkpoint = _checkpoint_dir(path)
        extra = read_train_state(checkpoint, collective=False)["extra"]
        if "model_config" not in extra:
            raise CheckpointError(
                f"{checkpoint} does not record its model config (written by an older version)."
            )
        model = Decoder(ModelConfig(**extra["model_config"]))
        _check_architecture(model.cfg, expect, checkpoint)
        load_model_weights(checkpoint, model)  # any parallel layout consolidates into this plain model
        model = model.to(device=device, dtype=dtype)
        saved = extra.get("tokenizer_path")
        tokenizer_path = tokenizer_path or (saved if saved and Path(saved).exists() else None)
    _check_architecture(model.cfg, expect, path)
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None
    if tokenizer is not None:
        check_tokenizer_fits(tokenizer, model.cfg, tokenizer_path)
    return model.eval(), tokenizer


def tokenizer_location(path: str | os.PathLike[str]) -> Optional[str]:
    """Where `load_model(path)` finds its tokenizer: the Hugging Face folder itself, or the tokenizer the
    run was trained with (None if there is none). Its tokenizer_config.json may hold a chat template."""
    path = Path(path)
    if (path / "config.json").is_file():
        return str(path) if has_tokenizer(str(path)) else None
    saved = read_train_state(_checkpoint_dir(path), collective=False)["extra"].get("tokenizer_path")
    return saved if saved and Path(saved).exists() else None


def check_tokenizer_fits(tokenizer: Tokenizer, cfg: ModelConfig, where: object = "the tokenizer") -> None:
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary holds "
            f"{cfg.vocab_size} (model.vocab_size): its ids would index past the embedding. Use the "
            "tokenizer the model was trained with."
        )


def _checkpoint_dir(path: Path) -> Path:
    """A checkpoint named directly, else a run directory's newest checkpoint that verifies (a corrupt newer
    one is skipped with a warning naming the file)."""
    if (path / "train_state.pt").is_file():
        return path
    for candidate in (path / "checkpoints", path):
        if candidate.is_dir():
            latest = latest_checkpoint(candidate, collective=False)
            if latest is not None:
                return Path(latest.path)
    raise FileNotFoundError(
        f"{path}: neither a Hugging Face folder (config.json), a checkpoint (train_state.pt) nor a run "
        "directory with complete checkpoints under checkpoints/."
    )


def _check_architecture(found: ModelConfig, expect: Optional[ModelConfig], where: Path) -> None:
    if expect is None:
        return
    have, want = dataclasses.asdict(found), dataclasses.asdict(expect)
    diff = [f for f in ARCHITECTURE_FIELDS if want.get(f) is not None and have[f] != want[f]]
    if have["moe"]["num_experts"] != want["moe"]["num_experts"]:
        diff.append("moe.num_experts")
    if diff:
        shown = ", ".join(f"{f}={_get(have, f)!r} (config: {_get(want, f)!r})" for f in diff)
        raise CheckpointError(
            f"{where} holds another architecture than the model config asks for: {shown}. Pick the model "
            "preset it was trained with (model=...), or leave the model unset to take the checkpoint's own."
        )


def _get(d: dict, dotted: str) -> object:
    for part in dotted.split("."):
        d = d[part]
    return d
