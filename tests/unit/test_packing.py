"""data.packing: rows are exact, non-overlapping slices of the doc+EOS stream, with correct doc_starts."""

from __future__ import annotations

import time

import numpy as np
import pytest

from data.packing import ConcatPacker, PackedSequence
from data.tokenizer import Tokenizer

EOS = 0


@pytest.fixture(scope="module")
def docs(small_tokenizer: Tokenizer, shakespeare_docs, stdlib_docs) -> list[list[int]]:
    """Real token ids of a mix of short and long documents."""
    texts = [d.text for d in shakespeare_docs[40:70]] + [d.text for d in stdlib_docs] + ["", "a"]
    return small_tokenizer.encode_batch(texts)


def _pack(docs: list[list[int]], seq_len: int) -> tuple[ConcatPacker, list[PackedSequence]]:
    packer = ConcatPacker(seq_len, EOS)
    rows = [row for ids in docs for row in packer.add(ids)]
    packer.flush()
    return packer, rows


@pytest.mark.parametrize("seq_len", [1, 7, 64, 1000])
def test_rows_are_the_document_stream_cut_into_pieces(docs: list[list[int]], seq_len: int) -> None:
    packer, rows = _pack(docs, seq_len)
    stream = np.concatenate([np.array([*ids, EOS], dtype=np.int64) for ids in docs])
    # where each document begins in the stream
    doc_begin = np.cumsum([0] + [len(ids) + 1 for ids in docs[:-1]])

    row_len = seq_len + 1
    assert len(rows) == len(stream) // row_len
    assert packer.documents == len(docs)
    assert packer.tokens == len(rows) * row_len
    assert packer.dropped_tokens == len(stream) % row_len

    tokens = np.stack([row.tokens for row in rows])
    np.testing.assert_array_equal(tokens.reshape(-1), stream[: len(rows) * row_len])

    for row in rows:
        assert row.doc_starts.dtype == np.int32
        assert row.doc_starts[0] == 0 and row.doc_starts[-1] <= seq_len
        assert np.all(np.diff(row.doc_starts) > 0)  # sorted, unique
    # in stream coordinates: every row start and every document start inside the emitted rows
    got = np.concatenate([row.doc_starts + k * row_len for k, row in enumerate(rows)])
    end = len(rows) * row_len
    np.testing.assert_array_equal(got, np.union1d(np.arange(0, end, row_len), doc_begin[doc_begin < end]))


def test_document_ending_on_a_row_boundary() -> None:
    packer = ConcatPacker(seq_len=3, eos_id=EOS)
    (row,) = packer.add([5, 6, 7])  # 3 tokens + EOS fill the row exactly
    np.testing.assert_array_equal(row.tokens, [5, 6, 7, EOS])
    np.testing.assert_array_equal(row.doc_starts, [0])
    assert packer.add([8]) == []
    (row,) = packer.add([9, 10])
    np.testing.assert_array_equal(row.tokens, [8, EOS, 9, 10])
    np.testing.assert_array_equal(row.doc_starts, [0, 2])
    assert packer.add([]) == []  # an empty document still contributes its EOS
    (row,) = packer.add([11])
    np.testing.assert_array_equal(row.tokens, [EOS, EOS, 11, EOS])  # row starts with the EOS of [9, 10]
    np.testing.assert_array_equal(row.doc_starts, [0, 1, 2])


def test_flush_drops_and_counts_the_partial_row() -> None:
    packer = ConcatPacker(seq_len=4, eos_id=EOS)
    assert packer.add([1, 2]) == []
    packer.flush()
    assert packer.dropped_tokens == 3
    packer.flush()
    assert packer.dropped_tokens == 3
    (row,) = packer.add([1, 2, 3, 4])  # a fresh row after flush
    np.testing.assert_array_equal(row.tokens, [1, 2, 3, 4, EOS])
    np.testing.assert_array_equal(row.doc_starts, [0])


def test_rows_do_not_alias_the_buffer() -> None:
    packer = ConcatPacker(seq_len=2, eos_id=EOS)
    first = packer.add([1, 2])
    packer.add([3, 4])
    np.testing.assert_array_equal(first[0].tokens, [1, 2, EOS])


def test_a_million_token_document_packs_fast() -> None:
    ids = np.random.default_rng(0).integers(1, 50_000, size=1_000_000).tolist()
    packer = ConcatPacker(seq_len=128, eos_id=EOS)
    start = time.perf_counter()
    rows = packer.add(ids)
    elapsed = time.perf_counter() - start
    assert len(rows) == 1_000_001 // 129
    np.testing.assert_array_equal(rows[-1].tokens, ids[(len(rows) - 1) * 129 : len(rows) * 129])
    assert elapsed < 2.0, f"packing 1M tokens took {elapsed:.2f}s"
