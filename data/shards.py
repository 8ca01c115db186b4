"""Packed sequences on disk: the "packed-v1" shard format, its writer and its reader.

A prepared split is a directory:

    manifest.json                 written last; a directory without it is not a dataset
    shard_00000.tokens.bin        token ids, raw little-endian array of shape (n, seq_len + 1), row-major;
                                  dtype uint16 when vocab_size <= 65536, else uint32 (see manifest "dtype")
    shard_00000.docs.bin          int32: the doc_starts of all n rows of the shard, concatenated
    shard_00000.offsets.bin       int64, n + 1 entries: row i's doc_starts are docs[offsets[i]:offsets[i+1]]
    shard_00001.tokens.bin        ... every shard but the last holds `shard_sequences` rows

manifest.json:

    {"format": "packed-v1", "seq_len": int, "dtype": "uint16" | "uint32", "vocab_size": int,
     "tokenizer_fingerprint": str, "num_sequences": int, "num_tokens": int (= num_sequences * (seq_len+1)),
     "num_documents": int, "dropped_tokens": int,
     "shards": [{"name": "shard_00000", "num_sequences": int, "sha256": hex digest of its tokens.bin}],
     "extra": {...free-form, e.g. the config fingerprint of data.prepare}}

Every file is written as `<name>.tmp` and renamed with `os.replace`, the manifest after all shards,
so a reader never sees a partially written file under its final name. The token files are plain arrays
so they are read with `np.memmap`: opening a dataset costs nothing, and the OS page cache is shared
by all the data-parallel ranks of a node.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import IO, Any, Optional

import numpy as np

from data.packing import PackedSequence
from data.sources import DataError

FORMAT = "packed-v1"
MANIFEST = "manifest.json"
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


def _shard_files(directory: str, name: str) -> tuple[str, str, str]:
    base = os.path.join(directory, name)
    return f"{base}.tokens.bin", f"{base}.docs.bin", f"{base}.offsets.bin"


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class _OpenShard:
    """The shard being written: its .tmp files, the running sha256 of its tokens, its row offsets."""

    name: str
    tokens: IO[bytes]
    docs: IO[bytes]
    sha256: Any = field(default_factory=hashlib.sha256)
    offsets: list[int] = field(default_factory=lambda: [0])

    @property
    def num_sequences(self) -> int:
        return len(self.offsets) - 1


class ShardWriter:
    """Write packed sequences into shards of `shard_sequences` rows, then the manifest.

    Use: `write()` every row, then `close(num_documents, dropped_tokens)` once. A stale manifest.json in
    `out_dir` is deleted first, since its shards are about to be overwritten.
    """

    def __init__(
        self,
        out_dir: str,
        seq_len: int,
        vocab_size: int,
        shard_sequences: int,
        tokenizer_fingerprint: str,
        extra: Optional[dict] = None,
    ) -> None:
        if shard_sequences <= 0:
            raise ValueError(f"shard_sequences={shard_sequences} must be positive.")
        self.out_dir = out_dir
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.shard_sequences = shard_sequences
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.extra = dict(extra or {})
        self.dtype = token_dtype(vocab_size)
        self.num_sequences = 0
        self._shards: list[dict] = []
        self._open: Optional[_OpenShard] = None
        self._closed = False
        os.makedirs(out_dir, exist_ok=True)
        manifest = os.path.join(out_dir, MANIFEST)
        if os.path.exists(manifest):
            os.remove(manifest)

    def write(self, seq: PackedSequence) -> None:
        """Append one row; shards are finished as they fill up."""
        if self._closed:
            raise RuntimeError("ShardWriter.write() after close().")
        tokens = np.asarray(seq.tokens)
        if tokens.shape != (self.seq_len + 1,):
            raise DataError(
                f"sequence #{self.num_sequences} has shape {tokens.shape}, expected ({self.seq_len + 1},) "
                "(seq_len + 1): the packer and the writer must use the same seq_len."
            )
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.vocab_size:
            bad = high if high >= self.vocab_size else low
            raise DataError(
                f"sequence #{self.num_sequences} holds token id {bad}, outside [0, {self.vocab_size}) "
                f"(vocab_size): the data was tokenized with a different tokenizer than the one whose "
                "vocab_size was given to ShardWriter."
            )
        doc_starts = np.asarray(seq.doc_starts, dtype=np.int32)

        if self._open is None:
            self._open = self._open_shard()
        shard = self._open
        row = tokens.astype(self.dtype).tobytes()
        shard.tokens.write(row)
        shard.sha256.update(row)
        shard.docs.write(doc_starts.tobytes())
        shard.offsets.append(shard.offsets[-1] + len(doc_starts))
        self.num_sequences += 1
        if shard.num_sequences == self.shard_sequences:
            self._finish_shard()

    def close(self, num_documents: int, dropped_tokens: int = 0) -> dict:
        """Finish the last shard and write manifest.json (atomically, last); return the manifest."""
        if self._closed:
            raise RuntimeError("ShardWriter.close() called twice.")
        if self._open is not None:
            self._finish_shard()
        self._closed = True
        manifest = {
            "format": FORMAT,
            "seq_len": self.seq_len,
            "dtype": self.dtype.name,
            "vocab_size": self.vocab_size,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "num_sequences": self.num_sequences,
            "num_tokens": self.num_sequences * (self.seq_len + 1),
            "num_documents": num_documents,
            "dropped_tokens": dropped_tokens,
            "shards": self._shards,
            "extra": self.extra,
        }
        _write_json_atomic(os.path.join(self.out_dir, MANIFEST), manifest)
        return manifest

    def _open_shard(self) -> _OpenShard:
        name = f"shard_{len(self._shards):05d}"
        tokens_file, docs_file, _ = _shard_files(self.out_dir, name)
        return _OpenShard(
            name=name, tokens=open(tokens_file + ".tmp", "wb"), docs=open(docs_file + ".tmp", "wb")
        )

    def _finish_shard(self) -> None:
        shard = self._open
        assert shard is not None
        tokens_file, docs_file, offsets_file = _shard_files(self.out_dir, shard.name)
        with open(offsets_file + ".tmp", "wb") as f:
            f.write(np.asarray(shard.offsets, dtype=np.int64).tobytes())
        for handle in (shard.tokens, shard.docs):
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        for path in (tokens_file, docs_file, offsets_file):
            os.replace(path + ".tmp", path)
        self._shards.append(
            {"name": shard.name, "num_sequences": shard.num_sequences, "sha256": shard.sha256.hexdigest()}
        )
        self._open = None


class ShardDataset:
    """Random access to the packed sequences of a prepared split directory (read-only, memory-mapped).

    Shards are memory-mapped on first use, so opening is instant and only touched pages are read.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        manifest_file = os.path.join(path, MANIFEST)
        if not os.path.isfile(manifest_file):
            raise DataError(f"no {MANIFEST} in {path}: run `python -m data.prepare` first.")
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
            names = [str(s["name"]) for s in manifest["shards"]]
        except (ValueError, TypeError, KeyError) as e:
            raise DataError(
                f"{manifest_file} is malformed ({e}): delete {path} and run `python -m data.prepare` again."
            ) from None
        if sum(sizes) != manifest["num_sequences"]:
            raise DataError(
                f"{manifest_file}: num_sequences={manifest['num_sequences']} but the shards hold {sum(sizes)}:"
                f" delete {path} and run `python -m data.prepare` again."
            )
        self.manifest: dict = manifest
        self.seq_len: int = int(manifest["seq_len"])
        self.dtype = np.dtype(manifest["dtype"])
        self._names = names
        self._sizes = sizes
        self._starts = np.cumsum([0, *sizes])  # global index of each shard's first row
        self._maps: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for name, n in zip(names, sizes):
            self._check_sizes(name, n)

    def _check_sizes(self, name: str, n: int) -> None:
        tokens_file, docs_file, offsets_file = _shard_files(self.path, name)
        expected = {tokens_file: n * (self.seq_len + 1) * self.dtype.itemsize, offsets_file: (n + 1) * 8}
        for file, size in expected.items():
            if not os.path.isfile(file):
                raise DataError(
                    f"{file} is missing: delete {self.path} and run `python -m data.prepare` again."
                )
            if os.path.getsize(file) != size:
                raise DataError(
                    f"{file} has {os.path.getsize(file)} bytes, the manifest implies {size}: the shard is "
                    f"truncated or stale; delete {self.path} and run `python -m data.prepare` again."
                )
        if not os.path.isfile(docs_file):
            raise DataError(
                f"{docs_file} is missing: delete {self.path} and run `python -m data.prepare` again."
            )

    def _shard(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if k not in self._maps:
            tokens_file, docs_file, offsets_file = _shard_files(self.path, self._names[k])
            n = self._sizes[k]
            tokens = np.memmap(tokens_file, dtype=self.dtype, mode="r", shape=(n, self.seq_len + 1))
            offsets = np.fromfile(offsets_file, dtype=np.int64)
            docs = (
                np.memmap(docs_file, dtype=np.int32, mode="r")
                if os.path.getsize(docs_file)
                else np.zeros(0, dtype=np.int32)
            )
            self._maps[k] = (tokens, docs, offsets)
        return self._maps[k]

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> PackedSequence:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} sequences ({self.path}).")
        i = int(i) % n
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        row = i - int(self._starts[k])
        tokens, docs, offsets = self._shard(k)
        return PackedSequence(
            tokens=np.asarray(tokens[row], dtype=np.int64),
            doc_starts=np.array(docs[offsets[row] : offsets[row + 1]], dtype=np.int32),
        )

    def verify(self) -> None:
        """Recompute every shard's sha256 and compare with the manifest (reads all the token data)."""
        for entry in self.manifest["shards"]:
            tokens_file = _shard_files(self.path, entry["name"])[0]
            digest = hashlib.sha256()
            with open(tokens_file, "rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
            if digest.hexdigest() != entry["sha256"]:
                raise DataError(
                    f"shard {entry['name']} ({tokens_file}) is corrupt: its sha256 does not match the "
                    f"manifest. Delete {self.path} and run `python -m data.prepare` again."
                )

    def __getstate__(self) -> dict:
        # Memory maps are not pickled: a copy sent to a worker process maps the files itself.
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

    def __repr__(self) -> str:
        return f"ShardDataset({self.path!r}, sequences={len(self)}, seq_len={self.seq_len})"
