"""Batches for training and evaluation, from a `ShardDataset`.

The training order is a pure function of (seed, epoch, position): epoch e visits the sequences in the
order `np.random.default_rng([seed, e]).permutation(N)`. That global stream is consumed in global
micro-batches of micro_batch_size * dp_world_size consecutive entries, of which data-parallel rank r
takes the r-th slice. Because the state (epoch, position) is global, a run resumes exactly where it
stopped, even on a different number of GPUs, and no rank ever needs to talk to another about data.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

import numpy as np
import torch

from data.packing import PackedSequence
from data.shards import ShardDataset
from data.sources import DataError


def _position_ids(rows: list[PackedSequence], length: int, reset: bool) -> np.ndarray:
    """0..length-1 per row; with `reset`, restart at 0 at every document start."""
    positions = np.broadcast_to(np.arange(length, dtype=np.int64), (len(rows), length)).copy()
    if reset:
        idx = np.arange(length)
        for b, row in enumerate(rows):
            starts = row.doc_starts[row.doc_starts < length].astype(np.int64)
            # for each position, the start of the document it belongs to
            doc_start = starts[np.searchsorted(starts, idx, side="right") - 1]
            positions[b] = idx - doc_start
    return positions


def _collate(rows: list[PackedSequence], reset_position_ids: bool) -> dict[str, torch.Tensor]:
    tokens = torch.from_numpy(np.stack([r.tokens for r in rows]).astype(np.int64, copy=False))
    length = tokens.shape[1] - 1
    return {
        "input_ids": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "position_ids": torch.from_numpy(_position_ids(rows, length, reset_position_ids)),
    }


class Loader:
    """Infinite, deterministic, resumable training batches for one data-parallel rank.

    `next_batch()` returns {"input_ids", "labels", "position_ids"}, each a [micro_batch_size, seq_len]
    int64 tensor. When fewer than one global micro-batch remain in an epoch, those sequences are skipped
    and the next epoch (a new permutation) begins, so every rank always gets a full batch.
    """

    def __init__(
        self,
        dataset: ShardDataset,
        micro_batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        reset_position_ids: bool = False,
    ) -> None:
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size={micro_batch_size} must be positive.")
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_world_size={dp_world_size}).")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.reset_position_ids = reset_position_ids
        self.global_batch = micro_batch_size * dp_world_size
        self.num_sequences = len(dataset)
        if self.num_sequences < self.global_batch:
            raise DataError(
                f"{dataset.path} holds {self.num_sequences} sequences, fewer than one global micro-batch "
                f"(micro_batch_size {micro_batch_size} x dp_world_size {dp_world_size} = {self.global_batch}):"
                " use more data, a smaller seq_len or a smaller micro-batch."
            )
        self._epoch = 0
        self._position = 0
        self._samples_seen = 0
        self._order_epoch: Optional[int] = None
        self._order = np.empty(0, dtype=np.int64)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        """Global index, within the current epoch's order, of the next sample to read."""
        return self._position

    @property
    def samples_seen(self) -> int:
        """Samples consumed by all ranks together since the start of training."""
        return self._samples_seen

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)
            else:
                self._order = np.arange(self.num_sequences)
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self._position + self.global_batch > self.num_sequences:
            self._epoch += 1
            self._position = 0
        order = self._epoch_order(self._epoch)
        first = self._position + self.dp_rank * self.micro_batch_size
        indices = order[first : first + self.micro_batch_size]
        self._position += self.global_batch
        self._samples_seen += self.global_batch
        return _collate([self.dataset[int(i)] for i in indices], self.reset_position_ids)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        """`next(loader)` is `loader.next_batch()`: the loader is its own (endless) iterator."""
        return self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Global (rank-independent) position in the stream; plain Python values only."""
        return {
            "epoch": self._epoch,
            "position": self._position,
            "samples_seen": self._samples_seen,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_sequences": self.num_sequences,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the global stream saved by `state_dict` (possibly with another dp_world_size)."""
        for key in ("num_sequences", "seed", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(
                    f"loader state was saved with {key}={state[key]!r} but this loader has "
                    f"{key}={getattr(self, key)!r}: resuming would not continue the same data order. "
                    "Resume with the same prepared data and data.seed/data.shuffle, or start a new run."
                )
        position = int(state["position"])
        if not 0 <= position <= self.num_sequences:
            raise DataError(f"loader state position={position} is outside [0, {self.num_sequences}].")
        self._epoch = int(state["epoch"])
        self._position = position
        self._samples_seen = int(state.get("samples_seen", 0))


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
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        yield _collate(rows, reset_position_ids)
