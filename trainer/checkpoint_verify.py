"""Checksums of a checkpoint's files: recorded when it is saved, verified before anything reads it.

Every rank checksums the files it wrote (XXH3-64, streamed, right after writing them while they are still in
the page cache, beside their fsync) and rank 0 records them, with their sizes, in the checkpoint's
`complete.json`:

    {"step": 200, "saved_at": "...", "checksum": "xxh3_64",
     "files": {"__0_0.distcp": {"bytes": 1048576, "xxh3_64": "9c1e2f3a5b6d7e8f"}, ".metadata": {...}, ...}}

XXH3 (the `xxhash` package) runs at memory speed, ~10x zlib's CRC-32 here, which keeps the save overhead
small; records naming "crc32" are verified too.
`verify(path)` compares the files on disk against that record (missing file, wrong size, wrong checksum:
corruption, naming the file). A checkpoint written before checksums were recorded has no "files" and
verifies as *unverified*: it still loads, with a note. The checksum catches flipped bits, truncation and
torn copies; it is not a signature: someone who can write the files can rewrite the record too, which
is why unpickling is restricted separately (trainer/safe_pickle.py).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import xxhash
from torch.distributed.checkpoint import FileSystemWriter

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "complete.json"
ALGORITHM = "xxh3_64"
"""The checksum new checkpoints record; `HASHES` are those that can be verified."""
SIDE_RECORD_SUFFIX = "checksums.json"
"""Each rank's record of the files it wrote (`__<rank>_checksums.json`), merged into complete.json."""
_CHUNK = 8 << 20


class _Crc32:
    """zlib's CRC-32 behind the update/hexdigest interface of hashlib and xxhash."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: Any) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value & 0xFFFFFFFF:08x}"


HASHES: dict[str, Callable[[], Any]] = {"xxh3_64": xxhash.xxh3_64, "crc32": _Crc32}


def file_record(path: Path, algorithm: str = ALGORITHM) -> dict[str, Any]:
    """{"bytes": size, algorithm: hex digest} of one file, read in chunks (never whole in memory)."""
    digest, size = HASHES[algorithm](), 0
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
            size += n
    return {"bytes": size, algorithm: digest.hexdigest()}


class ChecksummingWriter(FileSystemWriter):
    """DCP's file-system writer that, once this rank's files are written, checksums them into a side record
    (in the background thread too, with async saves) for rank 0 to merge into complete.json.

    The checksums are computed while the files are flushed to disk: DCP's own fsync is replaced by one
    that runs beside the checksum thread (both wait on different things: the disk, and memory), so the
    checksums add little to a save."""

    def __init__(self, path: str | os.PathLike, **kwargs: Any) -> None:
        super().__init__(path, sync_files=False, **kwargs)

    def write_data(self, plan: Any, planner: Any) -> Any:
        future = super().write_data(plan, planner)
        results = future.wait()
        root = Path(self.path)
        names = sorted({r.storage_data.relative_path for r in results})
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            checksums = pool.submit(lambda: {name: file_record(root / name) for name in names})
            for name in names:
                fsync_file(root / name)
            record = checksums.result()
        side = root / f"{plan.storage_data.prefix}{SIDE_RECORD_SUFFIX}"
        side.write_text(json.dumps(record))
        return future


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def collect_records(directory: Path) -> dict[str, dict[str, Any]]:
    """Rank 0, before marking a checkpoint complete: the ranks' side records merged, plus a record of every
    other file (train_state.pt, .metadata, files of other writers such as DeepSpeed). Side records are removed."""
    records: dict[str, dict[str, Any]] = {}
    for side in sorted(directory.glob(f"*{SIDE_RECORD_SUFFIX}")):
        records.update(json.loads(side.read_text()))
        side.unlink()
    for f in sorted(directory.iterdir()):
        if f.is_file() and f.name != COMPLETE_MARKER and f.name not in records:
            records[f.name] = file_record(f)
    return records


@dataclass(frozen=True)
class Verdict:
    """The result of verifying one checkpoint directory."""

    path: Path
    status: str
    """'ok' (every recorded file matches), 'unverified' (saved without checksums), 'corrupt' or 'incomplete'."""
    file: Optional[Path] = None
    """The first file that failed, for 'corrupt'."""
    detail: str = ""
    """What is wrong, in words."""

    @property
    def usable(self) -> bool:
        return self.status in ("ok", "unverified")

    def describe(self) -> str:
        if self.status == "corrupt":
            return f"checkpoint {self.path} is corrupt: {self.detail}"
        if self.status == "incomplete":
            return f"checkpoint {self.path} is incomplete: {self.detail}"
        if self.status == "unverified":
            return f"checkpoint {self.path} was saved without checksums, so it loads unverified"
        return f"checkpoint {self.path} verified"


def verify(path: str | os.PathLike, share: tuple[int, int] = (0, 1)) -> Verdict:
    """Check the files of checkpoint `path` against its complete.json.

    share=(i, n): check only every n-th recorded file starting at i, so n processes split the reading.
    """
    path = Path(path)
    marker = path / COMPLETE_MARKER
    if not marker.is_file():
        return Verdict(path, "incomplete", None, f"no {COMPLETE_MARKER}: its save was interrupted")
    try:
        record = json.loads(marker.read_text())
        files = record.get("files")
    except (OSError, ValueError, AttributeError) as e:
        return Verdict(path, "corrupt", marker, f"{marker.name} is unreadable ({e})")
    if files is None:
        return Verdict(path, "unverified")
    algorithm = record.get("checksum", ALGORITHM)
    if algorithm not in HASHES or not isinstance(files, dict):
        return Verdict(path, "corrupt", marker, f"{marker.name} records checksums this version cannot read")
    index, count = share
    for name in sorted(files)[index::count]:
        want = files[name]
        f = path / name
        if not f.is_file():
            return Verdict(path, "corrupt", f, f"{name} is missing")
        size = f.stat().st_size
        if size != want["bytes"]:
            return Verdict(
                path,
                "corrupt",
                f,
                f"{name} has {size:,} bytes where {want['bytes']:,} were saved (truncated or overwritten)",
            )
        got = file_record(f, algorithm)[algorithm]
        if got != want[algorithm]:
            return Verdict(
                path,
                "corrupt",
                f,
                f"{name} fails its checksum ({algorithm} {got}, saved as {want[algorithm]}): its bytes changed on disk "
                "after the save",
            )
    return Verdict(path, "ok")


# ---- one verification per checkpoint per process --------------------------------------------------------

_verdicts: dict[tuple[str, tuple], Verdict] = {}


def _signature(path: Path) -> tuple:
    """Names, sizes and modification times of a checkpoint's files: a changed file gives a new signature."""
    try:
        return tuple(
            sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(path) if e.is_file())
        )
    except OSError:
        return ()


def cached(path: Path) -> Optional[Verdict]:
    return _verdicts.get((str(path.resolve()), _signature(path)))


def remember(verdict: Verdict) -> Verdict:
    """Keep `verdict` so reading the same, unchanged checkpoint again in this process does not re-verify it.
    Logs the note or warning once, when the verdict is new."""
    key = (str(verdict.path.resolve()), _signature(verdict.path))
    if key not in _verdicts and verdict.status == "unverified":
        logger.warning("note: %s (written before checksums were recorded)", verdict.describe())
    _verdicts[key] = verdict
    return verdict
