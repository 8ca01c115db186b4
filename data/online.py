"""Online mode: training straight from the raw sources, tokenized and packed on the fly.

An `OnlineStream` is the sample stream of one dataset (all sources, or one source of a mixture) without a
`prepare` step: a background thread reads the documents, cuts them into the same work units as `prepare`
(data/chunks.py), has worker processes tokenize and pack them, and queues the rows. The stream is

    epoch 0: rows of chunk 0, rows of chunk 1, ...   epoch 1: the same chunks again, ...

with each chunk's rows shuffled by a permutation of (seed, epoch, chunk). Shuffling is therefore local to a
work unit (a streaming reader never sees the whole corpus); for a well-mixed stream from several corpora,
give the sources weights (a mixture) so that each becomes its own stream.

Exact resume: a chunk's rows depend only on the chunk, so sample k of the stream is a pure function of k.
The state names a chunk boundary at or before the next sample, (epoch, chunk, first sample of the chunk);
resuming reads the documents again up to that chunk without tokenizing them, tokenizes from there and
skips the samples already consumed. Every data-parallel rank runs its own stream and keeps its own slice,
so the global order, and thus resuming on another number of ranks, works as with prepared shards.
"""

from __future__ import annotations

import bisect
import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from forge_lm.data.chunks import (
    ChunkRows,
    PackSpec,
    PackTask,
    iter_chunks,
    register_tokenizer,
    run_pack_task,
    tokenizer_key,
)
from forge_lm.data.config import DataConfig, SourceConfig
from forge_lm.data.loader import RowStream
from forge_lm.data.packing import PackedRows
from forge_lm.data.report import DataError, InputReport
from forge_lm.data.sources import iter_sources
from forge_lm.data.tokenizer import Tokenizer
from forge_lm.data.workers import WorkerPool, resolve_num_workers

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Boundary:
    """Where a chunk's rows begin in the stream."""

    epoch: int
    chunk: int
    start: int


@dataclass
class _Piece:
    boundary: _Boundary
    rows: PackedRows


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class OnlineStream(RowStream):
    """The endless sample stream of raw `sources`, tokenized and packed on the fly (see the module docstring)."""

    def __init__(
        self,
        name: str,
        sources: list[SourceConfig],
        cfg: DataConfig,
        tokenizer: Tokenizer,
        key: Optional[int] = None,
        split: str = "train",
        num_workers: Optional[int] = None,
    ) -> None:
        self.name = name
        self.sources = sources
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.key = key
        self.spec = PackSpec(cfg.seq_len, cfg.packing, cfg.val_fraction, splits=(split,))
        self.split = split
        workers = resolve_num_workers(cfg.num_workers if num_workers is None else num_workers)
        self._pool = WorkerPool(workers, initializer=register_tokenizer, initargs=(tokenizer,))
        self._buffer = max(2, 2 * workers)  # chunks queued ahead of the consumer
        self._lock = threading.Lock()
        self._anchor = _Boundary(0, 0, 0)
        self._boundaries: list[_Boundary] = []  # of the chunks taken from the queue, in stream order
        self._current: Optional[_Piece] = None
        self._queue: queue.Queue = queue.Queue(self._buffer)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.report: Optional[InputReport] = None
        """The input report of the first complete pass over the sources."""

    # -- producer (background thread) ----------------------------------------------------------------------

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, anchor: _Boundary) -> None:
        epoch, first_chunk, k = anchor.epoch, anchor.chunk, anchor.start
        try:
            while not self._stop.is_set():
                report = InputReport(strict=self.cfg.on_bad_input == "error")
                chunks = iter_chunks(iter_sources(self.sources, report), self.cfg.chunk_chars)
                key = tokenizer_key(self.tokenizer)
                # chunks before the anchor are read again, not tokenized
                todo = (PackTask(c, self.spec, key) for c in chunks if c.index >= first_chunk)
                produced = 0
                results: Iterator[ChunkRows] = self._pool.imap(run_pack_task, todo)
                try:
                    for result in results:
                        rows = result.rows[self.split]
                        if self.cfg.shuffle and len(rows) > 1:
                            seed = [self.cfg.seed, epoch, result.index] + (
                                [] if self.key is None else [self.key]
                            )
                            rows = rows.take(np.random.default_rng(seed).permutation(len(rows)))
                        if not self._put(_Piece(_Boundary(epoch, result.index, k), rows)):
                            return
                        k += len(rows)
                        produced += len(rows)
                finally:
                    results.close()  # type: ignore[attr-defined]
                if first_chunk == 0:
                    if produced == 0:
                        raise DataError(
                            f"online data {self.name!r} yields no full {self.split} sequence of "
                            f"{self.cfg.seq_len + 1} tokens: add data or lower data.seq_len."
                        )
                    if self.report is None:
                        self.report = report
                        logger.info("online %s, first pass: %s", self.name, report.summary())
                epoch, first_chunk = epoch + 1, 0
        except BaseException as e:  # handed to the consumer, which raises it in the training loop
            self._put(_Failure(e))

    def _start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._queue = queue.Queue(self._buffer)
            self._thread = threading.Thread(
                target=self._produce, args=(self._anchor,), daemon=True, name=f"online-{self.name}"
            )
            self._thread.start()

    def _stop_producer(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    # -- consumer ------------------------------------------------------------------------------------------

    def _next_piece(self) -> _Piece:
        self._start()
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                # The producer hands over every error; a thread that is gone without one was stopped.
                if self._thread is None or not self._thread.is_alive():
                    raise RuntimeError(
                        f"online stream {self.name!r} was closed while a batch was being read."
                    ) from None
        if isinstance(item, _Failure):
            self._thread = None
            raise item.error
        with self._lock:
            self._boundaries.append(item.boundary)
        return item

    def take(self, ks: np.ndarray) -> PackedRows:
        parts: list[PackedRows] = []
        local: list[int] = []  # rows wanted from the current piece
        for k in np.asarray(ks, dtype=np.int64).tolist():
            piece = self._current
            while piece is None or k >= piece.boundary.start + len(piece.rows):
                if piece is not None and local:
                    parts.append(piece.rows.take(local))
                    local = []
                piece = self._current = self._next_piece()
            if k < piece.boundary.start:
                raise RuntimeError(
                    f"online stream {self.name!r} asked for sample {k} after it passed it (a bug)."
                )
            local.append(k - piece.boundary.start)
        if local:
            assert self._current is not None
            parts.append(self._current.rows.take(local))
        return PackedRows.concatenate(parts)

    def _boundary_at(self, k: int) -> _Boundary:
        """The last known chunk boundary at or before sample k."""
        with self._lock:
            starts = [b.start for b in self._boundaries]
            i = bisect.bisect_right(starts, k) - 1
            return self._boundaries[i] if i >= 0 else self._anchor

    def state(self, next_k: int) -> dict[str, Any]:
        b = self._boundary_at(next_k)
        return {"name": self.name, "epoch": b.epoch, "chunk": b.chunk, "start": b.start}

    def epoch_of(self, k: int) -> int:
        return self._boundary_at(k).epoch

    def release(self, next_k: int) -> None:
        with self._lock:
            starts = [b.start for b in self._boundaries]
            i = bisect.bisect_right(starts, next_k) - 1
            if i > 0:
                self._anchor = self._boundaries[i]
                del self._boundaries[:i]

    def restore(self, next_k: int, state: dict[str, Any]) -> None:
        anchor = _Boundary(int(state.get("epoch", 0)), int(state.get("chunk", 0)), int(state.get("start", 0)))
        if anchor.start > next_k:
            raise DataError(
                f"online loader state for {self.name!r} is inconsistent: {state} is after sample {next_k}."
            )
        self._stop_producer()
        with self._lock:
            self._anchor = anchor
            self._boundaries = []
            self._current = None

    def close(self) -> None:
        self._stop_producer()
        self._pool.close()


def online_rows(
    name: str,
    sources: list[SourceConfig],
    cfg: DataConfig,
    tokenizer: Tokenizer,
    split: str,
    limit: Optional[int],
) -> PackedRows:
    """The first `limit` rows (all, if None) of one pass over `sources`, in order: online validation data."""
    spec = PackSpec(cfg.seq_len, cfg.packing, cfg.val_fraction, splits=(split,))
    report = InputReport(strict=cfg.on_bad_input == "error")
    parts: list[PackedRows] = []
    total = 0
    key = tokenizer_key(tokenizer)
    chunks = iter_chunks(iter_sources(sources, report), cfg.chunk_chars)
    workers = resolve_num_workers(cfg.num_workers)
    with WorkerPool(workers, initializer=register_tokenizer, initargs=(tokenizer,)) as pool:
        results = pool.imap(run_pack_task, (PackTask(c, spec, key) for c in chunks))
        try:
            for result in results:
                parts.append(result.rows[split])
                total += len(result.rows[split])
                if limit is not None and total >= limit:
                    break
        finally:
            results.close()  # type: ignore[attr-defined]
    if not parts:
        raise DataError(f"online data {name!r}: the sources hold no documents.")
    rows = PackedRows.concatenate(parts)
    return rows if limit is None else rows.take(np.arange(min(limit, len(rows))))
