"""data.loader: a deterministic global sample stream, disjoint data-parallel slices, exact resume (also on
another number of ranks, also while prefetching), and the batch layout (labels, positions, documents)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from forge_lm.data.loader import IGNORE_INDEX, Loader, collate, eval_batches
from forge_lm.data.packing import ConcatPacker, pack_documents
from forge_lm.data.shards import ShardDataset, ShardWriter, build_manifest, write_shard
from forge_lm.data.sources import DataError
from forge_lm.data.tokenizer import Tokenizer

SEQ_LEN = 16
N = 50


@pytest.fixture(scope="module")
def dataset(
    tmp_path_factory: pytest.TempPathFactory, small_tokenizer: Tokenizer, shakespeare_docs, stdlib_docs
) -> ShardDataset:
    """50 rows of 17 real tokens in shards of 8; the documents are 40-character snippets of scenes and of
    CPython modules, so that most rows hold several documents."""
    out = tmp_path_factory.mktemp("loader")
    packer = ConcatPacker(SEQ_LEN, small_tokenizer.eos_id)
    writer = ShardWriter(str(out), SEQ_LEN, small_tokenizer.vocab_size, 8, small_tokenizer.fingerprint)
    snippets = [d.text[100:140] for d in shakespeare_docs[:150]]
    code = [d.text[s : s + 40] for s in range(300, 3000, 97) for d in stdlib_docs]
    for i in range(0, len(snippets), 3):
        snippets[i] = code[(i // 3) % len(code)]
    for ids in small_tokenizer.encode_batch(snippets[:150]):
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
    assert set(batch) == {"input_ids", "labels", "position_ids", "document_ids"}
    for t in batch.values():
        assert t.shape == (4, SEQ_LEN) and t.dtype == torch.int64
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    assert torch.equal(batch["position_ids"], torch.arange(SEQ_LEN).expand(4, SEQ_LEN))
    assert (batch["labels"] != IGNORE_INDEX).all()  # concat packing: no padding
    # a new document id right after every EOS
    for row_ids, row_docs in zip(batch["input_ids"], batch["document_ids"]):
        after_eos = (row_ids[:-1] == 0).nonzero().flatten() + 1
        expected = torch.zeros(SEQ_LEN, dtype=torch.int64)
        expected[after_eos] = 1
        assert torch.equal(row_docs, expected.cumsum(0))


def test_epoch_order_is_the_seeded_permutation(dataset: ShardDataset) -> None:
    index = _row_index(dataset)
    loader = Loader(dataset, micro_batch_size=5, seed=7)
    got = _stream(loader, 20, index)  # 10 batches per epoch: exactly two epochs
    expected = [*np.random.default_rng([7, 0]).permutation(N), *np.random.default_rng([7, 1]).permutation(N)]
    assert got == [int(i) for i in expected]
    assert (loader.epoch, loader.position, loader.samples_seen) == (2, 0, 100)  # the next one is epoch 2


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


def test_epochs_follow_each_other_without_a_gap(dataset: ShardDataset) -> None:
    index = _row_index(dataset)
    ranks = [Loader(dataset, micro_batch_size=4, seed=3, dp_world_size=3, dp_rank=r) for r in range(3)]
    for _ in range(4):
        for loader in ranks:
            loader.next_batch()
    assert (ranks[0].epoch, ranks[0].position) == (0, 48)  # 2 sequences left in epoch 0
    got = [i for loader in ranks for i in _indices(loader.next_batch(), index)]  # a batch across two epochs
    assert (ranks[0].epoch, ranks[0].position, ranks[0].samples_seen) == (1, 10, 60)
    order0 = np.random.default_rng([3, 0]).permutation(N)
    order1 = np.random.default_rng([3, 1]).permutation(N)
    assert got == [int(i) for i in [*order0[48:], *order1[:10]]]  # nothing skipped


def test_dp_ranks_are_disjoint_and_together_give_the_single_rank_stream(dataset: ShardDataset) -> None:
    index = _row_index(dataset)
    world, mbs, steps = 3, 2, 16  # global batch 6: 8 steps per epoch, 2 sequences skipped per epoch
    ranks = [Loader(dataset, mbs, seed=11, dp_rank=r, dp_world_size=world) for r in range(world)]
    per_step = [[_indices(loader.next_batch(), index) for loader in ranks] for _ in range(steps)]
    single = _stream(Loader(dataset, mbs * world, seed=11), steps, index)
    assert [i for step in per_step for rank in step for i in rank] == single
    epoch0 = single[:N]
    assert sorted(epoch0) == list(range(N))  # every sequence exactly once per epoch


def test_resume_continues_exactly(dataset: ShardDataset) -> None:
    index = _row_index(dataset)
    original = Loader(dataset, micro_batch_size=3, seed=2, reset_position_ids=True)
    _stream(original, 17, index)  # into the second epoch
    state = original.state_dict()
    assert json.loads(json.dumps(state)) == state  # plain Python values
    assert (state["epoch"], state["position"], state["samples_seen"], state["consumed"]) == (1, 1, 51, [51])

    resumed = Loader(dataset, micro_batch_size=3, seed=2, reset_position_ids=True)
    resumed.load_state_dict(state)
    for _ in range(25):
        a, b = original.next_batch(), resumed.next_batch()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.state_dict() == original.state_dict()


@pytest.mark.parametrize("before, after", [(2, 4), (4, 2), (1, 3)])
def test_resume_on_another_number_of_ranks_gives_the_uninterrupted_samples(
    dataset: ShardDataset, before: int, after: int
) -> None:
    """Resumed after k steps on `before` ranks, continued on `after` ranks: together, exactly the samples of
    the uninterrupted run, in its order, none twice within an epoch."""
    index = _row_index(dataset)
    mbs, k, more = 3, 5, 4

    def step(ranks: list[Loader]) -> list[int]:
        return [i for loader in ranks for i in _indices(loader.next_batch(), index)]

    first = [Loader(dataset, mbs, seed=9, dp_rank=r, dp_world_size=before) for r in range(before)]
    consumed = [i for _ in range(k) for i in step(first)]
    state = first[0].state_dict()
    assert state == first[-1].state_dict()  # the same on every rank
    second = [Loader(dataset, mbs, seed=9, dp_rank=r, dp_world_size=after) for r in range(after)]
    for loader in second:
        loader.load_state_dict(state)
    consumed += [i for _ in range(more) for i in step(second)]

    uninterrupted = _stream(Loader(dataset, mbs * before, seed=9), k + more * after // before + 1, index)
    assert consumed == uninterrupted[: len(consumed)]
    epoch0 = consumed[:N]
    assert len(set(epoch0)) == len(epoch0)
    assert second[0].samples_seen == len(consumed)


def test_prefetching_changes_nothing(dataset: ShardDataset) -> None:
    plain = Loader(dataset, micro_batch_size=4, seed=6, dp_rank=1, dp_world_size=2, reset_position_ids=True)
    ahead = Loader(
        dataset, micro_batch_size=4, seed=6, dp_rank=1, dp_world_size=2, reset_position_ids=True, prefetch=3
    )
    with ahead:
        for _ in range(9):
            a, b = plain.next_batch(), ahead.next_batch()
            assert all(torch.equal(a[key], b[key]) for key in a)
            # the state is that of the batches handed out, not of those read ahead
            assert ahead.state_dict() == plain.state_dict()
        state = ahead.state_dict()
        for _ in range(3):
            ahead.next_batch()
        ahead.load_state_dict(state)  # back in time, with batches queued
        for _ in range(5):
            a, b = plain.next_batch(), ahead.next_batch()
            assert all(torch.equal(a[key], b[key]) for key in a)


def test_state_of_the_first_loader_version_still_resumes(dataset: ShardDataset) -> None:
    index = _row_index(dataset)
    old = {"epoch": 1, "position": 20, "samples_seen": 70, "seed": 9, "shuffle": True, "num_sequences": N}
    loader = Loader(dataset, micro_batch_size=5, seed=9)
    loader.load_state_dict(old)
    assert _stream(loader, 2, index) == [int(i) for i in np.random.default_rng([9, 1]).permutation(N)[20:30]]


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
    assert set(batches[0]) == {"input_ids", "labels", "position_ids", "document_ids"}
    assert len(list(eval_batches(dataset, batch_size=8, max_batches=3))) == 3


def test_missing_dataset_message(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="run `forge prepare` first"):
        ShardDataset(str(tmp_path / "train"))


def test_padding_is_left_out_of_the_loss_and_is_its_own_document(
    tmp_path: Path, small_tokenizer: Tokenizer, shakespeare_docs, stdlib_docs
) -> None:
    texts = [d.text[:200] for d in shakespeare_docs[:30]] + [d.text[:400] for d in stdlib_docs]
    ids = small_tokenizer.encode_batch(texts)
    packed, stats = pack_documents(ids, 64, None, small_tokenizer.eos_id, method="best_fit")
    assert stats.padding_tokens > 0
    entry = write_shard(str(tmp_path), "shard", packed, small_tokenizer.vocab_size)
    manifest = build_manifest(
        [entry],
        seq_len=64,
        vocab_size=1024,
        tokenizer_fingerprint="fp",
        packing="best_fit",
        num_documents=len(texts),
        dropped_tokens=0,
    )
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    ds = ShardDataset(str(tmp_path))
    batch = next(eval_batches(ds, batch_size=len(ds), reset_position_ids=True))
    for b in range(len(ds)):
        row = ds[b]
        length, starts = row.length, row.doc_starts.tolist()
        labels = batch["labels"][b]
        # position t predicts token t + 1: padding targets (t + 1 >= length) are ignored, the rest are real
        assert (labels[length - 1 :] == IGNORE_INDEX).all() and (labels[: length - 1] != IGNORE_INDEX).all()
        assert int((labels != IGNORE_INDEX).sum()) == length - 1
        # document ids step at every document start, and once more where the padding begins
        expected = np.searchsorted(np.array([*starts, length]), np.arange(64), side="right") - 1
        assert batch["document_ids"][b].tolist() == expected.tolist()
        # positions restart at every document (and at the padding)
        begin = np.array([*starts, length])[expected]
        assert batch["position_ids"][b].tolist() == (np.arange(64) - begin).tolist()
    real = sum(int((batch["labels"][b] != IGNORE_INDEX).sum()) for b in range(len(ds)))
    assert real == stats.tokens - len(ds)  # every real token but each row's first is a target


def test_collate_is_fast() -> None:
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 50_000, size=n).tolist() for n in rng.integers(1, 3000, size=400)]
    packed, _ = pack_documents(docs, 2048, None, 0)
    rows = packed.take(np.arange(8))
    import time

    start = time.perf_counter()
    for _ in range(50):
        collate(rows, reset_position_ids=True)
    per_batch = (time.perf_counter() - start) / 50
    assert per_batch < 0.01, f"collating 8 x 2048 tokens took {per_batch * 1e3:.1f} ms"
