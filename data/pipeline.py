"""The two calls a trainer needs: training batches and validation batches, whatever the data setup.

    loader = build_train_loader(cfg.data, tokenizer, micro_batch_size, dp_rank, dp_world_size)
    batch = next(loader)                       # input_ids, labels, position_ids, document_ids
    state = loader.state_dict()                # into the checkpoint; loader.load_state_dict(state) to resume
    for batch in build_val_batches(cfg.data, tokenizer, batch_size, max_batches): ...

The trainer does not need to know whether the data is one prepared dataset, a mixture of prepared datasets
(one per weighted source), or raw sources tokenized on the fly (`data.mode=online`). In offline mode the
shards must have been written by `prepare(cfg, tokenizer)` first (idempotent; on one rank, before the
others open them).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Optional

import numpy as np
import torch

from forge_lm.data.config import DataConfig
from forge_lm.data.loader import Loader, RowStream, ShardStream, collate, eval_batches
from forge_lm.data.mixture import MixtureSchedule
from forge_lm.data.packing import PackedRows
from forge_lm.data.prepare import dataset_groups
from forge_lm.data.report import DataError
from forge_lm.data.shards import ShardDataset
from forge_lm.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


def open_prepared(path: str, cfg: DataConfig, tokenizer: Tokenizer) -> ShardDataset:
    """A prepared split, checked against the config and tokenizer it is about to be trained with."""
    dataset = ShardDataset(path)
    manifest = dataset.manifest
    if manifest["tokenizer_fingerprint"] != tokenizer.fingerprint:
        raise DataError(
            f"{path} was tokenized with another tokenizer than {cfg.tokenizer.path}: run `python -m "
            "data.prepare` with this data config (it re-prepares), or point data.tokenizer.path at the old one."
        )
    if dataset.seq_len != cfg.seq_len:
        raise DataError(
            f"{path} holds sequences of {dataset.seq_len} tokens but data.seq_len={cfg.seq_len}: run "
            "`forge prepare` with this data config first."
        )
    return dataset


def build_train_loader(
    cfg: DataConfig, tokenizer: Tokenizer, micro_batch_size: int, dp_rank: int = 0, dp_world_size: int = 1
) -> Loader:
    """The training loader of this data-parallel rank (see the module docstring)."""
    groups = dataset_groups(cfg)
    streams: list[RowStream] = []
    for i, group in enumerate(groups):
        key = i if len(groups) > 1 else None
        if cfg.mode == "online":
            from forge_lm.data.online import OnlineStream  # starts worker processes only when used

            streams.append(OnlineStream(group.name, group.sources, cfg, tokenizer, key=key))
        else:
            dataset = open_prepared(group.split_dir("train"), cfg, tokenizer)
            streams.append(ShardStream(dataset, cfg.seed, cfg.shuffle, key=key))
    weights = [float(s.weight) for s in cfg.sources] if cfg.is_mixture else None  # type: ignore[arg-type]
    loader = Loader(
        streams,
        micro_batch_size,
        seed=cfg.seed,
        shuffle=cfg.shuffle,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        reset_position_ids=cfg.reset_position_ids,
        prefetch=cfg.prefetch,
        weights=weights,
    )
    logger.info("train data (%s): %s", cfg.mode, loader.describe())
    return loader


class ValBatches:
    """Validation batches that can be iterated again and again (the same batches every time)."""

    def __init__(
        self, cfg: DataConfig, tokenizer: Tokenizer, batch_size: int, max_batches: Optional[int]
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive.")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_batches = max_batches
        self.limit = None if max_batches is None else batch_size * max_batches
        self.groups = dataset_groups(cfg)
        self.weights = [float(s.weight) for s in cfg.sources] if cfg.is_mixture else [1.0]  # type: ignore[arg-type]
        self._datasets: Optional[list[ShardDataset]] = None
        self._online: Optional[PackedRows] = None
        if cfg.mode == "offline":
            self._datasets = [open_prepared(g.split_dir("val"), cfg, tokenizer) for g in self.groups]

    def _online_rows(self) -> PackedRows:
        """Online: the first val rows of each source (in proportion, for a mixture), computed once."""
        if self._online is None:
            from forge_lm.data.online import online_rows

            parts = [
                online_rows(g.name, g.sources, self.cfg, self.tokenizer, "val", self.limit)
                for g in self.groups
            ]
            self._online = _interleave(parts, self.weights, self.limit)
        return self._online

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        reset = self.cfg.reset_position_ids
        if self._datasets is not None and len(self._datasets) == 1:
            yield from eval_batches(self._datasets[0], self.batch_size, self.max_batches, reset)
            return
        if self._datasets is not None:
            order = MixtureSchedule(self.weights).interleave(
                [len(d) for d in self._datasets], self.limit or 2**62
            )
            for start in range(0, len(order), self.batch_size):
                picked = order[start : start + self.batch_size]
                parts = [self._datasets[d].take([row]) for d, row in picked]
                yield collate(PackedRows.concatenate(parts), reset)
            return
        rows = self._online_rows()
        for start in range(0, len(rows), self.batch_size):
            yield collate(rows.take(np.arange(start, min(start + self.batch_size, len(rows)))), reset)


def _interleave(parts: list[PackedRows], weights: list[float], limit: Optional[int]) -> PackedRows:
    if len(parts) == 1:
        return parts[0]
    order = MixtureSchedule(weights).interleave([len(p) for p in parts], limit or 2**62)
    if not order:
        return parts[0].take([])
    return PackedRows.concatenate([parts[d].take([row]) for d, row in order])


def build_val_batches(
    cfg: DataConfig, tokenizer: Tokenizer, batch_size: int, max_batches: Optional[int] = None
) -> ValBatches:
    """The held-out validation batches (the same ones at every evaluation), at most `max_batches`."""
    return ValBatches(cfg, tokenizer, batch_size, max_batches)


def build_val_batches_per_source(
    cfg: DataConfig, tokenizer: Tokenizer, batch_size: int, max_batches: Optional[int] = None
) -> dict[str, ValBatches]:
    """Held-out batches of each source on its own, by source name, for per-source metrics ({} for one source).

    A mixture's sources are prepared one dataset each, so their own val splits are read as they are. Sources
    read one after the other share one prepared dataset whose rows mix them, so each source's held-out
    documents (the same documents `prepare` held out) are tokenized and packed alone, once, in this process.
    """
    if len(cfg.sources) < 2:
        return {}
    out: dict[str, ValBatches] = {}
    names = [s.name for s in cfg.sources]
    for i, source in enumerate(cfg.sources):
        key = source.name if names.count(source.name) == 1 else f"{source.name}.{i}"
        if cfg.is_mixture:
            alone = dataclasses.replace(cfg, sources=[source])  # its own group: prepared_dir/<name>
        else:
            alone = dataclasses.replace(cfg, sources=[source], mode="online", num_workers=0)
        out[key] = ValBatches(alone, tokenizer, batch_size, max_batches)
    return out
