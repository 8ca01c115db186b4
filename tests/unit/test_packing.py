"""data.packing: concat rows are exact slices of the framed document stream; best-fit rows hold whole
documents (cut only when longer than a row), padded; both record every document boundary."""

from __future__ import annotations

import time

import numpy as np
import pytest

from forge_lm.data.packing import ConcatPacker, PackedRows, PackedSequence, pack_documents
from forge_lm.data.tokenizer import Tokenizer

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


# --------------------------------------------------------------------------------------------------------
# pack_documents: whole work units at once
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [7, 64, 1000])
def test_vectorized_concat_equals_the_streaming_packer(docs: list[list[int]], seq_len: int) -> None:
    packer, rows = _pack(docs, seq_len)
    packed, stats = pack_documents(docs, seq_len, bos_id=None, eos_id=EOS)
    assert len(packed) == len(rows) and stats.documents == len(docs)
    assert (stats.tokens, stats.dropped_tokens, stats.padding_tokens) == (
        packer.tokens,
        packer.dropped_tokens,
        0,
    )
    for i, row in enumerate(rows):
        got = packed.row(i)
        np.testing.assert_array_equal(got.tokens, row.tokens)
        np.testing.assert_array_equal(got.doc_starts, row.doc_starts)
        assert got.length == seq_len + 1


def test_bos_and_eos_framing(docs: list[list[int]]) -> None:
    bos = 1023
    packed, _ = pack_documents(docs[:5], 10_000, bos_id=bos, eos_id=EOS)
    stream = np.concatenate([[bos, *d, EOS] for d in docs[:5]])
    row = packed.row(0)
    np.testing.assert_array_equal(row.tokens, stream[:10_001])
    # every document starts at its BOS
    np.testing.assert_array_equal(row.doc_starts, np.flatnonzero(row.tokens == bos))
    streaming = ConcatPacker(10_000, EOS, bos_id=bos)
    (first,) = [r for d in docs[:5] for r in streaming.add(d)][:1]
    np.testing.assert_array_equal(first.tokens, row.tokens)
    # no separator at all: documents run into each other, but their boundaries are still recorded
    packed, _ = pack_documents([[5, 6], [7], [8, 9, 10]], 5, bos_id=None, eos_id=None)
    np.testing.assert_array_equal(packed.row(0).tokens, [5, 6, 7, 8, 9, 10])
    np.testing.assert_array_equal(packed.row(0).doc_starts, [0, 2, 3])


def _documents_of(packed: PackedRows) -> list[np.ndarray]:
    """Every (piece of a) document in the rows, by the recorded boundaries."""
    out = []
    for i in range(len(packed)):
        b = packed.bounds[packed.offsets[i] : packed.offsets[i + 1]]
        out += [packed.tokens[i, b[j] : b[j + 1]].astype(np.int64) for j in range(len(b) - 1)]
    return out


@pytest.mark.parametrize("seq_len", [64, 255, 1000])
def test_best_fit_keeps_documents_whole(docs: list[list[int]], seq_len: int) -> None:
    row_len = seq_len + 1
    framed = [np.array([*d, EOS], dtype=np.int64) for d in docs]
    packed, stats = pack_documents(docs, seq_len, bos_id=None, eos_id=EOS, method="best_fit", pad_id=EOS)
    lengths = packed.lengths
    assert np.all(lengths <= row_len) and np.all(lengths > 0)
    assert stats.tokens == sum(map(len, framed)) == lengths.sum()  # nothing dropped...
    assert stats.padding_tokens == len(packed) * row_len - lengths.sum()  # ...the rest is padding
    assert stats.dropped_tokens == 0
    assert np.all(packed.tokens[np.arange(row_len)[None, :] >= lengths[:, None]] == EOS)

    # Documents that fit in a row are whole in one row; longer ones are cut into row-sized pieces + rest.
    pieces = sorted(p.tobytes() for p in _documents_of(packed))
    expected = []
    for d in framed:
        expected += [d[i : i + row_len].tobytes() for i in range(0, len(d), row_len)]
    assert pieces == sorted(expected)
    assert stats.split_documents == sum(len(d) > row_len for d in framed)

    # Fewer documents cut than concat packing, at a small padding cost.
    concat, _ = pack_documents(docs, seq_len, bos_id=None, eos_id=EOS)
    cut_by_concat = sum(len(concat.row(i).doc_starts) for i in range(len(concat))) - len(docs)
    assert stats.split_documents <= cut_by_concat
    assert stats.padding_tokens < 0.25 * stats.tokens
    # deterministic
    again, _ = pack_documents(docs, seq_len, bos_id=None, eos_id=EOS, method="best_fit", pad_id=EOS)
    np.testing.assert_array_equal(again.tokens, packed.tokens)
    np.testing.assert_array_equal(again.bounds, packed.bounds)


def test_best_fit_picks_the_tightest_row() -> None:
    # framed lengths (ids + EOS): 6, 5, 4, 3, 2 into rows of 8: 6+2, 5+3, 4
    docs = [[1] * 5, [2] * 4, [3] * 3, [4] * 2, [5] * 1]
    packed, stats = pack_documents(docs, 7, bos_id=None, eos_id=EOS, method="best_fit", pad_id=99)
    assert [packed.row(i).tokens.tolist() for i in range(len(packed))] == [
        [1, 1, 1, 1, 1, EOS, 5, EOS],
        [2, 2, 2, 2, EOS, 4, 4, EOS],
        [3, 3, 3, EOS, 99, 99, 99, 99],
    ]
    assert [packed.row(i).doc_starts.tolist() for i in range(3)] == [[0, 6], [0, 5], [0]]
    assert packed.lengths.tolist() == [8, 8, 4] and stats.padding_tokens == 4


def test_rows_take_and_concatenate(docs: list[list[int]]) -> None:
    packed, _ = pack_documents(docs, 50, bos_id=None, eos_id=EOS, method="best_fit")
    order = np.random.default_rng(0).permutation(len(packed))
    shuffled = packed.take(order)
    both = PackedRows.concatenate([shuffled, packed.take([3, 1])])
    for j, i in enumerate([*order.tolist(), 3, 1]):
        np.testing.assert_array_equal(both.row(j).tokens, packed.row(i).tokens)
        np.testing.assert_array_equal(both.row(j).doc_starts, packed.row(i).doc_starts)
        assert both.row(j).length == packed.row(i).length


def test_a_work_unit_of_a_million_tokens_packs_fast() -> None:
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 50_000, size=n).tolist() for n in rng.integers(1, 4000, size=500)]
    for method in ("concat", "best_fit"):
        start = time.perf_counter()
        packed, stats = pack_documents(docs, 2048, bos_id=None, eos_id=EOS, method=method)
        elapsed = time.perf_counter() - start
        assert stats.tokens + stats.dropped_tokens == sum(map(len, docs)) + len(docs)
        assert elapsed < 1.0, f"{method} packing of ~1M tokens took {elapsed:.2f}s"
