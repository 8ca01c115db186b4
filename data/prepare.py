"""Turn the configured sources into packed train/val shards, once.

    sources --iter_sources--> documents --split by hash of id--> train | val
            --Tokenizer.encode_batch--> ids --ConcatPacker--> rows --ShardWriter--> {prepared_dir}/{split}/

`prepare` is idempotent: the manifests carry a fingerprint of everything that determines their content
(sources, seq_len, val_fraction, shard_sequences, tokenizer), and a second call with the same inputs
returns at once. Each split is written into a temporary sibling directory and renamed into place, so an
interrupted run leaves nothing that looks complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator

from tqdm import tqdm

from data.config import DataConfig, SourceConfig
from data.packing import ConcatPacker
from data.shards import FORMAT, MANIFEST, ShardWriter
from data.sources import DataError, Document, expand_paths, iter_sources
from data.tokenizer import Tokenizer, load_tokenizer, train_bpe

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")
ENCODE_BATCH_DOCS = 256


# ---------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------


def _budgeted_texts(sources: list[SourceConfig], max_chars: int) -> Iterator[str]:
    """The texts of the document stream, the last one truncated, until `max_chars` characters in all."""
    remaining = max_chars
    for doc in iter_sources(sources):
        if remaining <= 0:
            return
        text = doc.text[:remaining]
        remaining -= len(text)
        yield text


def ensure_tokenizer(cfg: DataConfig, show_progress: bool = True) -> Tokenizer:
    """The tokenizer at cfg.tokenizer.path; trained on the sources and saved there first if missing."""
    path = cfg.tokenizer.path
    if os.path.isfile(path) or os.path.isfile(os.path.join(path, "tokenizer.json")):
        tokenizer = load_tokenizer(path)
        logger.info("loaded tokenizer from %s: %s", path, tokenizer)
        return tokenizer
    if not cfg.tokenizer.train:
        raise DataError(
            f"no tokenizer at {path} and data.tokenizer.train=false: point data.tokenizer.path at a "
            "tokenizer.json (or its directory), or set data.tokenizer.train=true to train one there."
        )
    out_dir = path
    if path.endswith(".json"):
        if os.path.basename(path) != "tokenizer.json":
            raise DataError(
                f"data.tokenizer.path={path} does not exist and cannot be trained into: a trained tokenizer "
                "is saved as DIR/tokenizer.json, so give a directory (or a path ending in tokenizer.json)."
            )
        out_dir = os.path.dirname(path) or "."
    logger.info(
        "training a byte-level BPE tokenizer (vocab_size=%d) on up to %d characters of %s",
        cfg.tokenizer.vocab_size,
        cfg.tokenizer.train_max_chars,
        ", ".join(s.name for s in cfg.sources),
    )
    start = time.perf_counter()
    train_bpe(
        _budgeted_texts(cfg.sources, cfg.tokenizer.train_max_chars),
        vocab_size=cfg.tokenizer.vocab_size,
        out_dir=out_dir,
        show_progress=show_progress,
    )
    # Reload from disk, so the fingerprint is that of the saved file every later run will load.
    tokenizer = load_tokenizer(out_dir)
    logger.info("trained %s in %.1fs, saved to %s", tokenizer, time.perf_counter() - start, out_dir)
    return tokenizer


# ---------------------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------------------


def split_of(doc: Document, val_fraction: float) -> str:
    """'val' or 'train', a stable function of (source, id): the split survives reordering and new data."""
    digest = hashlib.blake2b(f"{doc.source}\x00{doc.id}".encode(), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "little") / 2**64 < val_fraction else "train"


def config_fingerprint(cfg: DataConfig, tokenizer: Tokenizer) -> str:
    """sha256 of everything that determines the prepared shards.

    Includes the size of every input file, so appending to a corpus re-prepares; edits that keep the
    size are not noticed (delete prepared_dir then).
    """
    payload = {
        "format": FORMAT,
        "sources": [dataclasses.asdict(s) for s in cfg.sources],
        "files": [[(p, os.path.getsize(p)) for p in expand_paths(s)] for s in cfg.sources],
        "seq_len": cfg.seq_len,
        "val_fraction": cfg.val_fraction,
        "shard_sequences": cfg.shard_sequences,
        "tokenizer": tokenizer.fingerprint,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def _existing_manifests(prepared_dir: str, fingerprint: str) -> dict[str, dict] | None:
    manifests = {}
    for split in SPLITS:
        try:
            with open(os.path.join(prepared_dir, split, MANIFEST), encoding="utf-8") as f:
                manifest = json.load(f)
        except (OSError, json.JSONDecodeError):
            return None
        if manifest.get("extra", {}).get("config_fingerprint") != fingerprint:
            return None
        manifests[split] = manifest
    return manifests


def _replace_dir(tmp: str, final: str) -> None:
    """Move the finished directory `tmp` to `final`, replacing what was there."""
    if os.path.exists(final):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.old-", dir=os.path.dirname(final))
        os.replace(final, os.path.join(old, "split"))
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


def _batches(docs: Iterator[Document], size: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def prepare(cfg: DataConfig, tokenizer: Tokenizer, show_progress: bool = True) -> dict[str, dict]:
    """Write {cfg.prepared_dir}/train and /val (or reuse them) and return their manifests."""
    fingerprint = config_fingerprint(cfg, tokenizer)
    existing = _existing_manifests(cfg.prepared_dir, fingerprint)
    if existing is not None:
        logger.info("reusing prepared data at %s (config fingerprint %s)", cfg.prepared_dir, fingerprint[:12])
        return existing

    os.makedirs(cfg.prepared_dir, exist_ok=True)
    tmp_dirs = {s: tempfile.mkdtemp(prefix=f".{s}.tmp-", dir=cfg.prepared_dir) for s in SPLITS}
    try:
        manifests = _write_splits(cfg, tokenizer, fingerprint, tmp_dirs, show_progress)
        for split in SPLITS:
            _replace_dir(tmp_dirs[split], os.path.join(cfg.prepared_dir, split))
    finally:
        for tmp in tmp_dirs.values():
            shutil.rmtree(tmp, ignore_errors=True)

    for split, m in manifests.items():
        logger.info(
            "%s: %d documents, %d tokens in %d sequences of %d, %d tokens dropped (%s)",
            split,
            m["num_documents"],
            m["num_tokens"],
            m["num_sequences"],
            cfg.seq_len,
            m["dropped_tokens"],
            os.path.join(cfg.prepared_dir, split),
        )
    return manifests


def _write_splits(
    cfg: DataConfig, tokenizer: Tokenizer, fingerprint: str, out_dirs: dict[str, str], show_progress: bool
) -> dict[str, dict]:
    packers = {s: ConcatPacker(cfg.seq_len, tokenizer.eos_id) for s in SPLITS}
    per_source = {s: Counter() for s in SPLITS}
    writers = {
        s: ShardWriter(
            out_dirs[s],
            seq_len=cfg.seq_len,
            vocab_size=tokenizer.vocab_size,
            shard_sequences=cfg.shard_sequences,
            tokenizer_fingerprint=tokenizer.fingerprint,
            extra={"config_fingerprint": fingerprint, "split": s, "val_fraction": cfg.val_fraction},
        )
        for s in SPLITS
    }

    start = time.perf_counter()
    num_tokens = 0
    with tqdm(desc="prepare", unit="doc", disable=not show_progress) as bar:
        for batch in _batches(iter_sources(cfg.sources), ENCODE_BATCH_DOCS):
            for doc, ids in zip(batch, tokenizer.encode_batch([d.text for d in batch])):
                split = split_of(doc, cfg.val_fraction)
                per_source[split][doc.source] += 1
                for row in packers[split].add(ids):
                    writers[split].write(row)
                num_tokens += len(ids) + 1
            bar.update(len(batch))
            bar.set_postfix(tokens=num_tokens, tok_per_s=f"{num_tokens / (time.perf_counter() - start):.3g}")

    manifests = {}
    for s in SPLITS:
        packers[s].flush()
        writers[s].extra["documents_per_source"] = dict(per_source[s])
        manifests[s] = writers[s].close(packers[s].documents, dropped_tokens=packers[s].dropped_tokens)

    if manifests["train"]["num_sequences"] == 0:
        raise DataError(
            f"the train split got no full sequence of {cfg.seq_len + 1} tokens ({packers['train'].documents} "
            f"documents, {packers['train'].dropped_tokens} tokens): add data or lower data.seq_len."
        )
    if cfg.val_fraction > 0 and manifests["val"]["num_sequences"] == 0:
        raise DataError(
            f"the val split got no full sequence of {cfg.seq_len + 1} tokens ({packers['val'].documents} "
            f"documents, {packers['val'].dropped_tokens} tokens) with data.val_fraction={cfg.val_fraction}: "
            "raise data.val_fraction or lower data.seq_len."
        )
    return manifests


# ---------------------------------------------------------------------------------------------------------
# Command line: `python -m data.prepare` (the Hydra entry point `main()` goes below this line).
# ---------------------------------------------------------------------------------------------------------


def main() -> None:
    """`python -m data.prepare [Hydra overrides]`: train the tokenizer if needed and write the shards."""
    import sys

    import hydra
    from omegaconf import DictConfig

    from trainer.config_store import register, to_config

    register()

    @hydra.main(version_base="1.3", config_path="../configs", config_name="prepare")
    def _run(dcfg: DictConfig) -> None:
        try:
            cfg = to_config(dcfg).data
            tokenizer = ensure_tokenizer(cfg)
            manifests = prepare(cfg, tokenizer)
        except (ValueError, DataError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        for split, m in manifests.items():
            print(
                f"{split}: {m['num_documents']:,} documents, {m['num_tokens']:,} tokens, "
                f"{m['num_sequences']:,} sequences of {m['seq_len']} in {os.path.join(cfg.prepared_dir, split)}"
            )
        print(f"tokenizer: {cfg.tokenizer.path} (vocab {tokenizer.vocab_size}, eos {tokenizer.eos_token!r})")

    _run()


if __name__ == "__main__":
    main()
