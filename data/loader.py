"""Batches for training and evaluation.

The training data is one endless *global sample stream*, a pure function of the seed: sample g of a single
dataset of N rows is row `perm_e[g % N]` with e = g // N and `perm_e = default_rng([seed, e]).permutation(N)`
(a new shuffle every epoch; epochs follow each other without a gap, a batch may span two). For a mixture
of several datasets, sample g first picks a dataset (deterministically, keeping every prefix of the stream
in the target proportions, see data/mixture.py) and then takes the next sample of that dataset's own stream.

The stream is consumed in global micro-batches of micro_batch_size * dp_world_size consecutive samples, of
which data-parallel rank r takes the r-th slice. The loader's state is only "how many samples of each
dataset the whole job has consumed", so a run resumes exactly where it stopped, even with another number
of ranks, and no rank ever needs to talk to another about data.

A batch is a dict of [micro_batch_size, seq_len] int64 tensors:

    input_ids     tokens[:, :-1]
    labels        tokens[:, 1:], with IGNORE_INDEX (-100) where the target is padding (best-fit packing)
    position_ids  0, 1, 2 ... per row, or restarting at every document start (reset_position_ids)
    document_ids  index of each token's document within its row (0, 0, 0, 1, 1 ...); padding is one more
                  document of its own, so a model that masks attention across documents never mixes them
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch

from forge_lm.data.mixture import MixtureSchedule
from forge_lm.data.packing import PackedRows
from forge_lm.data.report import DataError
from forge_lm.data.shards import ShardDataset

IGNORE_INDEX = -100


def collate(rows: PackedRows, reset_position_ids: bool = False) -> dict[str, torch.Tensor]:
    """The batch of `rows` (see the module docstring), with numpy over the whole batch (no per-token Python)."""
    tokens = np.asarray(rows.tokens, dtype=np.int64)
    batch, row_len = tokens.shape
    length = row_len - 1
    lengths = rows.lengths.astype(np.int64)
    # Every input position where a new document, or the padding, begins: the boundaries inside (0, length).
    row_of = np.repeat(np.arange(batch), np.diff(rows.offsets))
    bounds = rows.bounds.astype(np.int64)
    inside = (bounds > 0) & (bounds < length)
    begin_rows, begin_at = row_of[inside], bounds[inside]

    labels = tokens[:, 1:].copy()
    labels[np.arange(1, row_len)[None, :] >= lengths[:, None]] = IGNORE_INDEX

    marks = np.zeros((batch, length), dtype=np.int64)
    marks[begin_rows, begin_at] = 1
    document_ids = np.cumsum(marks, axis=1)

    positions = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length))
    if reset_position_ids:
        doc_start = np.zeros((batch, length), dtype=np.int64)
        doc_start[begin_rows, begin_at] = begin_at
        positions = positions - np.maximum.accumulate(doc_start, axis=1)
    return {
        "input_ids": torch.from_numpy(np.ascontiguousarray(tokens[:, :-1])),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(np.ascontiguousarray(positions)),
        "document_ids": torch.from_numpy(document_ids),
    }


# ---------------------------------------------------------------------------------------------------------
# Row streams: where the samples of one dataset come from
# ---------------------------------------------------------------------------------------------------------


class RowStream(ABC):
    """The endless, deterministic sample stream of one dataset: sample k is a pure function of k."""

    name: str = "data"

    @abstractmethod
    def take(self, ks: np.ndarray) -> PackedRows:
        """Samples `ks` (ascending) of the stream."""

    @abstractmethod
    def state(self, next_k: int) -> dict[str, Any]:
        """What, besides `next_k`, is needed to resume at sample `next_k` (plain values)."""

    @abstractmethod
    def restore(self, next_k: int, state: dict[str, Any]) -> None:
        """Continue at sample `next_k`, from what `state` returned."""

    def epoch_of(self, k: int) -> int:
        """The pass over the data that sample k belongs to."""
        return 0

    def release(self, next_k: int) -> None:  # noqa: B027 (optional: streams that buffer rows override it)
        """Samples before `next_k` will never be asked for again."""

    def close(self) -> None:  # noqa: B027 (optional: streams with workers override it)
        """Free resources (worker processes of online streams)."""


class ShardStream(RowStream):
    """The training order over a prepared ShardDataset: every epoch a fresh permutation of its rows."""

    def __init__(
        self, dataset: ShardDataset, seed: int, shuffle: bool = True, key: Optional[int] = None
    ) -> None:
        if len(dataset) == 0:
            raise DataError(
                f"{dataset.path} holds no sequences: add data or lower data.seq_len, and prepare again."
            )
        self.dataset = dataset
        self.name = str(dataset.manifest.get("extra", {}).get("dataset", dataset.path))
        self.seed = seed
        self.shuffle = shuffle
        self.key = key
        self.num_sequences = len(dataset)
        self._orders: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def _order(self, epoch: int) -> np.ndarray:
        with self._lock:
            if epoch not in self._orders:
                if len(self._orders) >= 2:  # a batch spans at most two epochs
                    del self._orders[min(self._orders)]
                if self.shuffle:
                    seed = [self.seed, epoch] if self.key is None else [self.seed, epoch, self.key]
                    self._orders[epoch] = np.random.default_rng(seed).permutation(self.num_sequences)
                else:
                    self._orders[epoch] = np.arange(self.num_sequences)
            return self._orders[epoch]

    def epoch_of(self, k: int) -> int:
        return k // self.num_sequences

    def take(self, ks: np.ndarray) -> PackedRows:
        ks = np.asarray(ks, dtype=np.int64)
        epochs, positions = np.divmod(ks, self.num_sequences)
        if len(ks) and epochs[0] == epochs[-1]:  # ks ascend: a batch within one epoch, the common case
            return self.dataset.take(self._order(int(epochs[0]))[positions])
        rows = np.empty_like(ks)
        for epoch in np.unique(epochs).tolist():
            here = epochs == epoch
            rows[here] = self._order(epoch)[positions[here]]
        return self.dataset.take(rows)

    def state(self, next_k: int) -> dict[str, Any]:
        return {"name": self.name, "num_sequences": self.num_sequences}

    def restore(self, next_k: int, state: dict[str, Any]) -> None:
        saved = state.get("num_sequences", self.num_sequences)
        if saved != self.num_sequences:
            raise DataError(
                f"loader state was saved with num_sequences={saved} but {self.dataset.path} holds "
                f"{self.num_sequences}: resuming would not continue the same data order. Resume with the same "
                "prepared data, or start a new run."
            )


# ---------------------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """One micro-batch of this rank, decided but maybe not read yet, and the loader state after it."""

    streams: np.ndarray
    """Stream of each sample of the micro-batch."""
    ks: np.ndarray
    """Position of each sample in its stream."""
    consumed_after: list[int]


DatasetLike = Union[ShardDataset, RowStream]


class Loader:
    """Infinite, deterministic, resumable training batches for one data-parallel rank.

    `dataset` is a ShardDataset, a RowStream, or a list of them mixed in proportion to `weights`.
    `next(loader)` returns the batch dict described in the module docstring. With `prefetch` > 0, that many
    batches are read and collated ahead in a background thread; the state still describes what the caller
    has received, so prefetching never changes what a resumed run sees.
    """

    def __init__(
        self,
        dataset: DatasetLike | Sequence[DatasetLike],
        micro_batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        reset_position_ids: bool = False,
        prefetch: int = 0,
        weights: Optional[Sequence[float]] = None,
    ) -> None:
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size={micro_batch_size} must be positive.")
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_world_size={dp_world_size}).")
        if prefetch < 0:
            raise ValueError(f"prefetch={prefetch} must be >= 0.")
        items = list(dataset) if isinstance(dataset, (list, tuple)) else [dataset]
        if not items:
            raise ValueError("Loader needs at least one dataset.")
        key_streams = len(items) > 1
        self.streams: list[RowStream] = [
            ShardStream(d, seed, shuffle, key=i if key_streams else None)
            if isinstance(d, ShardDataset)
            else d
            for i, d in enumerate(items)
        ]
        if len(self.streams) > 1 and weights is None:
            raise ValueError(f"{len(self.streams)} datasets need `weights` (their mixture proportions).")
        self.schedule = MixtureSchedule(weights if weights is not None else [1.0] * len(self.streams))
        if len(self.schedule.weights) != len(self.streams):
            raise ValueError(f"{len(self.schedule.weights)} weights for {len(self.streams)} datasets.")
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.reset_position_ids = reset_position_ids
        self.prefetch = prefetch
        self.global_batch = micro_batch_size * dp_world_size

        first = self.streams[0]
        if (
            len(self.streams) == 1
            and isinstance(first, ShardStream)
            and first.num_sequences < self.global_batch
        ):
            raise DataError(
                f"{first.dataset.path} holds {first.num_sequences} sequences, fewer than one global micro-batch "
                f"(micro_batch_size {micro_batch_size} x dp_world_size {dp_world_size} = {self.global_batch}):"
                " use more data, a smaller seq_len or a smaller micro-batch."
            )
        self._consumed = [0] * len(self.streams)  # what the caller has received
        self._planned = [0] * len(self.streams)  # what has been decided (>= _consumed while prefetching)
        self._queue: deque[tuple[_Plan, Future]] = deque()
        self._executor: Optional[ThreadPoolExecutor] = None

    # -- position ------------------------------------------------------------------------------------------

    @property
    def samples_seen(self) -> int:
        """Samples consumed by all ranks together since the start of training."""
        return sum(self._consumed)

    @property
    def epoch(self) -> int:
        """The pass over the (first) dataset that the next sample belongs to."""
        return self.streams[0].epoch_of(self._consumed[0])

    @property
    def position(self) -> int:
        """Index, within the current epoch of a single prepared dataset, of the next sample to read."""
        first = self.streams[0]
        if isinstance(first, ShardStream):
            return self._consumed[0] - self.epoch * first.num_sequences
        return self._consumed[0]

    # -- batches -------------------------------------------------------------------------------------------

    def _plan(self) -> _Plan:
        streams, ks, self._planned = self.schedule.assign(self._planned, self.global_batch)
        mine = slice(self.dp_rank * self.micro_batch_size, (self.dp_rank + 1) * self.micro_batch_size)
        return _Plan(streams[mine], ks[mine], list(self._planned))

    def _read(self, plan: _Plan) -> dict[str, torch.Tensor]:
        if len(self.streams) == 1:
            rows = self.streams[0].take(plan.ks)
        else:
            parts, where = [], []
            for s in np.unique(plan.streams).tolist():
                here = np.flatnonzero(plan.streams == s)
                parts.append(self.streams[s].take(plan.ks[here]))
                where.append(here)
            rows = PackedRows.concatenate(parts).take(np.argsort(np.concatenate(where), kind="stable"))
        return collate(rows, self.reset_position_ids)

    def _commit(self, plan: _Plan) -> None:
        self._consumed = plan.consumed_after
        for stream, k in zip(self.streams, self._consumed):
            stream.release(k)

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.prefetch == 0:
            plan = self._plan()
            batch = self._read(plan)
            self._commit(plan)
            return batch
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="data-prefetch")
        while len(self._queue) <= self.prefetch:
            plan = self._plan()
            self._queue.append((plan, self._executor.submit(self._read, plan)))
        plan, future = self._queue.popleft()
        batch = future.result()
        self._commit(plan)
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        """`next(loader)` is `loader.next_batch()`: the loader is its own (endless) iterator."""
        return self.next_batch()

    # -- resume --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Global (rank-independent) position in the stream; plain Python values only."""
        first = self.streams[0]
        return {
            "version": 2,
            "samples_seen": self.samples_seen,
            "consumed": list(self._consumed),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "weights": list(self.schedule.weights),
            "streams": [s.state(k) for s, k in zip(self.streams, self._consumed)],
            # for people reading a checkpoint; load_state_dict uses "consumed"
            "epoch": self.epoch,
            "position": self.position,
            "num_sequences": first.num_sequences if isinstance(first, ShardStream) else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the global stream saved by `state_dict` (possibly with another dp_world_size)."""
        for key in ("seed", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(
                    f"loader state was saved with {key}={state[key]!r} but this loader has "
                    f"{key}={getattr(self, key)!r}: resuming would not continue the same data order. "
                    "Resume with the same prepared data and data.seed/data.shuffle, or start a new run."
                )
        if "consumed" in state:
            consumed = [int(c) for c in state["consumed"]]
            stream_states = list(state.get("streams") or [{}] * len(consumed))
        else:  # the first loader's state: {"epoch", "position", "num_sequences"} of one dataset
            first = self.streams[0]
            if len(self.streams) != 1 or not isinstance(first, ShardStream):
                raise DataError("a single-dataset loader state cannot resume a mixture or an online loader.")
            consumed = [int(state["epoch"]) * first.num_sequences + int(state["position"])]
            stream_states = [{"num_sequences": state.get("num_sequences", first.num_sequences)}]
        if len(consumed) != len(self.streams):
            raise DataError(
                f"loader state has {len(consumed)} datasets but this loader mixes {len(self.streams)}: resume with "
                "the same data.sources (the same mixture), or start a new run."
            )
        self._drain()
        for stream, k, stream_state in zip(self.streams, consumed, stream_states):
            stream.restore(k, stream_state)
        self._consumed = list(consumed)
        self._planned = list(consumed)

    def _drain(self) -> None:
        """Forget prefetched batches (waiting for the one being read)."""
        while self._queue:
            _, future = self._queue.popleft()
            if not future.cancel():
                try:
                    future.result()
                except Exception:  # the batch is thrown away; its error, if any, with it
                    pass

    def close(self) -> None:
        """Stop the prefetch thread and the streams' workers."""
        self._drain()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        for stream in self.streams:
            stream.close()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def describe(self) -> str:
        parts = []
        for stream, weight in zip(self.streams, self.schedule.weights):
            size = f"{stream.num_sequences:,} sequences" if isinstance(stream, ShardStream) else "online"
            parts.append(f"{stream.name} ({size}, weight {weight:.3g})")
        return ", ".join(parts)


def eval_batches(
    dataset: ShardDataset,
    batch_size: int,
    max_batches: Optional[int] = None,
    reset_position_ids: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """All sequences in stored order, in batches of `batch_size` (the last one may be smaller)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive.")
    for b, start in enumerate(range(0, len(dataset), batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        indices = np.arange(start, min(start + batch_size, len(dataset)))
        yield collate(dataset.take(indices), reset_position_ids)
