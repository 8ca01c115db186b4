"""Mixtures: several prepared datasets (one per weighted source) drawn in their target proportions, with
exact resume, also on another number of ranks, and interleaved validation data."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from forge_lm.data import build_train_loader, build_val_batches
from forge_lm.data.config import ConfigError, DataConfig, SourceConfig, TokenizerConfig
from forge_lm.data.loader import Loader
from forge_lm.data.mixture import MixtureSchedule
from forge_lm.data.prepare import prepare
from forge_lm.data.shards import ShardDataset
from forge_lm.data.tokenizer import Tokenizer

WEIGHTS = (0.5, 0.3, 0.2)


def test_every_prefix_of_the_schedule_holds_the_proportions() -> None:
    schedule = MixtureSchedule([5, 3, 2])  # weights need not sum to 1
    assert schedule.weights == pytest.approx(list(WEIGHTS))
    streams, positions, taken = schedule.assign([0, 0, 0], 10_000)
    counts = np.zeros(3)
    for g, s in enumerate(streams.tolist(), start=1):
        assert positions[g - 1] == counts[s]  # each dataset's own stream, in order
        counts[s] += 1
        assert np.all(np.abs(counts - g * np.array(WEIGHTS)) <= 1)
    assert taken == counts.tolist() == [5000, 3000, 2000]
    # assigning in pieces is assigning at once
    first, _, middle = schedule.assign([0, 0, 0], 3_333)
    second, _, end = schedule.assign(middle, 10_000 - 3_333)
    assert np.concatenate([first, second]).tolist() == streams.tolist() and end == taken


@pytest.fixture(scope="module")
def mixture(
    tmp_path_factory: pytest.TempPathFactory, shakespeare_path, stdlib_dir, small_tokenizer_dir
) -> DataConfig:
    """Three real corpora prepared as three datasets: Shakespeare, the json package, other stdlib modules."""
    root = tmp_path_factory.mktemp("mixture")
    sources = [
        SourceConfig(name="plays", paths=[shakespeare_path], max_documents=40, weight=WEIGHTS[0]),
        SourceConfig(
            name="json", paths=[f"{stdlib_dir}/json"], exclude=["*/__pycache__/*"], weight=WEIGHTS[1]
        ),
        SourceConfig(name="modules", paths=[f"{stdlib_dir}/*.py"], max_files=4, weight=WEIGHTS[2]),
    ]
    return DataConfig(
        name="mix",
        sources=sources,
        tokenizer=TokenizerConfig(path=small_tokenizer_dir, train=False),
        seq_len=32,
        prepared_dir=str(root / "prepared"),
        val_fraction=0.1,
        num_workers=0,
        seed=5,
        prefetch=0,
    )


@pytest.fixture(scope="module")
def prepared(mixture: DataConfig, small_tokenizer: Tokenizer) -> dict[bytes, str]:
    """Prepares the mixture; returns which dataset each (unique) training row comes from."""
    prepare(mixture, small_tokenizer, show_progress=False)
    origin = {}
    for source in mixture.sources:
        ds = ShardDataset(Path(mixture.prepared_dir) / source.name / "train")
        for i in range(len(ds)):
            origin[ds[i].tokens.tobytes()] = source.name
    return origin


def _rows(batch: dict[str, torch.Tensor]) -> list[bytes]:
    tokens = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1).numpy()
    return [row.astype(np.int64).tobytes() for row in tokens]


def test_proportions_within_one_percent_over_10000_samples(mixture, small_tokenizer, prepared) -> None:
    sizes = Counter(prepared.values())
    assert sizes["json"] < sizes["plays"] / 3  # the small datasets are repeated over many epochs
    ranks = [build_train_loader(mixture, small_tokenizer, 25, dp_rank=r, dp_world_size=2) for r in range(2)]
    seen, rows = Counter(), set()
    for _ in range(200):  # 200 steps x 2 ranks x 25 = 10,000 samples
        for loader in ranks:
            batch = _rows(next(loader))
            rows.update(batch)
            seen.update(prepared[row] for row in batch)
    assert sum(seen.values()) == 10_000 == ranks[0].samples_seen
    for source, weight in zip(mixture.sources, WEIGHTS):
        assert abs(seen[source.name] / 10_000 - weight) < 0.01, (source.name, seen)
    # every row of every dataset is used (the small ones epoch after epoch)
    assert rows == set(prepared)


@pytest.mark.parametrize("before, after", [(2, 4), (4, 2)])
def test_resume_on_another_number_of_ranks(
    mixture, small_tokenizer, prepared, before: int, after: int
) -> None:
    def step(ranks: list[Loader]) -> list[bytes]:
        return [row for loader in ranks for row in _rows(next(loader))]

    first = [
        build_train_loader(mixture, small_tokenizer, 3, dp_rank=r, dp_world_size=before)
        for r in range(before)
    ]
    consumed = [row for _ in range(7) for row in step(first)]
    state = first[0].state_dict()
    second = [
        build_train_loader(mixture, small_tokenizer, 3, dp_rank=r, dp_world_size=after) for r in range(after)
    ]
    for loader in second:
        loader.load_state_dict(state)
    consumed += [row for _ in range(6) for row in step(second)]

    single = build_train_loader(mixture, small_tokenizer, len(consumed), dp_rank=0, dp_world_size=1)
    assert consumed == _rows(next(single))
    per_dataset = state["consumed"]
    assert sum(per_dataset) == 7 * 3 * before and len(per_dataset) == 3


def test_changing_the_mixture_is_refused(mixture, small_tokenizer, prepared) -> None:
    state = build_train_loader(mixture, small_tokenizer, 2).state_dict()
    two = dataclasses.replace(mixture, sources=mixture.sources[:2])
    from forge_lm.data.report import DataError

    with pytest.raises(DataError, match="3 datasets but this loader mixes 2"):
        build_train_loader(two, small_tokenizer, 2).load_state_dict(state)


def test_val_batches_interleave_the_sources(mixture, small_tokenizer, prepared) -> None:
    batches = build_val_batches(mixture, small_tokenizer, batch_size=10, max_batches=3)
    first = [b["input_ids"] for b in batches]
    again = [b["input_ids"] for b in batches]
    assert len(first) == 3 and all(torch.equal(a, b) for a, b in zip(first, again))  # the same every time
    val_origin = {}
    for source in mixture.sources:
        ds = ShardDataset(Path(mixture.prepared_dir) / source.name / "val")
        for i in range(len(ds)):
            val_origin[ds[i].tokens[:-1].astype(np.int64).tobytes()] = source.name
    names = [val_origin[row.numpy().tobytes()] for b in first for row in b]
    assert set(names) == {"plays", "json", "modules"}
    assert Counter(names)["plays"] >= Counter(names)["modules"]


@pytest.mark.parametrize(
    "weights, message",
    [
        ((0.5, None), r"weights are set on some sources but not on \['b'\]"),
        ((0.5, 0.0), r"data.sources\[1\] \('b'\).weight=0.0 must be positive"),
    ],
)
def test_weight_errors_name_the_field(weights, message) -> None:
    sources = [SourceConfig(name=n, paths=["x"], weight=w) for n, w in zip("ab", weights)]
    with pytest.raises(ConfigError, match=message):
        DataConfig(sources=sources)
    with pytest.raises(ConfigError, match="names .* repeat"):
        DataConfig(sources=[SourceConfig(name="a", paths=["x"], weight=1.0)] * 2)


def test_the_mixture_config_composes() -> None:
    from tests.conftest import compose_config

    cfg = compose_config("data=mixture", "output_root=/nonexistent").data
    assert cfg.is_mixture and [s.weight for s in cfg.sources] == [0.6, 0.4]
    assert [s.name for s in cfg.sources] == ["shakespeare", "cpython"]
