"""Online mode: raw sources tokenized and packed on the fly give the same rows as prepared shards, in
worker processes, with exact resume (also on another number of ranks and across epochs)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from forge_lm.data import build_train_loader, build_val_batches
from forge_lm.data.config import DataConfig, SourceConfig, TokenizerConfig
from forge_lm.data.loader import Loader
from forge_lm.data.prepare import prepare
from forge_lm.data.report import DataError
from forge_lm.data.shards import ShardDataset
from forge_lm.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def config(
    tmp_path_factory: pytest.TempPathFactory, shakespeare_path, stdlib_source, small_tokenizer_dir
) -> DataConfig:
    """8 scenes and 6 CPython modules (~130 KB) in ~7 work units: ~1500 rows of 33 tokens."""
    root = tmp_path_factory.mktemp("online")
    prose = SourceConfig(name="plays", paths=[shakespeare_path], max_documents=8)
    return DataConfig(
        name="online",
        sources=[prose, stdlib_source],
        tokenizer=TokenizerConfig(path=small_tokenizer_dir, train=False),
        seq_len=32,
        prepared_dir=str(root / "prepared"),
        val_fraction=0.1,
        chunk_chars=20_000,
        num_workers=0,
        mode="online",
        seed=3,
    )


def _rows(batch: dict[str, torch.Tensor]) -> list[bytes]:
    tokens = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1).numpy()
    return [row.astype(np.int64).tobytes() for row in tokens]


def _offline(config: DataConfig, small_tokenizer: Tokenizer) -> ShardDataset:
    offline = dataclasses.replace(config, mode="offline")
    prepare(offline, small_tokenizer, show_progress=False)
    return ShardDataset(Path(offline.prepared_dir) / "train")


def test_online_rows_are_the_prepared_rows(config: DataConfig, small_tokenizer: Tokenizer) -> None:
    """Unshuffled, the online stream is the prepared dataset in stored order, epoch after epoch; with
    worker processes too."""
    dataset = _offline(config, small_tokenizer)
    n = len(dataset)
    stored = [dataset[i].tokens.tobytes() for i in range(n)]
    online = dataclasses.replace(config, shuffle=False, num_workers=2)
    with build_train_loader(online, small_tokenizer, micro_batch_size=10) as loader:
        got = [row for _ in range((2 * n) // 10 + 1) for row in _rows(next(loader))]
        assert loader.epoch == 2 or loader.samples_seen > 2 * n - 10
    assert got[:n] == stored and got[n : 2 * n] == stored  # and the second epoch reads it all again


@pytest.mark.parametrize("before, after", [(2, 3), (3, 1)])
def test_online_resume_on_another_number_of_ranks(config: DataConfig, small_tokenizer, before, after) -> None:
    """k steps on `before` ranks, then fresh loaders on `after` ranks from the state: the samples of the
    uninterrupted run, across an epoch boundary (each rank runs its own online stream)."""
    dataset = _offline(config, small_tokenizer)
    n = len(dataset)
    stored = [dataset[i].tokens.tobytes() for i in range(n)]
    mbs, k = 6, 30
    with RankLoaders(config, small_tokenizer, mbs, before) as first:
        consumed = [row for _ in range(k) for loader in first for row in _rows(next(loader))]
        state = first[0].state_dict()
    assert json.loads(json.dumps(state)) == state
    assert state["streams"][0]["start"] <= state["consumed"][0] < n + 1000
    more = (2 * n - len(consumed)) // (mbs * after) + 1  # well into the second epoch
    with RankLoaders(config, small_tokenizer, mbs, after) as second:
        for loader in second:
            loader.load_state_dict(state)
        consumed += [row for _ in range(more) for loader in second for row in _rows(next(loader))]
    with build_train_loader(config, small_tokenizer, micro_batch_size=len(consumed)) as single:
        assert consumed == _rows(next(single))
    assert len(consumed) > n and sorted(consumed[:n]) == sorted(stored)  # an epoch holds every row once


class RankLoaders:
    """The loaders of all ranks of a data-parallel group, closed together."""

    def __init__(self, config: DataConfig, tokenizer: Tokenizer, mbs: int, world: int) -> None:
        self.loaders: list[Loader] = [
            build_train_loader(config, tokenizer, mbs, r, world) for r in range(world)
        ]

    def __enter__(self) -> list[Loader]:
        return self.loaders

    def __exit__(self, *exc) -> None:
        for loader in self.loaders:
            loader.close()


def test_online_shuffles_within_work_units_by_seed(config: DataConfig, small_tokenizer: Tokenizer) -> None:
    dataset = _offline(config, small_tokenizer)
    stored = {dataset[i].tokens.tobytes() for i in range(len(dataset))}
    with (
        build_train_loader(config, small_tokenizer, 50) as a,
        build_train_loader(config, small_tokenizer, 50) as b,
    ):
        first, again = _rows(next(a)), _rows(next(b))
    other = dataclasses.replace(config, seed=4)
    with build_train_loader(other, small_tokenizer, 50) as c:
        reseeded = _rows(next(c))
    assert first == again and first != reseeded and set(first) <= stored


def test_online_validation_is_the_prepared_validation(config: DataConfig, small_tokenizer: Tokenizer) -> None:
    offline = dataclasses.replace(config, mode="offline")
    _offline(config, small_tokenizer)
    want = [b["input_ids"] for b in build_val_batches(offline, small_tokenizer, batch_size=4, max_batches=3)]
    online = build_val_batches(config, small_tokenizer, batch_size=4, max_batches=3)
    got = [b["input_ids"] for b in online]
    assert len(got) == 3 and all(torch.equal(a, b) for a, b in zip(got, want))
    assert all(torch.equal(a, b["input_ids"]) for a, b in zip(got, online))  # computed once, reused


def test_online_mixture_holds_its_proportions(config: DataConfig, small_tokenizer: Tokenizer) -> None:
    sources = [dataclasses.replace(s, weight=w) for s, w in zip(config.sources, (0.75, 0.25))]
    mixed = dataclasses.replace(config, sources=sources)
    offline = dataclasses.replace(mixed, mode="offline")
    prepare(offline, small_tokenizer, show_progress=False)
    origin = {}
    for source in sources:
        ds = ShardDataset(Path(offline.prepared_dir) / source.name / "train")
        origin.update({ds[i].tokens.tobytes(): source.name for i in range(len(ds))})
    with build_train_loader(mixed, small_tokenizer, 40) as loader:
        names = [origin[row] for _ in range(10) for row in _rows(next(loader))]
    assert names.count("plays") == 300 and names.count("stdlib") == 100


def test_online_source_without_data_fails_in_the_training_loop(
    config, small_tokenizer, tmp_path: Path
) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "too short for a row"}\n')
    bad = dataclasses.replace(
        config, sources=[SourceConfig(name="tiny", paths=[str(empty)])], val_fraction=0.0
    )
    with build_train_loader(bad, small_tokenizer, 2) as loader:
        with pytest.raises(DataError, match="online data 'online' yields no full train sequence"):
            next(loader)
