"""data.prepare end to end: Shakespeare + CPython sources -> trained tokenizer -> train/val shards."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from data.config import DataConfig, SourceConfig, TokenizerConfig
from data.loader import Loader
from data.prepare import _budgeted_texts, ensure_tokenizer, prepare, split_of
from data.shards import ShardDataset
from data.sources import DataError, iter_sources


def _config(tmp_path: Path, sources: list[SourceConfig], **kwargs) -> DataConfig:
    defaults = dict(
        tokenizer=TokenizerConfig(path=str(tmp_path / "tokenizer"), vocab_size=1024, train_max_chars=300_000),
        seq_len=128,
        prepared_dir=str(tmp_path / "prepared"),
        val_fraction=0.05,
        shard_sequences=1000,
    )
    return DataConfig(name="test", sources=sources, **{**defaults, **kwargs})


def _files(directory: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()}


def test_prepare_end_to_end_reuse_and_reprepare(
    tmp_path: Path, shakespeare_source: SourceConfig, stdlib_source: SourceConfig, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="data")
    cfg = _config(tmp_path, [shakespeare_source, stdlib_source])

    tokenizer = ensure_tokenizer(cfg, show_progress=False)
    assert os.path.isfile(tmp_path / "tokenizer" / "tokenizer.json")
    assert tokenizer.vocab_size == 1024
    assert (
        ensure_tokenizer(cfg, show_progress=False).fingerprint == tokenizer.fingerprint
    )  # loaded, not retrained

    manifests = prepare(cfg, tokenizer, show_progress=False)
    assert sorted(os.listdir(cfg.prepared_dir)) == ["train", "val"]  # no temporary directories left

    docs = list(iter_sources(cfg.sources))
    val_docs = [d for d in docs if split_of(d, cfg.val_fraction) == "val"]
    assert 0 < len(val_docs) < 0.1 * len(docs)
    stream_tokens = {"train": 0, "val": 0}
    for doc, ids in zip(docs, tokenizer.encode_batch([d.text for d in docs])):
        stream_tokens[split_of(doc, cfg.val_fraction)] += len(ids) + 1

    for split, manifest in manifests.items():
        ds = ShardDataset(os.path.join(cfg.prepared_dir, split))
        ds.verify()
        assert ds.manifest == manifest and ds.seq_len == 128
        assert manifest["tokenizer_fingerprint"] == tokenizer.fingerprint
        assert manifest["vocab_size"] == 1024 and manifest["dtype"] == "uint16"
        assert manifest["num_tokens"] + manifest["dropped_tokens"] == stream_tokens[split]
        assert manifest["dropped_tokens"] <= 128
        assert manifest["extra"]["split"] == split
        assert len(manifest["extra"]["config_fingerprint"]) == 64
    assert manifests["val"]["num_documents"] == len(val_docs)
    assert manifests["train"]["num_documents"] == len(docs) - len(val_docs)
    assert manifests["train"]["extra"]["documents_per_source"]["stdlib"] > 0
    assert manifests["train"]["num_sequences"] > 10 * manifests["val"]["num_sequences"] > 0

    # The first training row decodes to the beginning of the first training document.
    train = ShardDataset(os.path.join(cfg.prepared_dir, "train"))
    first_train_doc = next(d for d in docs if split_of(d, cfg.val_fraction) == "train")
    assert first_train_doc.text.startswith(tokenizer.decode(train[0].tokens[:50]))
    batch = Loader(train, micro_batch_size=4, seed=cfg.seed).next_batch()
    assert batch["input_ids"].shape == (4, 128)

    # Same config: nothing is rewritten.
    before = _files(Path(cfg.prepared_dir))
    caplog.clear()
    assert prepare(cfg, tokenizer, show_progress=False) == manifests
    assert "reusing prepared data at" in caplog.text
    assert _files(Path(cfg.prepared_dir)) == before

    # Another seq_len: prepared again, in place.
    cfg64 = _config(tmp_path, [shakespeare_source, stdlib_source], seq_len=64)
    caplog.clear()
    manifests64 = prepare(cfg64, tokenizer, show_progress=False)
    assert "reusing" not in caplog.text
    assert manifests64["train"]["seq_len"] == 64
    assert (
        manifests64["train"]["extra"]["config_fingerprint"]
        != manifests["train"]["extra"]["config_fingerprint"]
    )
    assert ShardDataset(os.path.join(cfg.prepared_dir, "train")).seq_len == 64
    assert sorted(os.listdir(cfg.prepared_dir)) == ["train", "val"]
    assert manifests64["train"]["num_documents"] == manifests["train"]["num_documents"]


@pytest.fixture()
def small_source(tmp_path: Path, shakespeare_docs) -> SourceConfig:
    """40 Shakespeare scenes as a plain .jsonl file."""
    path = tmp_path / "scenes.jsonl"
    path.write_text("".join(json.dumps({"id": d.id, "text": d.text}) + "\n" for d in shakespeare_docs[:40]))
    return SourceConfig(name="scenes", paths=[str(path)])


def test_a_failed_prepare_leaves_the_previous_data_intact(
    tmp_path: Path, small_source: SourceConfig, small_tokenizer
) -> None:
    cfg = _config(tmp_path, [small_source], val_fraction=0.1)
    manifests = prepare(cfg, small_tokenizer, show_progress=False)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "ok", "text": "fine"}\n{"id": "broken", "text": \n')
    broken = _config(tmp_path, [small_source, SourceConfig(name="bad", paths=[str(bad)])], val_fraction=0.1)
    with pytest.raises(DataError, match=f"{bad}:2: malformed JSON"):
        prepare(broken, small_tokenizer, show_progress=False)
    assert sorted(os.listdir(cfg.prepared_dir)) == ["train", "val"]  # temporary directories removed
    assert prepare(cfg, small_tokenizer, show_progress=False) == manifests  # old data still valid, reused


def test_a_first_failed_prepare_leaves_no_split(tmp_path: Path, small_tokenizer) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "ok", "text": "fine"}\n{"id": "broken"}\n')
    cfg = _config(tmp_path, [SourceConfig(name="bad", paths=[str(bad)])])
    with pytest.raises(DataError, match=f"{bad}:2: record has no field 'text'"):
        prepare(cfg, small_tokenizer, show_progress=False)
    assert os.listdir(cfg.prepared_dir) == []


def test_val_split_too_small_is_an_error(tmp_path: Path, small_source: SourceConfig, small_tokenizer) -> None:
    cfg = _config(tmp_path, [small_source], seq_len=2048, val_fraction=0.01)
    with pytest.raises(
        DataError, match="val split got no full sequence.*raise data.val_fraction or lower data.seq_len"
    ):
        prepare(cfg, small_tokenizer, show_progress=False)
    assert os.listdir(cfg.prepared_dir) == []


def test_no_val_split(tmp_path: Path, small_source: SourceConfig, small_tokenizer) -> None:
    manifests = prepare(
        _config(tmp_path, [small_source], val_fraction=0.0), small_tokenizer, show_progress=False
    )
    assert manifests["val"]["num_sequences"] == 0 and manifests["val"]["num_documents"] == 0
    assert manifests["train"]["num_documents"] == 40


def test_split_is_stable_and_close_to_the_fraction(shakespeare_docs) -> None:
    val = [d for d in shakespeare_docs if split_of(d, 0.2) == "val"]
    assert 0.15 < len(val) / len(shakespeare_docs) < 0.25
    # a larger fraction only moves documents from train to val
    assert {d.id for d in val} <= {d.id for d in shakespeare_docs if split_of(d, 0.3) == "val"}


def test_tokenizer_training_budget(tmp_path: Path, shakespeare_source: SourceConfig, stdlib_source) -> None:
    texts = list(_budgeted_texts([shakespeare_source, stdlib_source], 50_000))
    assert sum(map(len, texts)) == 50_000
    assert texts[:-1] == [d.text for d in list(iter_sources([shakespeare_source]))[: len(texts) - 1]]


def test_missing_tokenizer_without_training(tmp_path: Path, small_source: SourceConfig) -> None:
    cfg = _config(tmp_path, [small_source])
    cfg.tokenizer.train = False
    with pytest.raises(DataError, match="no tokenizer at .*data.tokenizer.train=false"):
        ensure_tokenizer(cfg, show_progress=False)


def test_train_into_a_tokenizer_json_path(tmp_path: Path, small_source: SourceConfig) -> None:
    cfg = _config(tmp_path, [small_source])
    cfg.tokenizer.path = str(tmp_path / "tok" / "tokenizer.json")
    cfg.tokenizer.vocab_size = 300
    tokenizer = ensure_tokenizer(cfg, show_progress=False)
    assert os.path.isfile(cfg.tokenizer.path) and tokenizer.vocab_size == 300
    assert np.array_equal(tokenizer.encode("Exit"), ensure_tokenizer(cfg, show_progress=False).encode("Exit"))
