"""data.prepare end to end: Shakespeare + CPython sources -> trained tokenizer -> train/val shards; byte-identical
output for any number of workers, and after a SIGKILL and a restart; checksums; mixtures."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from forge_lm.data.config import DataConfig, SourceConfig, TokenizerConfig
from forge_lm.data.loader import Loader
from forge_lm.data.prepare import _budgeted_texts, ensure_tokenizer, prepare, split_of
from forge_lm.data.shards import ShardDataset
from forge_lm.data.sources import DataError, iter_sources


def _config(tmp_path: Path, sources: list[SourceConfig], **kwargs) -> DataConfig:
    defaults = dict(
        tokenizer=TokenizerConfig(path=str(tmp_path / "tokenizer"), vocab_size=1024, train_max_chars=300_000),
        seq_len=128,
        prepared_dir=str(tmp_path / "prepared"),
        val_fraction=0.05,
        shard_sequences=1000,
        num_workers=0,
    )
    return DataConfig(name="test", sources=sources, **{**defaults, **kwargs})


def _files(directory: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()}


def test_prepare_end_to_end_reuse_and_reprepare(
    tmp_path: Path, shakespeare_source: SourceConfig, stdlib_source: SourceConfig, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="forge_lm.data")
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
        # each work unit drops its partial last row, nothing else is lost
        assert manifest["dropped_tokens"] <= 128 * manifest["extra"]["num_work_units"]
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
    sources = [small_source, SourceConfig(name="bad", paths=[str(bad)])]
    broken = _config(tmp_path, sources, val_fraction=0.1, on_bad_input="error")
    with pytest.raises(DataError, match=f"{bad}:2: malformed JSON"):
        prepare(broken, small_tokenizer, show_progress=False)
    assert sorted(os.listdir(cfg.prepared_dir)) == ["train", "val"]  # temporary directories removed
    assert prepare(cfg, small_tokenizer, show_progress=False) == manifests  # old data still valid, reused


def test_a_first_failed_prepare_leaves_no_split(tmp_path: Path, small_tokenizer) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "ok", "text": "fine"}\n{"id": "broken"}\n')
    cfg = _config(tmp_path, [SourceConfig(name="bad", paths=[str(bad)])], on_bad_input="error")
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


# --------------------------------------------------------------------------------------------------------
# Parallel, resumable, verifiable
# --------------------------------------------------------------------------------------------------------


def _tree(directory: Path) -> dict[str, bytes]:
    """Every file below `directory` (relative path -> bytes)."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


@pytest.fixture()
def corpus_config(
    tmp_path: Path, shakespeare_path: str, stdlib_source: SourceConfig, small_tokenizer_dir: str
):
    """~700 KB of prose and code in ~25 work units."""

    def make(prepared: str, weights: tuple = (None, None), **kwargs) -> DataConfig:
        prose = SourceConfig(
            name="shakespeare", paths=[shakespeare_path], max_documents=80, weight=weights[0]
        )
        code = dataclasses.replace(stdlib_source, weight=weights[1])
        fields = dict(
            tokenizer=TokenizerConfig(path=small_tokenizer_dir, train=False),
            seq_len=64,
            prepared_dir=str(tmp_path / prepared),
            val_fraction=0.05,
            shard_sequences=300,
            chunk_chars=30_000,
        )
        return DataConfig(name="mixed", sources=[prose, code], **{**fields, **kwargs})

    return make


def test_output_is_byte_identical_whatever_the_number_of_workers(corpus_config, small_tokenizer) -> None:
    trees = []
    for workers in (1, 2):
        cfg = corpus_config(f"w{workers}", num_workers=workers)
        manifests = prepare(cfg, small_tokenizer, show_progress=False)
        assert manifests["train"]["extra"]["num_work_units"] > 10
        trees.append(_tree(Path(cfg.prepared_dir)))
    assert trees[0] == trees[1]  # (and equal to 0 workers: see the kill test's reference)
    assert sorted({name.split("/")[0] for name in trees[0]}) == ["train", "val"]  # nothing else left


_CHILD = """
import json, sys
from omegaconf import OmegaConf
from forge_lm.data.config import DataConfig
from forge_lm.data.prepare import prepare
from forge_lm.data.tokenizer import load_tokenizer
cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), json.loads(sys.argv[1])))
prepare(cfg, load_tokenizer(cfg.tokenizer.path), show_progress=False)
"""


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_prepare_killed_mid_run_resumes_to_the_uninterrupted_output(
    corpus_config, small_tokenizer, caplog
) -> None:
    import dataclasses
    import signal
    import subprocess
    import sys
    import time

    reference = corpus_config("reference", num_workers=0)
    prepare(reference, small_tokenizer, show_progress=False)

    cfg = corpus_config("killed", num_workers=2)
    prepared = Path(cfg.prepared_dir)
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, json.dumps(dataclasses.asdict(cfg))],
        cwd=str(Path(__file__).resolve().parents[2]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while len(list(prepared.glob(".work-*/chunks/chunk_*.json"))) < 3:
        assert child.poll() is None, (
            f"prepare ended before it could be killed: {child.stderr.read().decode()}"
        )
        assert time.monotonic() < deadline
        time.sleep(0.005)
    workers = _children(child.pid)
    assert len(workers) >= 2  # (the spawned workers, and multiprocessing's resource tracker)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    child.stderr.close()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers):  # its workers notice that their parent is gone and exit
        assert time.monotonic() < deadline, "worker processes outlived their killed parent"
        time.sleep(0.05)

    assert not (prepared / "train").exists()  # nothing that looks finished
    finished = {}  # the shard files of the work units whose marker says they are done
    for marker in prepared.glob(".work-*/chunks/chunk_*.json"):
        for shard in json.loads(marker.read_text())["splits"]["train"]["shards"]:
            for path in marker.parent.parent.glob(f"train/{shard['name']}.*.bin"):
                finished[path.name] = path.stat()
    assert finished

    caplog.set_level(logging.INFO, logger="forge_lm.data")
    manifests = prepare(cfg, small_tokenizer, show_progress=False)
    assert "finished work units found" in caplog.text
    assert _tree(prepared) == _tree(Path(reference.prepared_dir))
    assert sorted(os.listdir(prepared)) == ["train", "val"]
    # the shards finished before the kill were kept, not written again
    for name, before in finished.items():
        after = (prepared / "train" / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert manifests["train"]["num_sequences"] == len(ShardDataset(str(prepared / "train")))


def test_manifest_checksums_and_verify(corpus_config, small_tokenizer) -> None:
    import hashlib

    cfg = corpus_config("v", num_workers=0)
    manifests = prepare(cfg, small_tokenizer, show_progress=False)
    train = Path(cfg.prepared_dir) / "train"
    for shard in manifests["train"]["shards"]:
        for kind, digest in shard["sha256"].items():
            assert hashlib.sha256((train / f"{shard['name']}.{kind}.bin").read_bytes()).hexdigest() == digest
    assert manifests["train"]["tokenizer_fingerprint"] == small_tokenizer.fingerprint
    assert manifests["train"]["extra"]["tokenizer_policy"] == small_tokenizer.policy
    assert max(s["num_sequences"] for s in manifests["train"]["shards"]) <= 300  # shard_sequences

    verifying = corpus_config("v", num_workers=0, verify=True)
    assert prepare(verifying, small_tokenizer, show_progress=False) == manifests  # reused and verified
    victim = train / f"{manifests['train']['shards'][3]['name']}.tokens.bin"
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert prepare(cfg, small_tokenizer, show_progress=False) == manifests  # without verify: not noticed
    with pytest.raises(DataError, match=f"{victim.name}.* is corrupt"):
        prepare(verifying, small_tokenizer, show_progress=False)


def test_a_mixture_prepares_one_dataset_per_source(corpus_config, small_tokenizer, caplog) -> None:
    cfg = corpus_config("mix", weights=(0.7, 0.3), num_workers=0)
    manifests = prepare(cfg, small_tokenizer, show_progress=False)
    assert sorted(manifests) == ["shakespeare/train", "shakespeare/val", "stdlib/train", "stdlib/val"]
    assert sorted(os.listdir(cfg.prepared_dir)) == ["shakespeare", "stdlib"]
    assert manifests["stdlib/train"]["extra"]["documents_per_source"] == {"stdlib": 6}
    assert manifests["stdlib/val"]["num_sequences"] == 0  # a small source may have no val data
    # new weights do not change the shards
    caplog.set_level(logging.INFO, logger="forge_lm.data")
    reweighted = corpus_config("mix", weights=(0.5, 0.5), num_workers=0)
    assert prepare(reweighted, small_tokenizer, show_progress=False) == manifests
    assert caplog.text.count("reusing prepared data") == 2


def test_best_fit_packing_end_to_end(corpus_config, small_tokenizer) -> None:
    concat = prepare(corpus_config("c", num_workers=0, seq_len=512), small_tokenizer, show_progress=False)[
        "train"
    ]
    best_fit = corpus_config("b", num_workers=0, seq_len=512, packing="best_fit")
    best = prepare(best_fit, small_tokenizer, show_progress=False)["train"]
    assert best["packing"] == "best_fit" and best["num_padding_tokens"] > 0 and best["dropped_tokens"] == 0
    assert best["num_documents"] == concat["num_documents"]
    assert best["num_tokens"] == concat["num_tokens"] + concat["dropped_tokens"]  # every token kept
    assert best["extra"]["split_documents"] < best["num_documents"]


@pytest.mark.slow  # two Hydra runs in subprocesses (~10 s); cfg.verify itself is tested above
def test_cli_verify_flag(tmp_path: Path, small_tokenizer_dir: str) -> None:
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "forge_lm.data.prepare",
        "--verify",
        "data=tiny",
        f"output_root={tmp_path}",
        f"data.tokenizer.path={small_tokenizer_dir}",
        "data.seq_len=64",
        "data.num_workers=0",
    ]
    repo = str(Path(__file__).resolve().parents[2])
    first = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "verified: every shard matches its sha256" in first.stdout
    assert "input tiny: " in first.stdout and "skipped: " in first.stdout
    shard = next((tmp_path / "prepared" / "tiny_bpe1024_seq64" / "train").glob("*.tokens.bin"))
    shard.write_bytes(shard.read_bytes()[:-2] + b"\x00\x01")
    second = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2 and f"{shard.name}) is corrupt" in second.stderr


def test_data_of_another_tokenizer_is_refused_not_overwritten(
    tmp_path: Path, shakespeare_source: SourceConfig
) -> None:
    """A prepared_dir written with one tokenizer is not silently re-prepared with another: refused with both
    fingerprints named, and replaced only with data.overwrite_prepared=true."""
    small = _config(tmp_path, [shakespeare_source], seq_len=64)
    first = prepare(small, ensure_tokenizer(small, show_progress=False), show_progress=False)
    other = _config(
        tmp_path,
        [shakespeare_source],
        seq_len=64,
        tokenizer=TokenizerConfig(
            path=str(tmp_path / "tokenizer512"), vocab_size=512, train_max_chars=300_000
        ),
    )
    other_tokenizer = ensure_tokenizer(other, show_progress=False)
    before = _files(tmp_path / "prepared")
    with pytest.raises(
        DataError, match=r"holds data prepared with another tokenizer .*data.overwrite_prepared=true"
    ):
        prepare(other, other_tokenizer, show_progress=False)
    assert _files(tmp_path / "prepared") == before  # nothing touched
    # Asked to, another tokenizer replaces it.
    replaced = prepare(
        dataclasses.replace(other, overwrite_prepared=True), other_tokenizer, show_progress=False
    )
    assert (
        replaced["train"]["tokenizer_fingerprint"]
        == other_tokenizer.fingerprint
        != first["train"]["tokenizer_fingerprint"]
    )
