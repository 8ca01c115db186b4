"""Turn the configured sources into packed train/val shards, once, resumably, in parallel.

    sources --iter_sources--> documents --iter_chunks--> work units (chunks of ~chunk_chars characters)
            --WorkerPool: split by hash of id, tokenize, pack, write shards--> {dir}/.work-<fp>/{train,val}/
            --all chunks done: manifests, then rename--> {dir}/train, {dir}/val

`{dir}` is `prepared_dir`, or `prepared_dir/<source name>` for each source of a mixture (every source its
own dataset, mixed by the loader).

- Idempotent: the manifests carry a fingerprint of everything that determines their content (sources and
  their file sizes, seq_len, packing, val_fraction, shard_sequences, chunk_chars, tokenizer and its BOS/EOS
  policy); a second call with the same inputs returns at once.
- Resumable: every chunk's shards are written atomically, followed by a small marker file; a run killed at
  any point (SIGKILL included) and started again skips the finished chunks and ends with exactly the
  output of an uninterrupted run. The work directory is named by the fingerprint, so a changed config
  never resumes stale work.
- Parallel and deterministic: chunks are tokenized by `data.num_workers` processes; the output is
  byte-identical whatever their number.
- Nothing half-written: the finished splits are renamed into place only when complete; a reader never
  sees a directory with a manifest that does not describe it.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

from tqdm import tqdm

from forge_lm.data.chunks import (
    SPLITS,
    Chunk,
    PackSpec,
    iter_chunks,
    pack_chunk,
    register_tokenizer,
    registered_tokenizer,
    split_of,
    tokenizer_key,
)
from forge_lm.data.config import DataConfig, SourceConfig
from forge_lm.data.report import ERROR_REASONS, DataError, InputReport
from forge_lm.data.shards import (
    FORMAT,
    MANIFEST,
    ShardDataset,
    build_manifest,
    shard_paths,
    write_json_atomic,
    write_shard,
)
from forge_lm.data.sources import iter_sources, source_files
from forge_lm.data.tokenizer import Tokenizer, has_tokenizer, load_tokenizer, train_bpe
from forge_lm.data.workers import WorkerPool, resolve_num_workers

__all__ = ["DatasetGroup", "config_fingerprint", "dataset_groups", "ensure_tokenizer", "prepare", "split_of"]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------


def _budgeted_texts(sources: list[SourceConfig], max_chars: int) -> Iterator[str]:
    """The texts of the document stream, the last one truncated, until `max_chars` characters in all."""
    remaining = max_chars
    for doc in iter_sources(sources, InputReport()):
        if remaining <= 0:
            return
        text = doc.text[:remaining]
        remaining -= len(text)
        yield text


def ensure_tokenizer(cfg: DataConfig, show_progress: bool = True) -> Tokenizer:
    """The tokenizer at cfg.tokenizer.path with cfg's BOS/EOS policy; trained on the sources first if missing."""
    path = cfg.tokenizer.path
    policy = dict(
        eos_token=cfg.tokenizer.eos_token,
        bos_token=cfg.tokenizer.bos_token,
        add_bos=cfg.tokenizer.add_bos,
        add_eos=cfg.tokenizer.add_eos,
    )
    if has_tokenizer(path):
        tokenizer = load_tokenizer(path, **policy)
        logger.info("loaded tokenizer from %s: %s", path, tokenizer)
        logger.info("BOS/EOS policy: %s", tokenizer.describe_policy())
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
    tokenizer = load_tokenizer(out_dir, **policy)
    logger.info("trained %s in %.1fs, saved to %s", tokenizer, time.perf_counter() - start, out_dir)
    logger.info("BOS/EOS policy: %s", tokenizer.describe_policy())
    return tokenizer


# ---------------------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------------------


@dataclass
class DatasetGroup:
    """Sources prepared together into one dataset directory (with train/ and val/)."""

    name: str
    directory: str
    sources: list[SourceConfig]

    def split_dir(self, split: str) -> str:
        return os.path.join(self.directory, split)


def dataset_groups(cfg: DataConfig) -> list[DatasetGroup]:
    """One group of all sources in `prepared_dir`, or, for a mixture, one per source in `prepared_dir/<name>`."""
    if cfg.is_mixture:
        return [DatasetGroup(s.name, os.path.join(cfg.prepared_dir, s.name), [s]) for s in cfg.sources]
    return [DatasetGroup(cfg.name, cfg.prepared_dir, list(cfg.sources))]


def config_fingerprint(cfg: DataConfig, tokenizer: Tokenizer, group: Optional[DatasetGroup] = None) -> str:
    """sha256 of everything that determines the prepared shards of `group` (default: the first group).

    Includes the size of every input file, so appending to a corpus re-prepares; edits that keep the
    size are not noticed (delete prepared_dir then). Mixture weights, the worker count and the loader
    settings are left out: they do not change the shards.
    """
    group = group or dataset_groups(cfg)[0]
    sources = []
    for s in group.sources:
        fields = dataclasses.asdict(s)
        fields.pop("weight")
        sources.append(fields)
    payload = {
        "format": FORMAT,
        "sources": sources,
        "files": [source_files(s) for s in group.sources],
        "seq_len": cfg.seq_len,
        "packing": cfg.packing,
        "val_fraction": cfg.val_fraction,
        "shard_sequences": cfg.shard_sequences,
        "chunk_chars": cfg.chunk_chars,
        "tokenizer": tokenizer.fingerprint,
        "policy": tokenizer.policy,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Work units (run in the worker processes)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ChunkJob:
    """One chunk to pack and write: everything but the tokenizer (registered once per worker process)."""

    chunk: Chunk
    spec: PackSpec
    tokenizer: str
    work_dir: str
    shard_sequences: int


def _marker_path(work_dir: str, index: int) -> str:
    return os.path.join(work_dir, "chunks", f"chunk_{index:06d}.json")


def _prepare_chunk(job: _ChunkJob) -> dict:
    """Tokenize and pack one chunk, write its shards, then its marker (the proof it is finished)."""
    tokenizer = registered_tokenizer(job.tokenizer)
    chunk, per_file = job.chunk, job.shard_sequences
    result = pack_chunk(chunk, job.spec, tokenizer)
    marker: dict[str, Any] = {"index": chunk.index, "documents": len(chunk.documents), "splits": {}}
    for split in SPLITS:
        rows, stats = result.rows[split], result.stats[split]
        shards = []
        for part, start in enumerate(range(0, len(rows), per_file)):
            part_rows = rows.take(range(start, min(start + per_file, len(rows))))
            name = f"shard_{chunk.index:06d}_{part:02d}"
            shards.append(
                write_shard(os.path.join(job.work_dir, split), name, part_rows, tokenizer.vocab_size)
            )
        marker["splits"][split] = {
            "shards": shards,
            "documents": stats.documents,
            "tokens": stats.tokens,
            "dropped_tokens": stats.dropped_tokens,
            "padding_tokens": stats.padding_tokens,
            "split_documents": stats.split_documents,
            "documents_per_source": result.documents_per_source[split],
        }
    write_json_atomic(_marker_path(job.work_dir, chunk.index), marker)
    return marker


def _finished_chunks(work_dir: str) -> dict[int, dict]:
    """Markers of the chunks a previous (killed) run finished, whose shard files are all still there."""
    done = {}
    for path in glob.glob(os.path.join(work_dir, "chunks", "chunk_*.json")):
        try:
            with open(path, encoding="utf-8") as f:
                marker = json.load(f)
            complete = all(
                os.path.isfile(file)
                for split, info in marker["splits"].items()
                for shard in info["shards"]
                for file in shard_paths(os.path.join(work_dir, split), shard["name"]).values()
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue  # written atomically, so this is not ours: redo the chunk
        if complete:
            done[int(marker["index"])] = marker
    return done


# ---------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------


def _read_manifest(path: str) -> Optional[dict]:
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _matches(manifest: Optional[dict], fingerprint: str) -> bool:
    return manifest is not None and manifest.get("extra", {}).get("config_fingerprint") == fingerprint


def _replace_dir(tmp: str, final: str) -> None:
    """Move the finished directory `tmp` to `final`, replacing what was there."""
    if os.path.exists(final):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.old-", dir=os.path.dirname(final))
        os.replace(final, os.path.join(old, "split"))
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


def _remove_unlisted_files(directory: str, manifest: dict) -> None:
    """Leftovers of killed workers (temporary files) must not end up in the final directory."""
    keep = {MANIFEST} | {
        os.path.basename(p) for s in manifest["shards"] for p in shard_paths(directory, s["name"]).values()
    }
    for name in os.listdir(directory):
        if name not in keep:
            os.remove(os.path.join(directory, name))


def _finalize(group: DatasetGroup, work_dir: str, fingerprint: str) -> Optional[dict[str, dict]]:
    """Move finished splits into place; their manifests, or None if the chunks are not all done yet."""
    manifests = {}
    for split in SPLITS:
        final, staged = group.split_dir(split), os.path.join(work_dir, split)
        if _matches(_read_manifest(staged), fingerprint):
            continue
        if not _matches(_read_manifest(final), fingerprint):
            return None
    for split in SPLITS:
        staged = os.path.join(work_dir, split)
        if _matches(_read_manifest(staged), fingerprint):
            _replace_dir(staged, group.split_dir(split))
        manifests[split] = _read_manifest(group.split_dir(split))
    shutil.rmtree(work_dir, ignore_errors=True)
    return manifests


def _refuse_skipped_input(manifest: dict, group: DatasetGroup) -> None:
    """Strict mode on data prepared leniently: the bad records it skipped are an error now."""
    examples = manifest.get("extra", {}).get("input", {}).get("examples", {})
    for reason in ERROR_REASONS:
        if examples.get(reason):
            raise DataError(
                f"{examples[reason][0]}: {ERROR_REASONS[reason]}. (data.on_bad_input=error, and the data in "
                f"{group.directory} was prepared with this record skipped as {reason}.)"
            )


def _remove_stale_work(group: DatasetGroup, keep: str) -> None:
    for path in glob.glob(os.path.join(glob.escape(group.directory), ".work-*")):
        if path != keep:
            shutil.rmtree(path, ignore_errors=True)


def prepare(
    cfg: DataConfig, tokenizer: Tokenizer, show_progress: bool = True, num_workers: Optional[int] = None
) -> dict[str, dict]:
    """Write (or reuse, or finish) the train and val shards of every dataset group; return their manifests.

    Keys are 'train' and 'val', or '<source>/train' and '<source>/val' for a mixture. In online mode
    there is nothing to prepare and the result is empty. `num_workers` overrides `cfg.num_workers`.
    """
    if cfg.mode == "online":
        logger.info("data.mode=online: nothing to prepare, the loader tokenizes the sources as it goes")
        return {}
    workers = resolve_num_workers(cfg.num_workers if num_workers is None else num_workers)
    manifests: dict[str, dict] = {}
    for group in dataset_groups(cfg):
        prefix = f"{group.name}/" if cfg.is_mixture else ""
        for split, manifest in _prepare_group(cfg, tokenizer, group, workers, show_progress).items():
            manifests[prefix + split] = manifest
        if cfg.verify:
            for split in SPLITS:
                ShardDataset(group.split_dir(split)).verify()
            logger.info("verified the sha256 of every shard in %s", group.directory)
    val_sequences = sum(m["num_sequences"] for key, m in manifests.items() if key.endswith("val"))
    if cfg.is_mixture and cfg.val_fraction > 0 and val_sequences == 0:
        raise DataError(
            f"no source of the mixture got a full val sequence of {cfg.seq_len + 1} tokens with "
            f"data.val_fraction={cfg.val_fraction}: raise data.val_fraction or lower data.seq_len."
        )
    return manifests


def _prepare_group(
    cfg: DataConfig, tokenizer: Tokenizer, group: DatasetGroup, workers: int, show_progress: bool
) -> dict[str, dict]:
    fingerprint = config_fingerprint(cfg, tokenizer, group)
    if all(_matches(_read_manifest(group.split_dir(s)), fingerprint) for s in SPLITS):
        logger.info("reusing prepared data at %s (config fingerprint %s)", group.directory, fingerprint[:12])
        manifests = {s: _read_manifest(group.split_dir(s)) for s in SPLITS}
        if cfg.on_bad_input == "error":
            _refuse_skipped_input(manifests["train"], group)  # type: ignore[arg-type]
        return manifests  # type: ignore[return-value]

    _refuse_another_tokenizers_data(cfg, tokenizer, group)
    work_dir = os.path.join(group.directory, f".work-{fingerprint[:16]}")
    _remove_stale_work(group, keep=work_dir)
    finished = _finalize(group, work_dir, fingerprint)  # a previous run was killed while moving splits
    if finished is not None:
        return finished

    for sub in ("chunks", *SPLITS):
        os.makedirs(os.path.join(work_dir, sub), exist_ok=True)
    done = _finished_chunks(work_dir)
    logger.info("preparing %s; BOS/EOS policy: %s", group.directory, tokenizer.describe_policy())
    if done:
        logger.info("resuming %s: %d finished work units found in %s", group.directory, len(done), work_dir)
    try:
        report, markers = _run_chunks(cfg, tokenizer, group, work_dir, done, workers, show_progress)
        manifests = _write_manifests(cfg, tokenizer, group, work_dir, fingerprint, report, markers)
    except DataError:
        # Bad input in strict mode or a config that yields no data: rerunning gives the same failure, so
        # there is nothing worth resuming.
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    _finalize(group, work_dir, fingerprint)
    return manifests


def _refuse_another_tokenizers_data(cfg: DataConfig, tokenizer: Tokenizer, group: DatasetGroup) -> None:
    """Prepared data of another tokenizer is not replaced unless asked: the directory may be someone's only
    copy of a long preparation, named explicitly (data.prepared_dir) or shared by two configs by accident.
    A changed source or packing setting with the same tokenizer re-prepares as always."""
    for split in SPLITS:
        manifest = _read_manifest(group.split_dir(split))
        theirs = (manifest or {}).get("tokenizer_fingerprint")
        if theirs and theirs != tokenizer.fingerprint and not cfg.overwrite_prepared:
            raise DataError(
                f"{group.split_dir(split)} holds data prepared with another tokenizer (fingerprint {theirs[:12]}, "
                f"this run's is {tokenizer.fingerprint[:12]}): point data.prepared_dir at another directory, "
                "or set data.overwrite_prepared=true to replace it."
            )


def _run_chunks(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    group: DatasetGroup,
    work_dir: str,
    done: dict[int, dict],
    workers: int,
    show_progress: bool,
) -> tuple[InputReport, list[dict]]:
    report = InputReport(strict=cfg.on_bad_input == "error")
    markers: dict[int, dict] = {}
    num_chunks = 0
    start = time.perf_counter()
    tokens = documents = 0
    bar = tqdm(desc=f"prepare {group.name}", unit="doc", unit_scale=True, disable=not show_progress)

    def count(marker: dict) -> None:
        nonlocal tokens, documents
        markers[marker["index"]] = marker
        documents += marker["documents"]
        tokens += sum(info["tokens"] + info["dropped_tokens"] for info in marker["splits"].values())
        bar.update(marker["documents"])
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix_str(f"{tokens:,} tokens, {tokens / elapsed:,.0f} tokens/s, {num_chunks} units")

    spec = PackSpec(cfg.seq_len, cfg.packing, cfg.val_fraction)
    key = tokenizer_key(tokenizer)

    def todo() -> Iterator[_ChunkJob]:
        nonlocal num_chunks
        for chunk in iter_chunks(iter_sources(group.sources, report), cfg.chunk_chars):
            num_chunks = chunk.index + 1
            if chunk.index in done:
                count(done[chunk.index])
            else:
                yield _ChunkJob(chunk, spec, key, work_dir, cfg.shard_sequences)

    pool = WorkerPool(workers, initializer=register_tokenizer, initargs=(tokenizer,))
    try:
        with pool:
            for marker in pool.imap(_prepare_chunk, todo()):
                count(marker)
    finally:
        bar.close()
    report.check_totals()
    elapsed = time.perf_counter() - start
    logger.info(
        "%s: %d documents, %d tokens in %d work units in %.1fs (%.0f documents/s, %.0f tokens/s, %s)",
        group.name,
        documents,
        tokens,
        num_chunks,
        elapsed,
        documents / max(elapsed, 1e-9),
        tokens / max(elapsed, 1e-9),
        f"{workers} worker processes" if pool.started else "in this process",
    )
    logger.info("%s", report.summary())
    return report, [markers[i] for i in range(num_chunks)]


def _write_manifests(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    group: DatasetGroup,
    work_dir: str,
    fingerprint: str,
    report: InputReport,
    markers: list[dict],
) -> dict[str, dict]:
    manifests = {}
    for split in SPLITS:
        infos = [m["splits"][split] for m in markers]
        per_source: Counter = Counter()
        for info in infos:
            per_source.update(info["documents_per_source"])
        extra = {
            "config_fingerprint": fingerprint,
            "split": split,
            "dataset": group.name,
            "val_fraction": cfg.val_fraction,
            "chunk_chars": cfg.chunk_chars,
            "num_work_units": len(markers),
            "split_documents": sum(i["split_documents"] for i in infos),
            "documents_per_source": dict(sorted(per_source.items())),
            "tokenizer_policy": tokenizer.policy,
            "input": report.to_dict(),
        }
        manifests[split] = build_manifest(
            [shard for info in infos for shard in info["shards"]],
            seq_len=cfg.seq_len,
            vocab_size=tokenizer.vocab_size,
            tokenizer_fingerprint=tokenizer.fingerprint,
            packing=cfg.packing,
            num_documents=sum(i["documents"] for i in infos),
            dropped_tokens=sum(i["dropped_tokens"] for i in infos),
            extra=extra,
        )

    train, val = manifests["train"], manifests["val"]
    if train["num_sequences"] == 0:
        raise DataError(
            f"{group.name}: the train split got no full sequence of {cfg.seq_len + 1} tokens "
            f"({train['num_documents']} documents, {train['dropped_tokens']} tokens): add data or lower "
            "data.seq_len."
        )
    if cfg.val_fraction > 0 and val["num_sequences"] == 0 and cfg.is_mixture:
        # One small source of a mixture may well have no held-out sequence; `prepare` checks the total.
        logger.warning(
            "%s: the val split got no full sequence (data.val_fraction=%s)", group.name, cfg.val_fraction
        )
    elif cfg.val_fraction > 0 and val["num_sequences"] == 0:
        raise DataError(
            f"{group.name}: the val split got no full sequence of {cfg.seq_len + 1} tokens "
            f"({val['num_documents']} documents, {val['dropped_tokens']} tokens) with "
            f"data.val_fraction={cfg.val_fraction}: raise data.val_fraction or lower data.seq_len."
        )
    for split, manifest in manifests.items():
        directory = os.path.join(work_dir, split)
        _remove_unlisted_files(directory, manifest)
        write_json_atomic(os.path.join(directory, MANIFEST), manifest)
        logger.info(
            "%s %s: %d documents, %d tokens in %d sequences of %d (%d padding), %d tokens dropped",
            group.name,
            split,
            manifest["num_documents"],
            manifest["num_tokens"],
            manifest["num_sequences"],
            cfg.seq_len,
            manifest["num_padding_tokens"],
            manifest["dropped_tokens"],
        )
    return manifests


# ---------------------------------------------------------------------------------------------------------
# Command line: `forge prepare [--verify] [Hydra overrides]`
# ---------------------------------------------------------------------------------------------------------


def main() -> None:
    """`forge prepare [--verify] [Hydra overrides]`: train the tokenizer if needed, write the shards."""
    import sys

    import hydra
    from omegaconf import DictConfig

    from forge_lm.trainer.config_store import register, to_config

    register()
    if "--verify" in sys.argv:  # the same as the override data.verify=true
        sys.argv = [a for a in sys.argv if a != "--verify"] + ["data.verify=true"]

    @hydra.main(version_base="1.3", config_path="pkg://forge_lm.configs", config_name="prepare")
    def _run(dcfg: DictConfig) -> None:
        try:
            cfg = to_config(dcfg).data
            tokenizer = ensure_tokenizer(cfg)
            manifests = prepare(cfg, tokenizer)
        except (ValueError, DataError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        if not manifests:
            print("data.mode=online: nothing to prepare.")
        for key, m in manifests.items():
            print(
                f"{key}: {m['num_documents']:,} documents, {m['num_tokens']:,} tokens, "
                f"{m['num_sequences']:,} sequences of {m['seq_len']} in {os.path.join(cfg.prepared_dir, key)}"
            )
        reports = {m["extra"]["dataset"]: m["extra"]["input"] for m in manifests.values()}
        for name, report in reports.items():
            skipped = ", ".join(f"{n:,} {reason}" for reason, n in report["skipped"].items()) or "none"
            print(
                f"input {name}: {report['records']:,} records, {report['documents']:,} documents, skipped: {skipped}"
            )
        if cfg.verify and manifests:
            print("verified: every shard matches its sha256 in manifest.json")
        print(
            f"tokenizer: {cfg.tokenizer.path} (vocab {tokenizer.vocab_size}; {tokenizer.describe_policy()})"
        )

    _run()


if __name__ == "__main__":
    main()
