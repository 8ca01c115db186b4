"""Configuration of the data pipeline: sources, tokenizer, packing and the prepared shards."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


class ConfigError(ValueError):
    """A data configuration value is invalid. The message names the field, the value and the fix."""


@dataclass
class SourceConfig:
    """One corpus: files, directories or globs of .jsonl / .jsonl.zst / .json.gz / .txt (or any text file)."""

    name: str = "corpus"
    """Short name used in logs, manifests and per-source metrics."""
    paths: list[str] = field(default_factory=list)
    """Files, directories (walked recursively) or glob patterns (`**` allowed)."""
    exclude: list[str] = field(default_factory=list)
    """Glob patterns (fnmatch on the full path) of files to leave out, e.g. '*/site-packages/*'."""
    text_field: str = "text"
    """Field holding the document text in JSON records."""
    max_files: Optional[int] = None
    """Use at most this many files (after sorting), for quick runs on big directories."""
    max_documents: Optional[int] = None
    """Read at most this many documents from this source (None: all)."""


@dataclass
class TokenizerConfig:
    """Where the tokenizer comes from: an existing tokenizer.json, or a byte-level BPE trained on the sources."""

    path: str = "tokenizer"
    """Directory (holding tokenizer.json) or tokenizer.json file. Trained here if missing and `train` is set."""
    train: bool = True
    """Train a byte-level BPE on the sources when `path` holds no tokenizer yet."""
    vocab_size: int = 8192
    """Vocabulary size of a trained tokenizer (special tokens included)."""
    train_max_chars: int = 20_000_000
    """Train on at most this many characters of the sources (a prefix of the document stream)."""


@dataclass
class DataConfig:
    """The whole pipeline: sources -> tokenizer -> packed sequences -> shards on disk -> loader."""

    name: str = "custom"
    """Name of this dataset; prepared shards go under `prepared_dir`."""
    sources: list[SourceConfig] = field(default_factory=list)
    """The corpora, read in order."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    seq_len: int = 512
    """Tokens per training sequence (the model sees seq_len inputs and seq_len shifted labels)."""
    prepared_dir: str = "prepared"
    """Directory of the packed shards (train/ and val/, each with a manifest.json)."""
    val_fraction: float = 0.02
    """Fraction of documents held out for validation (chosen by a hash of the document id)."""
    shard_sequences: int = 4096
    """Sequences per shard file."""
    seed: int = 1234
    """Seed of the loader's shuffle (the order is a pure function of seed, epoch and position)."""
    shuffle: bool = True
    """Shuffle the training sequences each epoch."""

    def __post_init__(self) -> None:
        if self.seq_len <= 0:
            raise ConfigError(f"data.seq_len={self.seq_len} must be positive.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in [0, 1).")
        if self.shard_sequences <= 0:
            raise ConfigError(f"data.shard_sequences={self.shard_sequences} must be positive.")
        if self.tokenizer.vocab_size < 260:
            raise ConfigError(
                f"data.tokenizer.vocab_size={self.tokenizer.vocab_size} is too small for a byte-level BPE: use at least 260."
            )
        for i, s in enumerate(self.sources):
            if not s.paths:
                raise ConfigError(
                    f"data.sources[{i}] ({s.name!r}) has no paths: give files, directories or globs."
                )


def register_resolvers() -> None:
    """Config interpolations for corpora that need no download.

    `${stdlib:}` is this Python's standard-library directory (real code on every machine) and
    `${corpora:}` the real text shipped inside this package (see data/corpora/NOTICE.md).
    """
    import sysconfig
    from pathlib import Path

    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("stdlib", lambda: sysconfig.get_paths()["stdlib"], replace=True)
    OmegaConf.register_new_resolver("corpora", lambda: str(Path(__file__).parent / "corpora"), replace=True)
