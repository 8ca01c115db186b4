"""The decoder's configuration: every knob the model has, documented where it is declared."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field, the value and the fix."""


@dataclass
class ModelConfig:
    """A decoder-only transformer in the Llama family (pre-norm, RoPE, GQA, SwiGLU)."""

    family: str = "llama"
    """Architecture family; decides the Hugging Face class used on export."""
    vocab_size: Optional[int] = None
    """Embedding rows. None: taken from the tokenizer at start (rounded up to `pad_vocab_to`)."""
    pad_vocab_to: int = 64
    """When `vocab_size` is taken from the tokenizer, round it up to a multiple of this (fast matmuls)."""
    d_model: int = 256
    """Hidden size (width of the residual stream)."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention (query) heads. Must divide `d_model`."""
    n_kv_heads: Optional[int] = None
    """Key/value heads for grouped-query attention. None: same as `n_heads` (multi-head attention)."""
    ffn_dim: Optional[int] = None
    """Hidden size of the SwiGLU MLP. None: 8/3 * d_model rounded up to `ffn_multiple_of`."""
    ffn_multiple_of: int = 64
    """Rounding for the derived `ffn_dim`."""
    max_seq_len: int = 2048
    """Longest sequence the model is built for (recorded as max_position_embeddings on export)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """Epsilon of RMSNorm."""
    tie_embeddings: bool = False
    """Share the input embedding matrix with the output projection."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation; output projections are also scaled by 1/sqrt(2*n_layers)."""

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_dim is None:
            hidden = int(8 * self.d_model / 3)
            m = self.ffn_multiple_of
            self.ffn_dim = m * ((hidden + m - 1) // m)
        for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be positive.")
        if self.d_model % self.n_heads != 0:
            raise ConfigError(
                f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model}: "
                f"choose n_heads among the divisors of d_model (e.g. {_divisors_near(self.d_model, self.n_heads)})."
            )
        if self.n_heads % self.n_kv_heads != 0:
            raise ConfigError(
                f"model.n_kv_heads={self.n_kv_heads} does not divide model.n_heads={self.n_heads}: "
                "grouped-query attention needs n_heads to be a multiple of n_kv_heads."
            )
        if (self.d_model // self.n_heads) % 2 != 0:
            raise ConfigError(
                f"model.d_model / model.n_heads = {self.d_model // self.n_heads} is odd: RoPE needs an even head dimension."
            )
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise ConfigError(
                f"model.vocab_size={self.vocab_size} must be positive (or null to take it from the tokenizer)."
            )
        if self.family != "llama":
            raise ConfigError(f"model.family={self.family!r} is not supported; supported: 'llama'.")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def with_vocab(self, tokenizer_vocab_size: int) -> ModelConfig:
        """Fill in (or check) the vocabulary size against the tokenizer's."""
        if self.vocab_size is None:
            m = self.pad_vocab_to
            self.vocab_size = m * ((tokenizer_vocab_size + m - 1) // m)
        elif self.vocab_size < tokenizer_vocab_size:
            raise ConfigError(
                f"model.vocab_size={self.vocab_size} is smaller than the tokenizer's vocabulary "
                f"({tokenizer_vocab_size}): set model.vocab_size to at least {tokenizer_vocab_size}, or null."
            )
        return self


def _divisors_near(n: int, near: int) -> list[int]:
    divs = [d for d in range(1, n + 1) if n % d == 0]
    return sorted(divs, key=lambda d: abs(d - near))[:3]
