"""data.loader: a deterministic global order, disjoint data-parallel slices, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data.loader import Loader, eval_batches
from data.packing import ConcatPacker
from data.shards import ShardDataset, ShardWriter
from data.sources import DataError
from data.tokenizer import Tokenizer

SEQ_LEN = 16
N = 50


@pytest.fixture(scope="module")
def dataset(
    tmp_path_factory: pytest.TempPathFactory, small_tokenizer: Tokenizer, shakespeare_docs
) -> ShardDataset:
    """50 rows of 17 real tokens in shards of 8; the documents are 40-character snippets of scenes,
    so that most rows hold several documents."""
    out = tmp_path_factory.mktemp("loader")
    packer = ConcatPacker(SEQ_LEN, small_tokenizer.eos_id)
    writer = ShardWriter(str(out), SEQ_LEN, small_tokenizer.vocab_size, 8, small_tokenizer.fingerprint)
    for ids in small_tokenizer.encode_batch([d.text[100:140] for d in shakespeare_docs[:150]]):
        for row in packer.add(ids):
            if writer.num_sequences < N:
                writer.write(row)
    writer.close(num_documents=packer.documents)
    ds = ShardDataset(str(out))
    assert len(ds) == N
    assert len({ds[i].tokens.tobytes() for i in range(N)}) == N  # rows are distinguishable
    return ds


def _row_index(dataset: ShardDataset) -> dict[bytes, int]:
    return {dataset[i].tokens.tobytes(): i for i in range(len(dataset))}


def _indices(batch: dict[str, torch.Tensor], index: dict[bytes, int]) -> list[int]:
    rows = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1).numpy()
    return [index[row.astype(np.int64).tobytes()] for row in rows]


def _stream(loader: Loader, steps: int, index: dict[bytes, int]) -> list[int]:
    return [i for _ in range(steps) for i in _indices(loader.next_batch(), index)]


def test_batch_layout(dataset: ShardDataset) -> None:
    batch = Loader(dataset, micro_batch_size=4, seed=1).next_batch()
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    for t in batch.values():
        assert t.shape == (4, SEQ_LEN) and t.dtype == torch.int64
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    assert torch.equal(batch["position_ids"], torch.arange(SEQ_LEN).expand(4, SEQ_LEN))


def test_epoch_order_is_the_seeded_permutation(dataset: ShardDataset) -> None:
    index = _row_index(dataset)
    loader = Loader(dataset, micro_batch_size=5, seed=7)
    got = _stream(loader, 20, index)  # 10 batches per epoch: exactly two epochs
    expected = [*np.random.default_rng([7, 0]).permutation(N), *np.random.default_rng([7, 1]).permutation(N)]
    assert got == [int(i) for i in expected]
    assert (loader.epoch, loader.position, loader.samples_seen) == (1, 50, 100)


def test_no_shuffle_is_in_order(dataset: ShardDataset) -> None:
    assert _stream(Loader(dataset, micro_batch_size=10, shuffle=False), 6, _row_index(dataset)) == [
        *range(50),
        *range(10),
    ]


def test_loader_is_an_endless_iterator(dataset: ShardDataset) -> None:
    index = _row_index(dataset)
    loader = Loader(dataset, micro_batch_size=7, seed=4)
    assert iter(loader) is loader
    batches = [next(loader) for _ in range(3)] + [b for b, _ in zip(loader, range(20))]
    reference = Loader(dataset, micro_batch_size=7, seed=4)
    assert [_indices(b, index) for b in batches] == [
        _indices(reference.next_batch(), index) for _ in range(23)
    ]


def test_deterministic_and_seed_dependent(dataset: ShardDataset) -> None:
    index = _row_index(dataset)
    a = _stream(Loader(dataset, micro_batch_size=3, seed=5), 40, index)
    b = _stream(Loader(dataset, micro_batch_size=3, seed=5), 40, index)
    c = _stream(Loader(dataset, micro_batch_size=3, seed=6), 40, index)
    assert a == b and a != c


def test_partial_global_batch_at_epoch_end_is_skipped(dataset: ShardDataset) -> None:
    index = _row_index(dataset)
    loader = Loader(dataset, micro_batch_size=4, seed=3, dp_world_size=3, dp_rank=0)  # global batch 12
    for _ in range(4):
        loader.next_batch()
    assert (loader.epoch, loader.position) == (0, 48)  # 2 sequences left: fewer than 12
    first = _indices(loader.next_batch(), index)
    assert (loader.epoch, loader.position, loader.samples_seen) == (1, 12, 60)
    assert first == [int(i) for i in np.random.default_rng([3, 1]).permutation(N)[:4]]


def test_dp_ranks_are_disjoint_and_together_give_the_single_rank_stream(dataset: ShardDataset) -> None:
    index = _row_index(dataset)
    world, mbs, steps = 3, 2, 16  # global batch 6: 8 steps per epoch, 2 sequences skipped per epoch
    ranks = [Loader(dataset, mbs, seed=11, dp_rank=r, dp_world_size=world) for r in range(world)]
    per_step = [[_indices(loader.next_batch(), index) for loader in ranks] for _ in range(steps)]
    single = _stream(Loader(dataset, mbs * world, seed=11), steps, index)
    assert [i for step in per_step for rank in step for i in rank] == single
    epoch0 = [i for step in per_step[:8] for rank in step for i in rank]
    assert len(set(epoch0)) == len(epoch0) == 48  # no sequence is seen twice within an epoch


def test_resume_continues_exactly(dataset: ShardDataset) -> None:
    index = _row_index(dataset)
    original = Loader(dataset, micro_batch_size=3, seed=2, reset_position_ids=True)
    _stream(original, 13, index)  # into the second epoch
    state = original.state_dict()
    assert json.loads(json.dumps(state)) == state  # plain Python values
    assert all(type(v) in (int, str, bool) for v in state.values())

    resumed = Loader(dataset, micro_batch_size=3, seed=2, reset_position_ids=True)
    resumed.load_state_dict(state)
    for _ in range(25):
        a, b = original.next_batch(), resumed.next_batch()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.state_dict() == original.state_dict()


def test_resume_with_another_dp_world_size_continues_the_global_order(dataset: ShardDataset) -> None:
    index = _row_index(dataset)
    before = Loader(dataset, micro_batch_size=4, seed=9)  # 1 rank, global batch 4
    seen = _stream(before, 5, index)
    state = before.state_dict()
    assert state["position"] == 20

    ranks = [Loader(dataset, 3, seed=9, dp_rank=r, dp_world_size=2) for r in range(2)]  # global batch 6
    for loader in ranks:
        loader.load_state_dict(state)
    after = [i for _ in range(6) for loader in ranks for i in _indices(loader.next_batch(), index)]
    order0 = [int(i) for i in np.random.default_rng([9, 0]).permutation(N)]
    order1 = [int(i) for i in np.random.default_rng([9, 1]).permutation(N)]
    # positions 20..50 of epoch 0 (5 global batches of 6), then epoch 1 begins
    assert seen + after == order0 + order1[:6]
    assert ranks[0].samples_seen == 20 + 36 and ranks[1].epoch == 1


def test_state_mismatch_is_refused(dataset: ShardDataset) -> None:
    state = Loader(dataset, micro_batch_size=2, seed=1).state_dict()
    with pytest.raises(DataError, match="seed=1 but this loader has seed=2"):
        Loader(dataset, micro_batch_size=2, seed=2).load_state_dict(state)
    with pytest.raises(DataError, match="num_sequences=49"):
        Loader(dataset, micro_batch_size=2, seed=1).load_state_dict({**state, "num_sequences": 49})


def test_dataset_smaller_than_a_global_batch(dataset: ShardDataset) -> None:
    with pytest.raises(DataError, match="fewer than one global micro-batch"):
        Loader(dataset, micro_batch_size=13, dp_world_size=4)
    with pytest.raises(ValueError, match="dp_rank"):
        Loader(dataset, micro_batch_size=1, dp_rank=2, dp_world_size=2)


def test_position_ids_reset_at_document_starts(dataset: ShardDataset) -> None:
    batch = Loader(dataset, micro_batch_size=10, shuffle=False, reset_position_ids=True).next_batch()
    assert sum(len(dataset[b].doc_starts) > 1 for b in range(10)) >= 5  # rows with several documents
    for b in range(10):
        starts = set(dataset[b].doc_starts.tolist())
        expected, pos = [], 0
        for t in range(SEQ_LEN):
            pos = 0 if t in starts else pos + 1
            expected.append(pos)
        assert batch["position_ids"][b].tolist() == expected
        # every document after the first begins right after an EOS
        eos_positions = (batch["input_ids"][b] == 0).nonzero().flatten() + 1
        assert set(eos_positions.tolist()) == starts - {0}


def test_eval_batches(dataset: ShardDataset) -> None:
    batches = list(eval_batches(dataset, batch_size=8))
    assert [len(b["input_ids"]) for b in batches] == [8] * 6 + [2]
    index = _row_index(dataset)
    assert [i for b in batches for i in _indices(b, index)] == list(range(N))
    assert set(batches[0]) == {"input_ids", "labels", "position_ids"}
    assert len(list(eval_batches(dataset, batch_size=8, max_batches=3))) == 3


def test_missing_dataset_message(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="run `python -m data.prepare` first"):
        ShardDataset(str(tmp_path / "train"))
