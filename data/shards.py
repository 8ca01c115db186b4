"""Packed rows on disk: the "packed-v2" shard format, its writers and its reader.

A prepared split is a directory (the format is documented for users in docs/data.md):

    manifest.json                    written last; a directory without it is not a dataset
    shard_000000_00.tokens.bin       token ids, raw little-endian array of shape (n, seq_len + 1), row-major;
                                     dtype uint16 when vocab_size <= 65536, else uint32 (manifest "dtype")
    shard_000000_00.bounds.bin       int32: every row's document boundaries, concatenated: the start of each
                                     document in the row (the first is 0), then the row's length (where its
                                     padding begins; seq_len + 1 when it has none)
    shard_000000_00.offsets.bin      int64, n + 1 entries: row i's boundaries are bounds[offsets[i]:offsets[i+1]]
    ...

manifest.json:

    {"format": "packed-v2", "seq_len": int, "dtype": "uint16" | "uint32", "vocab_size": int,
     "tokenizer_fingerprint": str, "packing": "concat" | "best_fit",
     "num_sequences": int, "num_tokens": int (real tokens, padding excluded), "num_padding_tokens": int,
     "num_documents": int, "dropped_tokens": int,
     "shards": [{"name": str, "num_sequences": int, "num_tokens": int,
                 "sha256": {"tokens": hex, "bounds": hex, "offsets": hex}}],
     "extra": {...free-form: the tokenizer policy, the input report, the config fingerprint of data.prepare}}

Every file is written under a temporary name and renamed with `os.replace`, the manifest after all shards,
so a reader never sees a partially written file under its final name. The token files are plain arrays
read with `np.memmap`: opening a dataset costs nothing, and the OS page cache is shared by all the
data-parallel ranks of a node.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional

import numpy as np

from forge_lm.data.packing import PackedRows, PackedSequence
from forge_lm.data.report import DataError

FORMAT = "packed-v2"
MANIFEST = "manifest.json"
SHARD_FILES = ("tokens", "bounds", "offsets")
_REQUIRED_KEYS = (
    "format",
    "seq_len",
    "dtype",
    "vocab_size",
    "tokenizer_fingerprint",
    "num_sequences",
    "shards",
)


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id < vocab_size: uint16 up to 65536 tokens."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def shard_paths(directory: str, name: str) -> dict[str, str]:
    """kind ('tokens', 'bounds', 'offsets') -> path of that file of shard `name`."""
    base = os.path.join(directory, name)
    return {kind: f"{base}.{kind}.bin" for kind in SHARD_FILES}


def _tmp_name(path: str) -> str:
    # Unique per process: a worker left running by a killed run can never write into our temporary file.
    return f"{path}.tmp-{os.getpid()}"


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write `data` to `path` all at once or not at all (temporary file, fsync, rename)."""
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def check_token_range(tokens: np.ndarray, vocab_size: int, first_row: int = 0) -> None:
    """Every id must be in [0, vocab_size): a larger one means the data and the tokenizer disagree."""
    if tokens.size == 0:
        return
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        bad = high if high >= vocab_size else low
        row = first_row + int(np.argwhere(tokens == bad)[0][0])
        raise DataError(
            f"sequence #{row} holds token id {bad}, outside [0, {vocab_size}) (vocab_size): the data was "
            "tokenized with a different tokenizer than the one whose vocab_size was given to the writer."
        )


def write_shard(directory: str, name: str, rows: PackedRows, vocab_size: int) -> dict:
    """Write one shard's three files atomically; return its manifest entry (with the files' sha256)."""
    check_token_range(rows.tokens, vocab_size)
    data = {
        "tokens": np.ascontiguousarray(rows.tokens, dtype=token_dtype(vocab_size)).tobytes(),
        "bounds": np.ascontiguousarray(rows.bounds, dtype=np.int32).tobytes(),
        "offsets": np.ascontiguousarray(rows.offsets, dtype=np.int64).tobytes(),
    }
    paths = shard_paths(directory, name)
    for kind in SHARD_FILES:
        write_bytes_atomic(paths[kind], data[kind])
    return {
        "name": name,
        "num_sequences": len(rows),
        "num_tokens": int(rows.lengths.sum()) if len(rows) else 0,
        "sha256": {kind: hashlib.sha256(data[kind]).hexdigest() for kind in SHARD_FILES},
    }


def build_manifest(
    shards: list[dict],
    *,
    seq_len: int,
    vocab_size: int,
    tokenizer_fingerprint: str,
    packing: str,
    num_documents: int,
    dropped_tokens: int,
    extra: Optional[dict] = None,
) -> dict:
    """The manifest of a split made of `shards` (entries from `write_shard`), in a fixed key order."""
    num_sequences = sum(s["num_sequences"] for s in shards)
    num_tokens = sum(s["num_tokens"] for s in shards)
    return {
        "format": FORMAT,
        "seq_len": seq_len,
        "dtype": token_dtype(vocab_size).name,
        "vocab_size": vocab_size,
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "packing": packing,
        "num_sequences": num_sequences,
        "num_tokens": num_tokens,
        "num_padding_tokens": num_sequences * (seq_len + 1) - num_tokens,
        "num_documents": num_documents,
        "dropped_tokens": dropped_tokens,
        "shards": shards,
        "extra": dict(extra or {}),
    }


class ShardWriter:
    """Write packed rows one at a time into shards of `shard_sequences` rows, then the manifest.

    Use: `write()` every row, then `close(num_documents, dropped_tokens)` once. A stale manifest.json in
    `out_dir` is deleted first, since its shards are about to be overwritten. (`forge_lm.data.prepare` writes whole
    work units with `write_shard` instead; this is the simple interface for rows produced one by one.)
    """

    def __init__(
        self,
        out_dir: str,
        seq_len: int,
        vocab_size: int,
        shard_sequences: int,
        tokenizer_fingerprint: str,
        extra: Optional[dict] = None,
        packing: str = "concat",
    ) -> None:
        if shard_sequences <= 0:
            raise ValueError(f"shard_sequences={shard_sequences} must be positive.")
        self.out_dir = str(out_dir)
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.shard_sequences = shard_sequences
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.packing = packing
        self.extra = dict(extra or {})
        self.num_sequences = 0
        self._shards: list[dict] = []
        self._pending: list[PackedSequence] = []
        self._closed = False
        os.makedirs(self.out_dir, exist_ok=True)
        manifest = os.path.join(self.out_dir, MANIFEST)
        if os.path.exists(manifest):
            os.remove(manifest)

    def write(self, seq: PackedSequence) -> None:
        """Append one row; shards are written as they fill up."""
        if self._closed:
            raise RuntimeError("ShardWriter.write() after close().")
        tokens = np.asarray(seq.tokens)
        if tokens.shape != (self.seq_len + 1,):
            raise DataError(
                f"sequence #{self.num_sequences} has shape {tokens.shape}, expected ({self.seq_len + 1},) "
                "(seq_len + 1): the packer and the writer must use the same seq_len."
            )
        check_token_range(tokens[None, :], self.vocab_size, first_row=self.num_sequences)
        self._pending.append(seq)
        self.num_sequences += 1
        if len(self._pending) == self.shard_sequences:
            self._flush()

    def _flush(self) -> None:
        name = f"shard_{len(self._shards):05d}"
        rows = PackedRows.from_sequences(self._pending, self.seq_len + 1)
        self._shards.append(write_shard(self.out_dir, name, rows, self.vocab_size))
        self._pending = []

    def close(self, num_documents: int, dropped_tokens: int = 0) -> dict:
        """Write the last shard and manifest.json (atomically, last); return the manifest."""
        if self._closed:
            raise RuntimeError("ShardWriter.close() called twice.")
        if self._pending:
            self._flush()
        self._closed = True
        manifest = build_manifest(
            self._shards,
            seq_len=self.seq_len,
            vocab_size=self.vocab_size,
            tokenizer_fingerprint=self.tokenizer_fingerprint,
            packing=self.packing,
            num_documents=num_documents,
            dropped_tokens=dropped_tokens,
            extra=self.extra,
        )
        write_json_atomic(os.path.join(self.out_dir, MANIFEST), manifest)
        return manifest


def read_manifest(path: str) -> dict:
    """The validated manifest.json of the split directory `path`."""
    manifest_file = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_file):
        raise DataError(f"no {MANIFEST} in {path}: run `forge prepare` first.")
    redo = f"delete {path} and run `forge prepare` again"
    try:
        with open(manifest_file, encoding="utf-8") as f:
            manifest = json.load(f)
        missing = [k for k in _REQUIRED_KEYS if k not in manifest]
        if missing:
            raise ValueError(f"missing keys {missing}")
        if manifest["format"] != FORMAT:
            raise ValueError(f"format {manifest['format']!r} is not {FORMAT!r}")
        if manifest["dtype"] not in ("uint16", "uint32"):
            raise ValueError(f"unknown dtype {manifest['dtype']!r}")
        sizes = [int(s["num_sequences"]) for s in manifest["shards"]]
        [str(s["name"]) for s in manifest["shards"]]
    except (ValueError, TypeError, KeyError) as e:
        raise DataError(f"{manifest_file} is malformed ({e}): {redo}.") from None
    if sum(sizes) != manifest["num_sequences"]:
        raise DataError(
            f"{manifest_file}: num_sequences={manifest['num_sequences']} but the shards hold {sum(sizes)}: {redo}."
        )
    return manifest


class ShardDataset:
    """Random access to the packed rows of a prepared split directory (read-only, memory-mapped).

    Shards are memory-mapped on first use, so opening is instant and only touched pages are read.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        manifest = read_manifest(self.path)
        self.manifest: dict = manifest
        self.seq_len: int = int(manifest["seq_len"])
        self.row_len = self.seq_len + 1
        self.dtype = np.dtype(manifest["dtype"])
        self.vocab_size = int(manifest["vocab_size"])
        self._names = [str(s["name"]) for s in manifest["shards"]]
        self._sizes = [int(s["num_sequences"]) for s in manifest["shards"]]
        self._starts = np.cumsum([0, *self._sizes])  # global index of each shard's first row
        self._maps: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for name, n in zip(self._names, self._sizes):
            self._check_sizes(name, n)

    def _check_sizes(self, name: str, n: int) -> None:
        paths = shard_paths(self.path, name)
        expected = {paths["tokens"]: n * self.row_len * self.dtype.itemsize, paths["offsets"]: (n + 1) * 8}
        for kind in SHARD_FILES:
            if not os.path.isfile(paths[kind]):
                raise DataError(
                    f"{paths[kind]} is missing: delete {self.path} and run `forge prepare` again."
                )
        for file, size in expected.items():
            if os.path.getsize(file) != size:
                raise DataError(
                    f"{file} has {os.path.getsize(file)} bytes, the manifest implies {size}: the shard is "
                    f"truncated or stale; delete {self.path} and run `forge prepare` again."
                )

    def _shard(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if k not in self._maps:
            paths = shard_paths(self.path, self._names[k])
            n = self._sizes[k]
            # Plain ndarray views of the maps: slicing an np.memmap runs Python code on every access.
            tokens = np.memmap(paths["tokens"], dtype=self.dtype, mode="r", shape=(n, self.row_len))
            tokens = tokens.view(np.ndarray)
            offsets = np.fromfile(paths["offsets"], dtype=np.int64)
            bounds = (
                np.memmap(paths["bounds"], dtype=np.int32, mode="r").view(np.ndarray)
                if os.path.getsize(paths["bounds"])
                else np.zeros(0, dtype=np.int32)
            )
            self._maps[k] = (tokens, bounds, offsets)
        return self._maps[k]

    def __len__(self) -> int:
        return int(self._starts[-1])

    def take(self, indices: np.ndarray | list[int]) -> PackedRows:
        """The rows at `indices` (any order, repeats allowed) as arrays; tokens are int64."""
        indices = np.asarray(indices, dtype=np.int64)
        n = len(self)
        if len(indices) and (indices.min() < 0 or indices.max() >= n):
            bad = int(indices.min() if indices.min() < 0 else indices.max())
            raise IndexError(f"index {bad} out of range for a dataset of {n} sequences ({self.path}).")
        shard_of = np.searchsorted(self._starts, indices, side="right") - 1
        tokens = np.empty((len(indices), self.row_len), dtype=np.int64)
        bounds: list[np.ndarray] = []
        for j, (k, i) in enumerate(zip(shard_of.tolist(), indices.tolist())):
            shard_tokens, shard_bounds, offsets = self._shard(k)
            row = i - int(self._starts[k])
            tokens[j] = shard_tokens[row]
            bounds.append(shard_bounds[offsets[row] : offsets[row + 1]])
        if tokens.size and int(tokens.max()) >= self.vocab_size:  # one pass over the batch: cheap
            self._refuse_out_of_range(tokens, shard_of, indices)
        offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in bounds], out=offsets[1:])
        flat = np.concatenate(bounds).astype(np.int32) if bounds else np.zeros(0, dtype=np.int32)
        return PackedRows(tokens, flat, offsets)

    def _refuse_out_of_range(self, tokens: np.ndarray, shard_of: np.ndarray, indices: np.ndarray) -> None:
        j = int(np.argmax(tokens.max(axis=1) >= self.vocab_size))
        k = int(shard_of[j])
        name = shard_paths(self.path, self._names[k])["tokens"]
        raise DataError(
            f"{name} row {int(indices[j] - self._starts[k])} holds token id {int(tokens[j].max())}, outside the "
            f"vocabulary of {self.vocab_size} its manifest records: the shard is corrupt or was written for "
            f"another tokenizer. Check it with `forge prepare --verify` (data.verify=true), or delete "
            f"{self.path} and prepare again."
        )

    def __getitem__(self, i: int) -> PackedSequence:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} sequences ({self.path}).")
        return self.take([int(i) % n]).row(0)

    def verify(self) -> None:
        """Recompute every shard file's sha256 and compare with the manifest (reads all the data)."""
        for entry in self.manifest["shards"]:
            for kind, path in shard_paths(self.path, entry["name"]).items():
                digest = hashlib.sha256()
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 22):
                        digest.update(chunk)
                if digest.hexdigest() != entry["sha256"][kind]:
                    raise DataError(
                        f"shard {entry['name']} ({path}) is corrupt: its sha256 does not match the "
                        f"manifest. Delete {self.path} and run `forge prepare` again."
                    )

    def __getstate__(self) -> dict:
        # Memory maps are not pickled: a copy sent to a worker process maps the files itself.
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

    def __repr__(self) -> str:
        return f"ShardDataset({self.path!r}, sequences={len(self)}, seq_len={self.seq_len})"
