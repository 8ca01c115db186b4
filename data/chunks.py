"""Work units: a document stream cut, in order, into chunks that are tokenized and packed independently.

Chunk k holds the documents that follow chunk k-1's, until it has at least `chunk_chars` characters. What
goes into a chunk depends only on the document stream, and its rows only on its documents, the tokenizer
and the packing settings, so:

- any number of workers produce the same rows (each chunk is one task, results are put back in order);
- a killed `prepare` resumes at the first chunk without a finished shard, and ends with the same output;
- the online loader can restart a stream at a chunk boundary and recompute exactly the same rows.

Packing never crosses a chunk boundary: each chunk drops its own partial last row (concat packing), a
fraction of about seq_len / (2 * tokens per chunk) of the data, i.e. negligible with the default
`chunk_chars` of a few million.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from forge_lm.data.packing import PackedRows, PackStats, pack_documents
from forge_lm.data.sources import Document
from forge_lm.data.tokenizer import Tokenizer

SPLITS = ("train", "val")


def split_of(doc: Document, val_fraction: float) -> str:
    """'val' or 'train', a stable function of (source, id): the split survives reordering and new data."""
    digest = hashlib.blake2b(f"{doc.source}\x00{doc.id}".encode(), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "little") / 2**64 < val_fraction else "train"


@dataclass
class Chunk:
    """One work unit: consecutive documents of a stream."""

    index: int
    """Position of the chunk in its stream (0, 1, 2 ...)."""
    documents: list[Document] = field(default_factory=list)
    characters: int = 0


def iter_chunks(docs: Iterable[Document], chunk_chars: int) -> Iterator[Chunk]:
    """Group `docs` in order into chunks of at least `chunk_chars` characters (the last may hold fewer)."""
    chunk = Chunk(0)
    for doc in docs:
        chunk.documents.append(doc)
        chunk.characters += len(doc.text)
        if chunk.characters >= chunk_chars:
            yield chunk
            chunk = Chunk(chunk.index + 1)
    if chunk.documents:
        yield chunk


@dataclass(frozen=True)
class PackSpec:
    """Everything besides the tokenizer and the documents that decides the rows of a chunk."""

    seq_len: int
    packing: str = "concat"
    val_fraction: float = 0.0
    splits: tuple[str, ...] = SPLITS
    """The splits to produce; documents of other splits are not even tokenized."""


@dataclass
class ChunkRows:
    """The packed rows of one chunk, per split."""

    index: int
    rows: dict[str, PackedRows]
    stats: dict[str, PackStats]
    documents_per_source: dict[str, dict[str, int]]
    """split -> source name -> documents."""


def pack_chunk(chunk: Chunk, spec: PackSpec, tokenizer: Tokenizer) -> ChunkRows:
    """Split, tokenize and pack one chunk (the only heavy work of the pipeline)."""
    texts: list[str] = []
    splits: list[str] = []
    per_source: dict[str, dict[str, int]] = {s: {} for s in spec.splits}
    for doc in chunk.documents:
        split = split_of(doc, spec.val_fraction)
        if split in per_source:
            texts.append(doc.text)
            splits.append(split)
            per_source[split][doc.source] = per_source[split].get(doc.source, 0) + 1
    ids = tokenizer.encode_batch(texts)
    rows, stats = {}, {}
    for split in spec.splits:
        docs = [d for d, s in zip(ids, splits) if s == split]
        rows[split], stats[split] = pack_documents(
            docs,
            spec.seq_len,
            bos_id=tokenizer.document_bos_id,
            eos_id=tokenizer.document_eos_id,
            method=spec.packing,
        )
    return ChunkRows(chunk.index, rows, stats, per_source)


# ---------------------------------------------------------------------------------------------------------
# In worker processes. A task carries everything but the tokenizer, which is sent once per process (an
# initializer) and looked up by its key: several pools with different settings can share a process.
# ---------------------------------------------------------------------------------------------------------

_TOKENIZERS: dict[str, Tokenizer] = {}


def tokenizer_key(tokenizer: Tokenizer) -> str:
    """What identifies a tokenizer for packing: its vocabulary and merges, and its BOS/EOS policy."""
    return tokenizer.fingerprint + json.dumps(tokenizer.policy, sort_keys=True)


def register_tokenizer(tokenizer: Tokenizer) -> None:
    """Pool initializer: make `tokenizer` available to the tasks run in this process."""
    _TOKENIZERS[tokenizer_key(tokenizer)] = tokenizer


def registered_tokenizer(key: str) -> Tokenizer:
    return _TOKENIZERS[key]


@dataclass(frozen=True)
class PackTask:
    """One chunk to pack (the online loader's work unit)."""

    chunk: Chunk
    spec: PackSpec
    tokenizer: str
    """`tokenizer_key` of a registered tokenizer."""


def run_pack_task(task: PackTask) -> ChunkRows:
    return pack_chunk(task.chunk, task.spec, _TOKENIZERS[task.tokenizer])
