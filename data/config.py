"""Configuration of the data pipeline: sources, tokenizer, packing, the prepared shards and the loader."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional


class ConfigError(ValueError):
    """A data configuration value is invalid. The message names the field, the value and the fix."""


PACKINGS = ("concat", "best_fit")
MODES = ("offline", "online")
BAD_INPUT_POLICIES = ("skip", "error")
TEXT_SPLITS = ("file", "line", "paragraph")


@dataclass
class SourceConfig:
    """One corpus: files, directories or globs (.jsonl / .jsonl.zst / .json.gz / .parquet / .txt or any text
    file), or a Hugging Face dataset (`hf_dataset`)."""

    name: str = "corpus"
    """Short name used in logs, manifests and per-source metrics (and, in a mixture, as a directory name)."""
    paths: list[str] = field(default_factory=list)
    """Files, directories (walked recursively) or glob patterns (`**` allowed). Leave empty with `hf_dataset`."""
    exclude: list[str] = field(default_factory=list)
    """Glob patterns (fnmatch on the full path) of files to leave out, e.g. '*/site-packages/*'."""
    text_field: str = "text"
    """Field (JSON key, parquet or dataset column) holding the document text."""
    id_field: str = "id"
    """Field holding a stable document id (decides the val split); records without it use `file:line`."""
    text_split: str = "file"
    """Plain-text files (not JSON/parquet): 'file' (one document per file), 'line' or 'paragraph' (blank-line separated)."""
    max_files: Optional[int] = None
    """Use at most this many files (after sorting), for quick runs on big directories."""
    max_documents: Optional[int] = None
    """Read at most this many documents from this source (None: all)."""
    min_chars: int = 0
    """Skip (and count as 'too_short') documents with fewer characters than this."""
    max_chars: Optional[int] = None
    """Skip (and count as 'too_long') documents with more characters than this (None: no limit)."""
    weight: Optional[float] = None
    """Mixture weight. None on every source: sources are read one after the other into one dataset. Set on every
    source: each is prepared as its own dataset and the loader draws samples in these proportions."""
    hf_dataset: Optional[str] = None
    """A Hugging Face dataset instead of files: a directory written by `save_to_disk`, or a `datasets.load_dataset`
    path or name (e.g. 'json', 'parquet', a Hub id), which is streamed (streaming=True)."""
    hf_name: Optional[str] = None
    """Configuration name passed to `load_dataset` (its `name` argument)."""
    hf_split: str = "train"
    """Split of the Hugging Face dataset to read."""
    hf_data_files: list[str] = field(default_factory=list)
    """`data_files` passed to `load_dataset` (e.g. local files for the 'json' or 'parquet' builders)."""


@dataclass
class TokenizerConfig:
    """Where the tokenizer comes from (an existing tokenizer, or a byte-level BPE trained on the sources) and
    how documents are delimited (the BOS/EOS policy)."""

    path: str = "tokenizer"
    """Directory holding tokenizer.json (or encoder.json + vocab.bpe, GPT-2 style), or a tokenizer.json file.
    Trained here if missing and `train` is set."""
    train: bool = True
    """Train a byte-level BPE on the sources when `path` holds no tokenizer yet."""
    vocab_size: int = 8192
    """Vocabulary size of a trained tokenizer (special tokens included)."""
    train_max_chars: int = 20_000_000
    """Train on at most this many characters of the sources (a prefix of the document stream)."""
    eos_token: Optional[str] = None
    """Document separator token (None: chosen by `load_tokenizer`, see data/tokenizer.py)."""
    bos_token: Optional[str] = None
    """Beginning-of-document token (None: the tokenizer's own, if it has one)."""
    add_bos: Optional[bool] = None
    """Put BOS before every document. None: only if the tokenizer itself asks for it (tokenizer_config.json
    `add_bos_token`, or a post-processor that adds it, as Llama's do)."""
    add_eos: bool = True
    """Put EOS after every document (the separator the model learns to predict at a document's end)."""


@dataclass
class DataConfig:
    """The whole pipeline: sources -> tokenizer -> packed sequences -> shards on disk (or on the fly) -> loader."""

    name: str = "custom"
    """Name of this dataset; prepared shards go under `prepared_dir`."""
    sources: list[SourceConfig] = field(default_factory=list)
    """The corpora, read in order (or mixed by weight when every source has a `weight`)."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """The tokenizer and its BOS/EOS policy."""
    seq_len: int = 512
    """Tokens per training sequence (the model sees seq_len inputs and seq_len shifted labels)."""
    prepared_dir: str = "prepared"
    """Directory of the packed shards (train/ and val/, each with a manifest.json; <source>/train/ ... for a mixture)."""
    val_fraction: float = 0.02
    """Fraction of documents held out for validation (chosen by a hash of the document id)."""
    shard_sequences: int = 4096
    """At most this many sequences per shard file (a work unit's rows are split into files of this size)."""
    seed: int = 1234
    """Seed of the loader's shuffle (the order is a pure function of seed, epoch and position)."""
    shuffle: bool = True
    """Shuffle the training sequences each epoch."""
    packing: str = "concat"
    """'concat': documents + EOS concatenated and cut into rows (no padding). 'best_fit': whole documents packed
    into rows by best-fit decreasing (fewer documents cut; the rest of a row is padding, left out of the loss)."""
    mode: str = "offline"
    """'offline': train from shards written by `prepare`. 'online': tokenize and pack the raw sources on the fly
    in worker processes, with the same exact resume (shuffle is then within a work unit only)."""
    num_workers: int = -1
    """Tokenizer processes. -1: one per available CPU core; 0: tokenize in the calling process. The shards are
    byte-identical whatever the number."""
    chunk_chars: int = 4_000_000
    """Characters per work unit: documents are grouped in order into chunks of at least this many characters;
    each chunk is tokenized, packed and written by one worker, and is what a killed `prepare` resumes from."""
    on_bad_input: str = "skip"
    """'skip': malformed records are skipped and counted per reason (summary with file:line examples).
    'error': stop at the first one, naming file:line."""
    overwrite_prepared: bool = False
    """Replace prepared data found in prepared_dir that was written with another tokenizer (otherwise refused:
    it may be the only copy of a long preparation)."""
    verify: bool = False
    """Check every shard's sha256 against manifest.json before using prepared data (`prepare --verify`)."""
    reset_position_ids: bool = False
    """Restart position_ids at 0 at every document start (for models that also mask across documents)."""
    document_masking: bool = False
    """Give the model each token's document (batch["document_ids"]) so attention stays within a document and
    positions restart per document; False: plain causal attention across the packed row (the usual default)."""
    prefetch: int = 2
    """Batches the loader prepares ahead in a background thread (0: none)."""

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
        _check_choice("data.packing", self.packing, PACKINGS)
        _check_choice("data.mode", self.mode, MODES)
        _check_choice("data.on_bad_input", self.on_bad_input, BAD_INPUT_POLICIES)
        if self.num_workers < -1:
            raise ConfigError(
                f"data.num_workers={self.num_workers}: use -1 (one per CPU core), 0 (in this process) or a count."
            )
        if self.chunk_chars <= 0:
            raise ConfigError(
                f"data.chunk_chars={self.chunk_chars} must be positive (a few million suits most corpora)."
            )
        if self.prefetch < 0:
            raise ConfigError(f"data.prefetch={self.prefetch} must be >= 0 (0 turns prefetching off).")
        for i, s in enumerate(self.sources):
            _check_source(i, s)
        weighted = [s.weight is not None for s in self.sources]
        if any(weighted) and not all(weighted):
            missing = [s.name for s in self.sources if s.weight is None]
            raise ConfigError(
                f"data.sources: weights are set on some sources but not on {missing}: give every source a "
                "weight (a mixture) or none (the sources are read one after the other)."
            )
        names = [s.name for s in self.sources]
        if any(weighted) and len(set(names)) != len(names):
            raise ConfigError(
                f"data.sources names {names} repeat: in a mixture each source is prepared into a directory "
                "named after it, so give every source a distinct `name`."
            )

    @property
    def is_mixture(self) -> bool:
        """True when every source has a weight: one dataset per source, mixed by the loader."""
        return bool(self.sources) and all(s.weight is not None for s in self.sources)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(
            f"{name}={value!r} is not one of {', '.join(repr(c) for c in choices)}: pick one of those."
        )


def _check_source(i: int, s: SourceConfig) -> None:
    where = f"data.sources[{i}] ({s.name!r})"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", s.name) or s.name.startswith("."):
        raise ConfigError(
            f"{where}: name={s.name!r} must be letters, digits, '_', '-' or '.' (not first): it names "
            "directories and metrics."
        )
    if s.hf_dataset is None and not s.paths:
        raise ConfigError(f"{where} has no paths: give files, directories or globs (or set hf_dataset).")
    if s.hf_dataset is not None and s.paths:
        raise ConfigError(
            f"{where} sets both paths={list(s.paths)} and hf_dataset={s.hf_dataset!r}: use one of them per "
            "source (two sources can read both)."
        )
    _check_choice(f"{where}.text_split", s.text_split, TEXT_SPLITS)
    if s.min_chars < 0:
        raise ConfigError(f"{where}.min_chars={s.min_chars} must be >= 0.")
    if s.max_chars is not None and s.max_chars < max(1, s.min_chars):
        raise ConfigError(
            f"{where}.max_chars={s.max_chars} must be >= max(1, min_chars={s.min_chars}): raise it or set null."
        )
    if s.weight is not None and not s.weight > 0:
        raise ConfigError(
            f"{where}.weight={s.weight} must be positive (leave the source out to use none of it)."
        )
    for key in ("max_files", "max_documents"):
        value = getattr(s, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{where}.{key}={value} must be positive, or null for no limit.")


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
