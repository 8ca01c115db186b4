"""data.shards: the packed-v2 format round trip (padded rows included), dtype choice, integrity checks and
atomic writes."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from forge_lm.data.packing import ConcatPacker, PackedSequence, pack_documents
from forge_lm.data.shards import ShardDataset, ShardWriter, build_manifest, write_shard
from forge_lm.data.sources import DataError
from forge_lm.data.tokenizer import Tokenizer

SEQ_LEN = 32


@pytest.fixture(scope="module")
def rows(small_tokenizer: Tokenizer, shakespeare_docs) -> list[PackedSequence]:
    """~45 real packed rows: Shakespeare scenes tokenized and packed."""
    packer = ConcatPacker(SEQ_LEN, small_tokenizer.eos_id)
    ids = small_tokenizer.encode_batch([d.text for d in shakespeare_docs[100:103]])
    out = [row for doc in ids for row in packer.add(doc)][:45]
    assert len(out) == 45
    return out


def _write(
    out_dir: Path, rows: list[PackedSequence], vocab_size: int = 1024, shard_sequences: int = 10
) -> dict:
    writer = ShardWriter(str(out_dir), SEQ_LEN, vocab_size, shard_sequences, "fp", extra={"note": "test"})
    for row in rows:
        writer.write(row)
    return writer.close(num_documents=3, dropped_tokens=7)


def test_round_trip(tmp_path: Path, rows: list[PackedSequence]) -> None:
    manifest = _write(tmp_path, rows)
    assert manifest["format"] == "packed-v2"
    assert manifest["num_sequences"] == 45 and manifest["num_tokens"] == 45 * (SEQ_LEN + 1)
    assert manifest["num_padding_tokens"] == 0 and manifest["packing"] == "concat"
    assert all(set(s["sha256"]) == {"tokens", "bounds", "offsets"} for s in manifest["shards"])
    assert (manifest["num_documents"], manifest["dropped_tokens"]) == (3, 7)
    assert [s["name"] for s in manifest["shards"]] == [f"shard_{k:05d}" for k in range(5)]
    assert [s["num_sequences"] for s in manifest["shards"]] == [10, 10, 10, 10, 5]
    assert manifest["extra"] == {"note": "test"}
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    assert len(os.listdir(tmp_path)) == 5 * 3 + 1

    ds = ShardDataset(str(tmp_path))
    assert len(ds) == 45 and ds.seq_len == SEQ_LEN and ds.manifest == manifest
    for i, row in enumerate(rows):
        got = ds[i]
        assert got.tokens.dtype == np.int64
        np.testing.assert_array_equal(got.tokens, row.tokens)
        np.testing.assert_array_equal(got.doc_starts, row.doc_starts)
    np.testing.assert_array_equal(ds[-1].tokens, rows[-1].tokens)
    with pytest.raises(IndexError):
        ds[45]
    ds.verify()
    # a pickled copy (as sent to a worker process) maps the files again
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(ds))[44].tokens, rows[44].tokens)


def test_format_is_plain_arrays(tmp_path: Path, rows: list[PackedSequence]) -> None:
    _write(tmp_path, rows)
    tokens = np.fromfile(tmp_path / "shard_00001.tokens.bin", dtype=np.uint16).reshape(-1, SEQ_LEN + 1)
    np.testing.assert_array_equal(tokens, np.stack([r.tokens for r in rows[10:20]]))
    offsets = np.fromfile(tmp_path / "shard_00001.offsets.bin", dtype=np.int64)
    bounds = np.fromfile(tmp_path / "shard_00001.bounds.bin", dtype=np.int32)
    assert len(offsets) == 11 and offsets[0] == 0 and offsets[-1] == len(bounds)
    # a row's document starts, then its length (where padding would begin)
    np.testing.assert_array_equal(bounds[offsets[3] : offsets[4]], [*rows[13].doc_starts, SEQ_LEN + 1])


@pytest.mark.parametrize("vocab_size, dtype", [(65536, "uint16"), (65537, "uint32"), (151669, "uint32")])
def test_dtype_follows_vocab_size(tmp_path: Path, vocab_size: int, dtype: str) -> None:
    top = vocab_size - 1
    row = PackedSequence(np.array([top] * (SEQ_LEN + 1), dtype=np.int64), np.array([0], dtype=np.int32))
    manifest = _write(tmp_path, [row], vocab_size=vocab_size)
    assert manifest["dtype"] == dtype
    assert os.path.getsize(tmp_path / "shard_00000.tokens.bin") == (SEQ_LEN + 1) * np.dtype(dtype).itemsize
    assert ShardDataset(str(tmp_path))[0].tokens.tolist() == [top] * (SEQ_LEN + 1)


@pytest.mark.parametrize("bad", [1024, 70_000, -1])
def test_token_ids_outside_the_vocabulary_are_rejected(tmp_path: Path, rows, bad: int) -> None:
    tokens = rows[0].tokens.copy()
    tokens[5] = bad
    writer = ShardWriter(str(tmp_path), SEQ_LEN, 1024, 10, "fp")
    writer.write(rows[1])
    with pytest.raises(DataError, match=f"sequence #1 holds token id {bad}, outside \\[0, 1024\\)"):
        writer.write(PackedSequence(tokens, rows[0].doc_starts))


def test_wrong_row_length_is_rejected(tmp_path: Path, rows) -> None:
    writer = ShardWriter(str(tmp_path), SEQ_LEN + 1, 1024, 10, "fp")
    with pytest.raises(DataError, match="same seq_len"):
        writer.write(rows[0])


@pytest.mark.parametrize("kind", ["tokens", "bounds"])
def test_verify_catches_a_flipped_byte(tmp_path: Path, rows, kind: str) -> None:
    _write(tmp_path, rows)
    ShardDataset(str(tmp_path)).verify()
    path = tmp_path / f"shard_00003.{kind}.bin"
    data = bytearray(path.read_bytes())
    data[2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"shard shard_00003 .*shard_00003.{kind}.bin.* is corrupt"):
        ShardDataset(str(tmp_path)).verify()


def test_an_out_of_range_token_id_in_a_shard_is_named_when_read(tmp_path: Path, rows) -> None:
    """Without data.verify, a shard whose bytes were changed after writing still cannot feed the model an id
    beyond the vocabulary: reading the batch names the shard file and row."""
    _write(tmp_path, rows, vocab_size=1024)
    path = tmp_path / "shard_00002.tokens.bin"
    tokens = np.fromfile(path, dtype=np.uint16)
    tokens[3 * (SEQ_LEN + 1) + 5] = 5000  # row 3 of shard 2: global row 23
    tokens.tofile(path)
    ds = ShardDataset(str(tmp_path))
    ds.take([0, 1, 22])  # untouched rows read fine
    with pytest.raises(
        DataError, match=r"shard_00002.tokens.bin row 3 holds token id 5000, outside the vocabulary of 1024"
    ):
        ds.take([0, 23, 5])


def test_missing_manifest_says_to_run_prepare(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"no manifest.json in {tmp_path}: run `forge prepare` first"):
        ShardDataset(str(tmp_path))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: "{not json", "malformed"),
        (
            lambda m: json.dumps({k: v for k, v in m.items() if k != "seq_len"}),
            "missing keys \\['seq_len'\\]",
        ),
        (lambda m: json.dumps({**m, "format": "packed-v1"}), "format 'packed-v1' is not 'packed-v2'"),
        (lambda m: json.dumps({**m, "num_sequences": 44}), "num_sequences=44 but the shards hold 45"),
    ],
)
def test_malformed_manifest_names_the_file(tmp_path: Path, rows, edit, message) -> None:
    manifest = _write(tmp_path, rows)
    (tmp_path / "manifest.json").write_text(edit(manifest))
    with pytest.raises(DataError, match=f"{tmp_path}/manifest.json.*{message}"):
        ShardDataset(str(tmp_path))


def test_truncated_or_missing_shard_is_reported(tmp_path: Path, rows) -> None:
    _write(tmp_path, rows)
    with open(tmp_path / "shard_00002.tokens.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError, match="shard_00002.tokens.bin has 100 bytes"):
        ShardDataset(str(tmp_path))
    os.remove(tmp_path / "shard_00002.tokens.bin")
    with pytest.raises(DataError, match="shard_00002.tokens.bin is missing"):
        ShardDataset(str(tmp_path))


def test_rewriting_a_directory_removes_the_stale_manifest_first(tmp_path: Path, rows) -> None:
    _write(tmp_path, rows)
    writer = ShardWriter(str(tmp_path), SEQ_LEN, 1024, 10, "fp")
    writer.write(rows[0])
    # until close(), the directory is not a dataset: the old manifest would describe new shard files
    assert not (tmp_path / "manifest.json").exists()
    writer.close(num_documents=1)
    assert len(ShardDataset(str(tmp_path))) == 1


def test_empty_split(tmp_path: Path) -> None:
    manifest = ShardWriter(str(tmp_path), SEQ_LEN, 1024, 10, "fp").close(num_documents=0)
    assert manifest["shards"] == [] and manifest["num_sequences"] == 0
    assert len(ShardDataset(str(tmp_path))) == 0


def test_padded_rows_round_trip(tmp_path: Path, small_tokenizer: Tokenizer, shakespeare_docs) -> None:
    ids = small_tokenizer.encode_batch([d.text[:300] for d in shakespeare_docs[:40]])
    packed, stats = pack_documents(ids, SEQ_LEN * 4, None, small_tokenizer.eos_id, method="best_fit")
    assert stats.padding_tokens > 0
    entry = write_shard(str(tmp_path), "shard_x", packed, vocab_size=1024)
    manifest = build_manifest(
        [entry],
        seq_len=SEQ_LEN * 4,
        vocab_size=1024,
        tokenizer_fingerprint="fp",
        packing="best_fit",
        num_documents=40,
        dropped_tokens=0,
    )
    assert manifest["num_tokens"] == stats.tokens and manifest["num_padding_tokens"] == stats.padding_tokens
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    ds = ShardDataset(str(tmp_path))
    ds.verify()
    for i in range(len(packed)):
        want, got = packed.row(i), ds[i]
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_array_equal(got.doc_starts, want.doc_starts)
        assert got.length == want.length <= SEQ_LEN * 4 + 1
    batch = ds.take([2, 0, 2])
    np.testing.assert_array_equal(batch.lengths, packed.lengths[[2, 0, 2]])
