"""Packing documents into fixed-length training rows.

Every document is framed as `[BOS] + ids + [EOS]` (by the tokenizer's policy, see data/tokenizer.py) and
the framed documents are placed into rows of seq_len + 1 tokens: the model reads row[:-1] and predicts
row[1:]. Two ways:

- concat (default): the framed documents are concatenated into one stream that is cut into consecutive
  rows. No token is padding, so no compute is wasted; a document longer than a row, or one that starts
  near a row's end, simply continues in the next row. The partial row left at the end is dropped.
- best-fit decreasing ("Fewer Truncations Improve Language Modeling", Ding et al., 2024): documents longer
  than a row are cut into row-sized pieces, and the remaining pieces, longest first, each go into the row
  with the least free space that still fits them (a new row if none does). A document is only ever cut
  where it is longer than a row; the rest of a row is padding, which the loader leaves out of the loss.

Each row records its document boundaries, so that the loader can restart position ids and the model can
block attention across documents: `doc_starts` (where each document, or piece of one, begins in the row)
and `length` (where the padding begins; the whole row for concat packing).

Two interfaces: `pack_documents` packs a whole batch of documents at once with numpy (what `prepare` and
the online loader use on each work unit), and `ConcatPacker` packs a stream one document at a time.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass
class PackedSequence:
    """One training row."""

    tokens: np.ndarray
    """Token ids, shape (seq_len + 1,): inputs are tokens[:-1], labels tokens[1:]."""
    doc_starts: np.ndarray
    """int32 offsets in [0, seq_len] where a document begins, sorted and unique. Always starts with 0,
    even when the row begins in the middle of a document (that is where its visible part begins)."""
    length: Optional[int] = None
    """Tokens that are not padding (tokens[length:] is padding); None means the whole row."""

    def __post_init__(self) -> None:
        if self.length is None:
            self.length = len(self.tokens)


@dataclass
class PackedRows:
    """Many rows as three arrays: what a work unit produces and a shard stores.

    Row i's document boundaries are `bounds[offsets[i]:offsets[i + 1]]`: the start of each document in the
    row (the first is 0), then the row's length, where its padding begins (row_len when it has none).
    Document j of the row spans [b[j], b[j + 1]).
    """

    tokens: np.ndarray
    """(n, row_len) token ids."""
    bounds: np.ndarray
    """int32, the boundaries of all rows, concatenated."""
    offsets: np.ndarray
    """int64, n + 1 entries."""

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def lengths(self) -> np.ndarray:
        """Real (non-padding) tokens of each row."""
        return self.bounds[self.offsets[1:] - 1]

    def row(self, i: int) -> PackedSequence:
        b = self.bounds[self.offsets[i] : self.offsets[i + 1]]
        return PackedSequence(self.tokens[i], b[:-1].astype(np.int32), int(b[-1]))

    def take(self, indices: np.ndarray) -> PackedRows:
        """The rows at `indices`, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        counts = np.diff(self.offsets)[indices]
        offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        # index of every bound of the selected rows in self.bounds
        within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], counts)
        source = np.repeat(self.offsets[indices], counts) + within
        return PackedRows(self.tokens[indices], self.bounds[source], offsets)

    @staticmethod
    def concatenate(parts: Sequence[PackedRows]) -> PackedRows:
        """The rows of all `parts`, one after the other."""
        counts = np.concatenate([np.diff(p.offsets) for p in parts])
        offsets = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        tokens = np.concatenate([p.tokens for p in parts])
        return PackedRows(tokens, np.concatenate([p.bounds for p in parts]), offsets)

    @staticmethod
    def from_sequences(rows: Sequence[PackedSequence], row_len: int) -> PackedRows:
        tokens = np.stack([r.tokens for r in rows]) if rows else np.zeros((0, row_len), dtype=np.int64)
        parts = [np.append(np.asarray(r.doc_starts, dtype=np.int32), np.int32(r.length)) for r in rows]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in parts], out=offsets[1:])
        bounds = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        return PackedRows(tokens, bounds.astype(np.int32), offsets)


@dataclass
class PackStats:
    """What packing did with the tokens it was given."""

    documents: int = 0
    """Documents packed."""
    tokens: int = 0
    """Real tokens in the rows (BOS/EOS included, padding not)."""
    dropped_tokens: int = 0
    """Tokens left out: the partial last row of concat packing."""
    padding_tokens: int = 0
    """Padding added by best-fit packing."""
    split_documents: int = 0
    """Documents that did not fit in one row and were cut into pieces."""


def _frame(
    docs: Sequence[Sequence[int]], bos_id: Optional[int], eos_id: Optional[int]
) -> tuple[np.ndarray, np.ndarray]:
    """The framed documents as one flat uint32 stream, and where each begins in it.

    One np.fromiter over all ids: no Python work per token beyond reading the tokenizer's lists.
    """
    head = [] if bos_id is None else [bos_id]
    tail = [] if eos_id is None else [eos_id]
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs)) + len(head) + len(tail)
    total = int(lengths.sum())
    parts = itertools.chain.from_iterable((head, d, tail) for d in docs)
    flat = np.fromiter(itertools.chain.from_iterable(parts), dtype=np.uint32, count=total)
    begins = np.zeros(len(docs), dtype=np.int64)
    np.cumsum(lengths[:-1], out=begins[1:])
    return flat, begins


def _concat(flat: np.ndarray, begins: np.ndarray, row_len: int) -> tuple[PackedRows, PackStats]:
    n_rows = len(flat) // row_len
    end = n_rows * row_len
    tokens = flat[:end].reshape(n_rows, row_len)
    # Boundaries as (row, offset in row) pairs: 0 and row_len for every row, plus the documents that begin
    # inside a row (a document beginning exactly at a row start is that row's 0).
    inner = begins[(begins < end) & (begins % row_len != 0)]
    rows = np.concatenate([np.arange(n_rows), inner // row_len, np.arange(n_rows)])
    local = np.concatenate(
        [np.zeros(n_rows, dtype=np.int64), inner % row_len, np.full(n_rows, row_len, dtype=np.int64)]
    )
    order = np.lexsort((local, rows))
    counts = np.bincount(rows, minlength=n_rows)
    offsets = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    stats = PackStats(tokens=end, dropped_tokens=len(flat) - end)
    return PackedRows(tokens, local[order].astype(np.int32), offsets), stats


def _best_fit(
    flat: np.ndarray, begins: np.ndarray, row_len: int, pad_id: int
) -> tuple[PackedRows, PackStats]:
    ends = np.append(begins[1:], len(flat))
    # Pieces (start in flat, length): row-sized pieces of long documents, then every document's remainder.
    pieces: list[tuple[int, int]] = []
    split = 0
    for b, e in zip(begins.tolist(), ends.tolist()):
        if e - b > row_len:
            split += 1
        while e - b >= row_len:
            pieces.append((b, row_len))
            b += row_len
        if e > b:
            pieces.append((b, e - b))
    # Longest first; equal lengths keep their document order (a stable sort), so the result is deterministic.
    order = sorted(range(len(pieces)), key=lambda i: -pieces[i][1])

    rows: list[list[tuple[int, int]]] = []  # the pieces placed in each row
    free: list[int] = []  # free space of each row
    by_space: dict[int, list[int]] = {}  # free space -> rows with exactly that much, oldest first
    spaces: list[int] = []  # sorted distinct free spaces of rows that still have some
    for i in order:
        start, size = pieces[i]
        k = bisect.bisect_left(spaces, size)  # the tightest row that still fits the piece
        if k < len(spaces):
            space = spaces[k]
            row = by_space[space].pop(0)
            if not by_space[space]:
                del by_space[space]
                spaces.pop(k)
        else:
            row, space = len(rows), row_len
            rows.append([])
            free.append(row_len)
        rows[row].append((start, size))
        free[row] = space - size
        if free[row] > 0:
            if free[row] not in by_space:
                bisect.insort(spaces, free[row])
                by_space[free[row]] = []
            by_space[free[row]].append(row)

    tokens = np.full((len(rows), row_len), pad_id, dtype=np.uint32)
    bounds: list[int] = []
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    for r, placed in enumerate(rows):
        at = 0
        for start, size in placed:
            tokens[r, at : at + size] = flat[start : start + size]
            bounds.append(at)
            at += size
        bounds.append(at)
        offsets[r + 1] = len(bounds)
    padding = len(rows) * row_len - len(flat)
    stats = PackStats(tokens=len(flat), padding_tokens=padding, split_documents=split)
    return PackedRows(tokens, np.asarray(bounds, dtype=np.int32), offsets), stats


def pack_documents(
    docs: Sequence[Sequence[int]],
    seq_len: int,
    bos_id: Optional[int],
    eos_id: Optional[int],
    method: str = "concat",
    pad_id: Optional[int] = None,
) -> tuple[PackedRows, PackStats]:
    """Frame `docs` (lists of token ids) with BOS/EOS and pack them into rows of seq_len + 1 tokens.

    `method` is 'concat' or 'best_fit' (see the module docstring); padding uses `pad_id` (default: EOS, or 0).
    The result depends only on the arguments, so every worker that packs the same documents gets the same rows.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len} must be positive.")
    row_len = seq_len + 1
    docs = [d for d in docs if len(d) or bos_id is not None or eos_id is not None]
    flat, begins = _frame(docs, bos_id, eos_id)
    if method == "concat":
        packed, stats = _concat(flat, begins, row_len)
    elif method == "best_fit":
        pad = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
        packed, stats = _best_fit(flat, begins, row_len, pad)
    else:
        raise ValueError(f"packing method {method!r} is not 'concat' or 'best_fit'.")
    stats.documents = len(docs)
    return packed, stats


class ConcatPacker:
    """Concatenate documents ([BOS] + ids + EOS) and cut the stream into rows of seq_len + 1 tokens.

    Only the row being filled is buffered, so memory is O(seq_len) whatever the document length and
    each token is copied once. The partial row left at the end is dropped by `flush` (and counted):
    padding it would teach the model to predict padding.
    """

    def __init__(self, seq_len: int, eos_id: Optional[int], bos_id: Optional[int] = None) -> None:
        if seq_len <= 0:
            raise ValueError(f"seq_len={seq_len} must be positive.")
        self.seq_len = seq_len
        self.eos_id = eos_id
        self.bos_id = bos_id
        self.row_len = seq_len + 1
        self._row = np.empty(self.row_len, dtype=np.int64)
        self._fill = 0  # tokens already in self._row
        self._starts: list[int] = [0]  # doc_starts of the row being filled
        self.documents = 0
        """Documents added so far."""
        self.tokens = 0
        """Tokens emitted in completed rows."""
        self.dropped_tokens = 0
        """Tokens of partial rows discarded by `flush`."""

    def add(self, ids: list[int] | np.ndarray) -> list[PackedSequence]:
        """Append a document's framed ids; return the rows completed by it (often none, maybe many)."""
        head = 0 if self.bos_id is None else 1
        tail = 0 if self.eos_id is None else 1
        doc = np.empty(head + len(ids) + tail, dtype=np.int64)
        if head:
            doc[0] = self.bos_id
        doc[head : head + len(ids)] = ids
        if tail:
            doc[-1] = self.eos_id
        self.documents += 1
        if self._fill > 0 and len(doc):  # at _fill == 0 the start is the 0 that every row begins with
            self._starts.append(self._fill)

        rows: list[PackedSequence] = []
        pos = 0
        while pos < len(doc):
            take = min(self.row_len - self._fill, len(doc) - pos)
            self._row[self._fill : self._fill + take] = doc[pos : pos + take]
            self._fill += take
            pos += take
            if self._fill == self.row_len:
                rows.append(PackedSequence(self._row.copy(), np.asarray(self._starts, dtype=np.int32)))
                self.tokens += self.row_len
                self._fill = 0
                self._starts = [0]
        return rows

    def flush(self) -> None:
        """Discard the partial last row (counted in `dropped_tokens`); the packer can be reused after."""
        self.dropped_tokens += self._fill
        self._fill = 0
        self._starts = [0]
