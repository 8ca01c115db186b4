"""Reading documents out of corpus files and Hugging Face datasets, one at a time.

A source (see `SourceConfig`) is a list of files, directories and glob patterns, or a Hugging Face dataset.
`expand_paths` turns paths into a deterministic list of files, and `iter_documents` streams the documents
out of them:

- `.jsonl`                     one JSON object per line, the text in `source.text_field`
- `.jsonl.zst`, `.zst`         the same, zstandard-compressed (multi-frame files are read to the end)
- `.jsonl.gz`, `.json.gz`      the same, gzip-compressed
- `.parquet`                   one row per document, read in record batches
- anything else (.txt, .py...) plain text: the whole file is one document, or one per line / paragraph
                               (`source.text_split`)
- `source.hf_dataset`          a dataset saved with `save_to_disk`, or a `datasets.load_dataset` spec (streamed)

Files are streamed (a line, a record batch or one plain-text document at a time), so a corpus never has to
fit in memory. Every record ends up either as a `Document` or, through an `InputReport`, as a counted skip
with its `file:line` (see data/report.py): bad input is skipped and counted, or in strict mode stops the run
at the first bad record with a `DataError` naming `file:line` and what to do.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import itertools
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any, Optional

import zstandard

from forge_lm.data.config import SourceConfig
from forge_lm.data.report import DataError, InputReport

__all__ = ["DataError", "Document", "expand_paths", "iter_documents", "iter_sources", "source_files"]


@dataclass
class Document:
    """One training document: its text, the name of the source it came from, and a stable id."""

    text: str
    source: str
    """`SourceConfig.name` of the source this document came from."""
    id: str
    """The record's id field, else `path:line` (JSON lines, text lines and paragraphs, parquet rows) or the path."""


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


def _is_saved_dataset(path: str) -> bool:
    """A directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(
        os.path.join(path, "dataset_dict.json")
    )


def source_files(source: SourceConfig) -> list[tuple[str, int]]:
    """(path, size) of every local file the source reads: what decides whether prepared data is stale.

    A streamed `load_dataset` spec has no local files it can name here (its data files, if any, are listed).
    """
    if source.hf_dataset is None:
        paths = expand_paths(source)
    elif os.path.isdir(source.hf_dataset):
        paths = _walk(source.hf_dataset)
    else:
        paths = [f for pattern in source.hf_data_files for f in sorted(glob.glob(pattern, recursive=True))]
    return [(p, os.path.getsize(p)) for p in paths]


# ---------------------------------------------------------------------------------------------------------
# Records -> documents
# ---------------------------------------------------------------------------------------------------------


class _Reader:
    """Turns the records of one source into documents, reporting everything it cannot use."""

    def __init__(self, source: SourceConfig, report: InputReport) -> None:
        self.source = source
        self.report = report

    def document(self, text: Any, where: str, doc_id: Any = None) -> Optional[Document]:
        """A document from a record's text, or None (counted) if it is not a usable string or is filtered."""
        source = self.source
        if not isinstance(text, str):
            kind = "null" if text is None else type(text).__name__
            self.report.skip("not_a_string", where, f"field {source.text_field!r} is a {kind}, not a string")
            return None
        if not text:
            self.report.skip("empty", where)
            return None
        if len(text) < source.min_chars:
            self.report.skip("too_short", where, f"{len(text)} characters < min_chars={source.min_chars}")
            return None
        if source.max_chars is not None and len(text) > source.max_chars:
            self.report.skip("too_long", where, f"{len(text)} characters > max_chars={source.max_chars}")
            return None
        self.report.keep(source.name, text)
        return Document(text=text, source=source.name, id=where if doc_id is None else str(doc_id))

    def record(self, record: Any, where: str) -> Optional[Document]:
        """A document from one parsed JSON record (or dataset row)."""
        if not isinstance(record, dict):
            self.report.skip("not_an_object", where, f"expected a JSON object, got {type(record).__name__}")
            return None
        field = self.source.text_field
        if field not in record:
            fields = ", ".join(map(str, record)) or "none"
            self.report.skip("missing_field", where, f"record has no field {field!r} (fields: {fields})")
            return None
        return self.document(record[field], where, record.get(self.source.id_field))

    # -- files -------------------------------------------------------------------------------------------

    def file(self, path: str) -> Iterator[Document]:
        fmt = _file_format(path)
        try:
            raw = open(path, "rb")
        except FileNotFoundError:
            self.report.skip("vanished_file", path, "file not found")
            return
        except OSError as e:
            self.report.skip("unreadable_file", path, f"cannot open the file ({e})")
            return
        with raw:
            if fmt == "parquet":
                yield from self._parquet(path, raw)
            elif fmt == "text":
                yield from self._text(path, raw)
            else:
                yield from self._json_lines(path, fmt, raw)

    def _json_lines(self, path: str, fmt: str, raw: IO[bytes]) -> Iterator[Document]:
        lineno = 0
        lines = _raw_lines(raw, fmt)
        try:
            for lineno, raw_line in enumerate(lines, start=1):
                where = f"{path}:{lineno}"
                if not raw_line.strip():
                    self.report.skip("empty", where)
                    continue
                try:
                    line = raw_line.decode("utf-8")
                except UnicodeDecodeError as e:
                    self.report.skip("invalid_utf8", where, f"invalid UTF-8 at byte {e.start} of the line")
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    self.report.skip("malformed_json", where, f"malformed JSON ({e.msg} at column {e.colno})")
                    continue
                doc = self.record(record, where)
                if doc is not None:
                    yield doc
        except (OSError, EOFError, zstandard.ZstdError) as e:
            self.report.skip(
                "unreadable_file", f"{path}:{lineno + 1}", f"cannot read the file past line {lineno} ({e})"
            )
        finally:
            lines.close()

    def _text(self, path: str, raw: IO[bytes]) -> Iterator[Document]:
        split = self.source.text_split
        if split == "file":
            max_chars = self.source.max_chars
            size = os.fstat(raw.fileno()).st_size
            # A UTF-8 character is at most 4 bytes: a file this big is too long without reading it.
            if max_chars is not None and size > 4 * max_chars:
                self.report.skip("too_long", path, f"{size} bytes > 4 x max_chars={max_chars}")
                return
            data = raw.read()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                lineno = data.count(b"\n", 0, e.start) + 1
                self.report.skip("invalid_utf8", f"{path}:{lineno}", "invalid UTF-8 (not a text file?)")
                return
            doc = self.document(text, path)
            if doc is not None:
                yield doc
            return
        # 'line' and 'paragraph': streamed line by line
        paragraph: list[str] = []
        first_line = 0
        for lineno, raw_line in enumerate(raw, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as e:
                self.report.skip("invalid_utf8", where, f"invalid UTF-8 at byte {e.start} of the line")
                continue
            if split == "line":
                doc = self.document(line.rstrip("\r\n"), where)
                if doc is not None:
                    yield doc
            elif line.strip():
                if not paragraph:
                    first_line = lineno
                paragraph.append(line)
            elif paragraph:
                doc = self.document("".join(paragraph).rstrip("\r\n"), f"{path}:{first_line}")
                paragraph = []
                if doc is not None:
                    yield doc
        if paragraph:
            doc = self.document("".join(paragraph).rstrip("\r\n"), f"{path}:{first_line}")
            if doc is not None:
                yield doc

    def _parquet(self, path: str, raw: IO[bytes]) -> Iterator[Document]:
        import pyarrow
        import pyarrow.parquet as pq

        field, id_field = self.source.text_field, self.source.id_field
        try:
            parquet = pq.ParquetFile(raw)
        except (OSError, pyarrow.ArrowException) as e:
            self.report.skip("unreadable_file", path, f"not a readable parquet file ({e})")
            return
        names = parquet.schema_arrow.names
        if field not in names:
            self.report.skip(
                "missing_field",
                path,
                f"no column {field!r} (columns: {', '.join(names)}) in any of its {parquet.metadata.num_rows} rows",
                records=parquet.metadata.num_rows,
            )
            return
        columns = [field] + ([id_field] if id_field in names and id_field != field else [])
        row = 0
        try:
            for batch in parquet.iter_batches(batch_size=1024, columns=columns):
                texts = batch.column(field).to_pylist()
                ids = batch.column(id_field).to_pylist() if len(columns) > 1 else [None] * len(texts)
                for text, doc_id in zip(texts, ids):
                    row += 1
                    doc = self.document(text, f"{path}:{row}", doc_id)
                    if doc is not None:
                        yield doc
        except (OSError, pyarrow.ArrowException) as e:
            self.report.skip("unreadable_file", f"{path}:{row + 1}", f"cannot read past row {row} ({e})")

    # -- Hugging Face datasets ---------------------------------------------------------------------------

    def hf_dataset(self) -> Iterator[Document]:
        rows, where = _open_hf_dataset(self.source)
        for n, row in enumerate(rows, start=1):
            doc = self.record(row, f"{where}:{n}")
            if doc is not None:
                yield doc


def _open_hf_dataset(source: SourceConfig) -> tuple[Iterable[dict], str]:
    """Rows of a saved dataset (memory-mapped) or of a streamed `load_dataset`, and a name for locations."""
    import datasets

    spec = source.hf_dataset
    assert spec is not None
    where = f"{spec}[{source.hf_split}]"
    try:
        if os.path.isdir(spec) and _is_saved_dataset(spec):
            dataset = datasets.load_from_disk(spec)
            if isinstance(dataset, datasets.DatasetDict):
                if source.hf_split not in dataset:
                    raise DataError(
                        f"source {source.name!r}: saved dataset {spec} has splits {list(dataset)}, not "
                        f"hf_split={source.hf_split!r}: set hf_split to one of them."
                    )
                dataset = dataset[source.hf_split]
            else:
                where = spec
        else:
            dataset = datasets.load_dataset(
                spec,
                name=source.hf_name,
                split=source.hf_split,
                data_files=list(source.hf_data_files) or None,
                streaming=True,
            )
    except DataError:
        raise
    except Exception as e:  # datasets raises many kinds (FileNotFoundError, ValueError, its own errors)
        raise DataError(
            f"source {source.name!r}: cannot open hf_dataset={spec!r} (split {source.hf_split!r}): "
            f"{type(e).__name__}: {e}. Check the name or path (a directory from save_to_disk, or a "
            "load_dataset spec with hf_name / hf_data_files)."
        ) from e
    # Only the columns we need; in batches, which is much faster than row by row.
    names = dataset.column_names or []
    keep = [c for c in (source.text_field, source.id_field) if c in names]
    if keep and source.text_field in keep:
        dataset = dataset.select_columns(keep)

    def rows() -> Iterator[dict]:
        for batch in dataset.iter(batch_size=1000):
            columns = list(batch)
            for values in zip(*(batch[c] for c in columns)):
                yield dict(zip(columns, values))

    return rows(), where


def _file_format(path: str) -> str:
    """'jsonl', 'jsonl.zst', 'jsonl.gz', 'parquet' or 'text', from the file name."""
    name = path.lower()
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".zst"):
        return "jsonl.zst"
    if name.endswith((".jsonl.gz", ".json.gz")):
        return "jsonl.gz"
    if name.endswith(".parquet"):
        return "parquet"
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


def _raw_lines(raw: IO[bytes], fmt: str) -> Iterator[bytes]:
    """The lines of a (possibly compressed) file, as bytes.

    Lines are decoded one at a time by the caller (not through a TextIOWrapper), so that invalid
    UTF-8 is reported with its exact line number.
    """
    if fmt == "jsonl.gz":
        with gzip.GzipFile(fileobj=raw, mode="rb") as f:
            yield from f
    elif fmt == "jsonl.zst":
        yield from _split_lines(_zstd_chunks(raw))
    else:
        yield from raw


def _all_documents(source: SourceConfig, report: InputReport) -> Iterator[Document]:
    reader = _Reader(source, report)
    if source.hf_dataset is not None:
        yield from reader.hf_dataset()
        return
    for path in expand_paths(source):
        yield from reader.file(path)


def iter_documents(source: SourceConfig, report: Optional[InputReport] = None) -> Iterator[Document]:
    """Stream the documents of one source, file by file in `expand_paths` order.

    Every record is counted in `report`: kept, or skipped for a reason (see data/report.py). Without a report,
    bad records raise a `DataError` naming `file:line` (nothing can be dropped without being counted), and
    empty or filtered documents are skipped. With `source.max_documents`, stops after that many documents
    without opening the remaining files.
    """
    if report is None:
        report = InputReport(strict=True)
    docs = _all_documents(source, report)
    try:
        yield from itertools.islice(docs, source.max_documents)
    finally:
        docs.close()  # closes the file being read at once, not whenever the generator is collected


def iter_sources(sources: list[SourceConfig], report: Optional[InputReport] = None) -> Iterator[Document]:
    """Stream the documents of several sources, one after the other, in the order given."""
    for source in sources:
        yield from iter_documents(source, report)
