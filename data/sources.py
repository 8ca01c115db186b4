"""Reading documents out of corpus files, one at a time.

A source (see `SourceConfig`) is a list of files, directories and glob patterns. `expand_paths` turns
it into a deterministic list of files, and `iter_documents` streams the documents out of them:

- `.jsonl`                     one JSON object per line, the text in `source.text_field`
- `.jsonl.zst`, `.zst`         the same, zstandard-compressed (multi-frame files are read to the end)
- `.jsonl.gz`, `.json.gz`      the same, gzip-compressed
- anything else (.txt, .py...) the whole file is one document

Files are streamed line by line, so a corpus never has to fit in memory. This first version is strict:
a malformed line stops the run with a `DataError` that names `file:line` and says what to do, because
silently dropping data is the kind of bug that is only noticed weeks later in a loss curve.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import zstandard

from data.config import SourceConfig


class DataError(ValueError):
    """The input data (or a file derived from it) is unusable. The message names where and what to do."""


@dataclass
class Document:
    """One training document: its text, the name of the source it came from, and a stable id."""

    text: str
    source: str
    """`SourceConfig.name` of the source this document came from."""
    id: str
    """The record's "id" field, else `path:line` for JSON lines or the path for whole-file documents."""


# ---------------------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------------------


def _walk(directory: str) -> list[str]:
    """All files below `directory`, sorted by path, skipping hidden files and directories (.git, ...)."""
    files = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files.extend(os.path.join(root, n) for n in names if not n.startswith("."))
    return sorted(files)


def _is_excluded(path: str, patterns: list[str]) -> bool:
    # Match both the path as written and its absolute form, so '*/site-packages/*' works for either.
    full = os.path.abspath(path)
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(full, p) for p in patterns)


def expand_paths(source: SourceConfig) -> list[str]:
    """The files of a source, in a deterministic order.

    Each entry of `source.paths` is a file, a directory (walked recursively) or a glob pattern (`**`
    allowed). Entries are taken in the order given, the files of each entry sorted, duplicates dropped.
    Then `source.exclude` removes files and `source.max_files` keeps the first files.
    An entry that matches nothing is an error, not a silently smaller corpus.
    """
    files: list[str] = []
    seen: set[str] = set()
    for pattern in source.paths:
        path = os.path.expanduser(pattern)
        if os.path.isfile(path):
            matches = [path]
        elif os.path.isdir(path):
            matches = _walk(path)
        else:
            matches = []
            for m in sorted(glob.glob(path, recursive=True)):
                matches.extend(_walk(m) if os.path.isdir(m) else [m])
        if not matches:
            raise DataError(
                f"source {source.name!r}: {pattern!r} matches no file (working directory {os.getcwd()}): "
                "fix the path or glob in the source's `paths`."
            )
        for m in matches:
            if m not in seen:
                seen.add(m)
                files.append(m)

    kept = [f for f in files if not _is_excluded(f, source.exclude)]
    if not kept:
        raise DataError(
            f"source {source.name!r}: all {len(files)} files matched by {source.paths} are excluded by "
            f"{source.exclude}: loosen `exclude`."
        )
    if source.max_files is not None:
        kept = kept[: source.max_files]
    return kept


# ---------------------------------------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------------------------------------


def _file_format(path: str) -> str:
    """'jsonl', 'jsonl.zst', 'jsonl.gz' or 'text', from the file name."""
    name = path.lower()
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".zst"):
        return "jsonl.zst"
    if name.endswith((".jsonl.gz", ".json.gz")):
        return "jsonl.gz"
    return "text"


def _zstd_chunks(raw: IO[bytes]) -> Iterator[bytes]:
    """Decompressed data of every zstd frame in `raw`, in 1 MiB input reads.

    Frames are followed one after the other (files made by `cat a.zst b.zst` or by parallel
    compressors hold several), and a file that ends inside a frame is an error: zstandard's
    stream_reader would silently return the truncated data instead.
    """
    dctx = zstandard.ZstdDecompressor()
    frame = dctx.decompressobj()
    in_frame = False
    while chunk := raw.read(1 << 20):
        while chunk:
            in_frame = True
            out = frame.decompress(chunk)
            if out:
                yield out
            if frame.eof:  # the chunk may hold the start of the next frame
                chunk, frame, in_frame = frame.unused_data, dctx.decompressobj(), False
            else:
                chunk = b""
    if in_frame:
        raise EOFError("the file ends in the middle of a zstd frame")


def _split_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Lines (without the newline) of a stream of chunks; a line may span many chunks."""
    tail: list[bytes] = []
    for chunk in chunks:
        pieces = chunk.split(b"\n")
        if len(pieces) == 1:
            tail.append(chunk)
            continue
        tail.append(pieces[0])
        yield b"".join(tail)
        yield from pieces[1:-1]
        tail = [pieces[-1]]
    if tail and any(tail):
        yield b"".join(tail)


def _raw_lines(path: str, fmt: str) -> Iterator[bytes]:
    """The lines of a (possibly compressed) file, as bytes.

    Lines are decoded one at a time by the caller (not through a TextIOWrapper), so that invalid
    UTF-8 is reported with its exact line number.
    """
    if fmt == "jsonl.gz":
        with gzip.open(path, "rb") as f:
            yield from f
    elif fmt == "jsonl.zst":
        with open(path, "rb") as f:
            yield from _split_lines(_zstd_chunks(f))
    else:
        with open(path, "rb") as f:
            yield from f


def _iter_json_lines(path: str, fmt: str, source: SourceConfig) -> Iterator[Document]:
    lines = _raw_lines(path, fmt)
    try:
        for lineno, raw_line in enumerate(lines, start=1):
            if not raw_line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{where}: invalid UTF-8 at byte {e.start} of the line: re-encode the file as UTF-8 "
                    "or remove the line."
                ) from None
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{where}: malformed JSON ({e.msg} at column {e.colno}): fix or remove the line; "
                    "each line must hold exactly one JSON object."
                ) from None
            if not isinstance(record, dict):
                raise DataError(
                    f"{where}: expected a JSON object, got {type(record).__name__}: each line must hold one "
                    f"object with the text in field {source.text_field!r}."
                )
            if source.text_field not in record:
                raise DataError(
                    f"{where}: record has no field {source.text_field!r} (fields: {', '.join(record)}): "
                    f"set `text_field` of source {source.name!r} to the field holding the text."
                )
            text = record[source.text_field]
            if not isinstance(text, str):
                raise DataError(
                    f"{where}: field {source.text_field!r} is a {type(text).__name__}, not a string: "
                    f"fix the record or point `text_field` of source {source.name!r} at a text field."
                )
            if not text:
                continue
            doc_id = record.get("id")
            yield Document(text=text, source=source.name, id=where if doc_id is None else str(doc_id))
    except (OSError, EOFError, zstandard.ZstdError) as e:
        raise DataError(f"{path}: cannot read the file ({e}): is it truncated or not really {fmt}?") from e
    finally:
        lines.close()


def _read_text_file(path: str, source: SourceConfig) -> Iterator[Document]:
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}:{lineno}: invalid UTF-8 (not a text file?): re-encode it as UTF-8 or leave it out with "
            f"`exclude` in source {source.name!r}."
        ) from None
    if text:
        yield Document(text=text, source=source.name, id=path)


def _all_documents(source: SourceConfig) -> Iterator[Document]:
    for path in expand_paths(source):
        fmt = _file_format(path)
        if fmt == "text":
            yield from _read_text_file(path, source)
        else:
            yield from _iter_json_lines(path, fmt, source)


def iter_documents(source: SourceConfig) -> Iterator[Document]:
    """Stream the documents of one source, file by file in `expand_paths` order.

    Empty texts are skipped. With `source.max_documents`, stops after that many documents without
    opening the remaining files.
    """
    docs = _all_documents(source)
    try:
        yield from itertools.islice(docs, source.max_documents)
    finally:
        docs.close()  # closes the file being read at once, not whenever the generator is collected


def iter_sources(sources: list[SourceConfig]) -> Iterator[Document]:
    """Stream the documents of several sources, one after the other, in the order given."""
    for source in sources:
        yield from iter_documents(source)
