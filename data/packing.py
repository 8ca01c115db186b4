"""Packing documents into fixed-length training rows.

Documents are concatenated, each followed by EOS, into one token stream that is cut into consecutive,
non-overlapping rows of seq_len + 1 tokens: the model reads row[:-1] and predicts row[1:]. No token is
padding, so no compute is wasted; a document longer than a row simply continues in the next one.
Each row also records where documents begin inside it (`doc_starts`), so the loader can restart
position ids (or a kernel could mask attention) at document boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PackedSequence:
    """One training row."""

    tokens: np.ndarray
    """Token ids, shape (seq_len + 1,): inputs are tokens[:-1], labels tokens[1:]."""
    doc_starts: np.ndarray
    """int32 offsets in [0, seq_len] where a document begins, sorted and unique. Always starts with 0,
    even when the row begins in the middle of a document (that is where its visible part begins)."""


class ConcatPacker:
    """Concatenate documents (each + EOS) and cut the stream into rows of seq_len + 1 tokens.

    Only the row being filled is buffered, so memory is O(seq_len) whatever the document length and
    each token is copied once. The partial row left at the end is dropped by `flush` (and counted):
    padding it would teach the model to predict padding.
    """

    def __init__(self, seq_len: int, eos_id: int) -> None:
        if seq_len <= 0:
            raise ValueError(f"seq_len={seq_len} must be positive.")
        self.seq_len = seq_len
        self.eos_id = eos_id
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
        """Append a document's ids and EOS; return the rows completed by it (often none, maybe many)."""
        doc = np.empty(len(ids) + 1, dtype=np.int64)
        doc[:-1] = ids
        doc[-1] = self.eos_id
        self.documents += 1
        if self._fill > 0:  # at _fill == 0 the start is the 0 that every row begins with
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
