"""data.sources: every file format, path expansion, and the strict errors that name file:line."""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path

import pytest
import zstandard

from data.config import SourceConfig
from data.sources import DataError, Document, expand_paths, iter_documents, iter_sources


def _records(docs: list[Document], n: int) -> list[dict]:
    return [{"id": d.id, "text": d.text} for d in docs[:n]]


def _jsonl_bytes(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def _write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def _source(*paths: str, **kwargs) -> SourceConfig:
    return SourceConfig(name="test", paths=list(paths), **kwargs)


# --------------------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------------------


def test_real_shakespeare_corpus(shakespeare_docs: list[Document]) -> None:
    assert len(shakespeare_docs) == 775
    first = shakespeare_docs[0]
    assert first.id == "a-midsummer-night-s-dream/001"
    assert first.source == "shakespeare"
    assert "THESEUS" in first.text
    assert len({d.id for d in shakespeare_docs}) == 775


def _compress_zst_two_frames(data: bytes) -> bytes:
    """Two concatenated zstd frames, as `cat a.zst b.zst` or a parallel compressor would produce."""
    half = data.index(b"\n", len(data) // 2) + 1
    c = zstandard.ZstdCompressor()
    return c.compress(data[:half]) + c.compress(data[half:])


@pytest.mark.parametrize(
    "name, encode",
    [
        ("corpus.jsonl", lambda b: b),
        ("corpus.jsonl.zst", _compress_zst_two_frames),
        ("corpus.zst", lambda b: zstandard.ZstdCompressor().compress(b)),
        ("corpus.jsonl.gz", gzip.compress),
        ("corpus.json.gz", gzip.compress),
    ],
)
def test_json_lines_formats(tmp_path: Path, shakespeare_docs: list[Document], name: str, encode) -> None:
    records = _records(shakespeare_docs, 20)
    path = _write(tmp_path / name, encode(_jsonl_bytes(records)))
    docs = list(iter_documents(_source(path)))
    assert [(d.id, d.text) for d in docs] == [(r["id"], r["text"]) for r in records]
    assert all(d.source == "test" for d in docs)


def test_text_files_are_one_document_each(tmp_path: Path, stdlib_dir: str, shakespeare_docs) -> None:
    code = Path(stdlib_dir, "textwrap.py").read_text(encoding="utf-8")
    py = _write(tmp_path / "a.py", code.encode())
    txt = _write(tmp_path / "b.txt", shakespeare_docs[3].text.encode())
    md = _write(tmp_path / "c.md", "# Title\n\nünïcödé ✓ 漢字\r\nwindows line\r\n".encode())
    docs = list(iter_documents(_source(str(tmp_path))))
    assert [d.id for d in docs] == [py, txt, md]
    assert docs[0].text == code
    assert docs[1].text == shakespeare_docs[3].text
    assert docs[2].text == "# Title\n\nünïcödé ✓ 漢字\r\nwindows line\r\n"  # bytes kept exactly


def test_jsonl_without_id_uses_path_and_line_and_skips_blank_lines(tmp_path: Path, shakespeare_docs) -> None:
    texts = [d.text for d in shakespeare_docs[:3]]
    lines = [
        json.dumps({"text": texts[0]}),
        "",
        "   ",
        json.dumps({"text": texts[1]}),
        json.dumps({"text": texts[2]}),
    ]
    path = _write(tmp_path / "x.jsonl", ("\n".join(lines) + "\n\n").encode())
    docs = list(iter_documents(_source(path)))
    assert [d.text for d in docs] == texts
    assert [d.id for d in docs] == [f"{path}:1", f"{path}:4", f"{path}:5"]


def test_custom_text_field_and_numeric_id(tmp_path: Path) -> None:
    path = _write(tmp_path / "x.jsonl", _jsonl_bytes([{"id": 7, "content": "Out, damned spot!"}]))
    (doc,) = iter_documents(_source(path, text_field="content"))
    assert doc == Document(text="Out, damned spot!", source="test", id="7")


def test_empty_texts_are_skipped(tmp_path: Path) -> None:
    path = _write(tmp_path / "x.jsonl", _jsonl_bytes([{"text": ""}, {"text": "To be"}]))
    _write(tmp_path / "empty.txt", b"")
    assert [d.text for d in iter_documents(_source(str(tmp_path)))] == ["To be"]
    assert path


def test_iter_sources_chains_in_order(
    shakespeare_source, stdlib_source, stdlib_docs, shakespeare_docs
) -> None:
    docs = list(iter_sources([stdlib_source, shakespeare_source]))
    assert [d.source for d in docs] == ["stdlib"] * len(stdlib_docs) + ["shakespeare"] * len(shakespeare_docs)
    assert docs[len(stdlib_docs)].id == shakespeare_docs[0].id


def test_streaming_reads_lazily(tmp_path: Path, shakespeare_docs) -> None:
    # The first document comes out before the bad line 2 is ever parsed: files are streamed.
    data = _jsonl_bytes(_records(shakespeare_docs, 1)) + b"{not json\n"
    path = _write(tmp_path / "x.jsonl.zst", zstandard.ZstdCompressor().compress(data))
    docs = iter_documents(_source(path))
    assert next(docs).id == shakespeare_docs[0].id
    with pytest.raises(DataError, match=f"{re.escape(path)}:2"):
        next(docs)


# --------------------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------------------


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    for rel in [
        "b/2.txt",
        "b/1.txt",
        "a/z.jsonl",
        "a/deep/er/x.txt",
        "a/.hidden.txt",
        ".git/config",
        "lib/site-packages/pkg/mod.py",
        "lib/os.py",
    ]:
        _write(tmp_path / rel, b"x")
    return tmp_path


def test_directories_are_walked_recursively_and_sorted(tree: Path) -> None:
    files = expand_paths(_source(str(tree)))
    rel = [os.path.relpath(f, tree) for f in files]
    assert rel == [
        "a/deep/er/x.txt",
        "a/z.jsonl",
        "b/1.txt",
        "b/2.txt",
        "lib/os.py",
        "lib/site-packages/pkg/mod.py",
    ]


def test_globs_excludes_and_max_files(tree: Path) -> None:
    t = str(tree)
    assert expand_paths(_source(f"{t}/b/*.txt")) == [f"{t}/b/1.txt", f"{t}/b/2.txt"]
    assert expand_paths(_source(f"{t}/**/*.txt")) == [f"{t}/a/deep/er/x.txt", f"{t}/b/1.txt", f"{t}/b/2.txt"]
    assert expand_paths(_source(f"{t}/lib/**/*.py", exclude=["*/site-packages/*"])) == [f"{t}/lib/os.py"]
    assert expand_paths(_source(f"{t}/**/*.txt", max_files=2)) == [f"{t}/a/deep/er/x.txt", f"{t}/b/1.txt"]
    # entries keep the order given; a file named twice is read once
    assert expand_paths(_source(f"{t}/b/2.txt", f"{t}/b", f"{t}/a/z.jsonl")) == [
        f"{t}/b/2.txt",
        f"{t}/b/1.txt",
        f"{t}/a/z.jsonl",
    ]


def test_exclude_matches_absolute_path_of_relative_entries(tree: Path, monkeypatch) -> None:
    monkeypatch.chdir(tree)
    assert expand_paths(_source("lib", exclude=[f"{tree}/lib/site-packages/*"])) == ["lib/os.py"]


def test_stdlib_glob_is_sorted(stdlib_dir: str) -> None:
    files = expand_paths(SourceConfig(name="stdlib", paths=[f"{stdlib_dir}/*.py"], max_files=5))
    assert len(files) == 5 and files == sorted(files)
    assert all(f.endswith(".py") and "site-packages" not in f for f in files)


def test_pattern_matching_nothing_names_source_and_pattern(tree: Path) -> None:
    with pytest.raises(DataError, match=r"source 'test'.*nope/\*\.jsonl.*matches no file"):
        expand_paths(_source(f"{tree}/b/1.txt", f"{tree}/nope/*.jsonl"))


def test_everything_excluded_is_an_error(tree: Path) -> None:
    with pytest.raises(DataError, match="excluded"):
        expand_paths(_source(f"{tree}/b", exclude=["*.txt"]))


# --------------------------------------------------------------------------------------------------------
# Errors name file:line and the fix
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad_line, message",
    [
        (b'{"id": "x", "text": "unterminated\n', "malformed JSON"),
        (b'["a list"]\n', "expected a JSON object"),
        (b'{"id": "x", "body": "no text field"}\n', "record has no field 'text'.*set `text_field`"),
        (b'{"id": "x", "text": ["not", "a", "string"]}\n', "field 'text' is a list, not a string"),
        (b'{"id": "x", "text": "caf\xe9"}\n', "invalid UTF-8"),
    ],
)
@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst", ".jsonl.gz"])
def test_bad_records_name_file_and_line(
    tmp_path: Path, shakespeare_docs, bad_line: bytes, message, suffix
) -> None:
    good = _jsonl_bytes(_records(shakespeare_docs, 2))
    data = good + b"\n" + bad_line  # blank line 3, bad line 4
    compress = {
        ".jsonl": lambda b: b,
        ".jsonl.zst": zstandard.ZstdCompressor().compress,
        ".jsonl.gz": gzip.compress,
    }
    path = _write(tmp_path / f"bad{suffix}", compress[suffix](data))
    with pytest.raises(DataError, match=f"{re.escape(path)}:4: {message}"):
        list(iter_documents(_source(path)))


def test_invalid_utf8_text_file_names_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "latin1.txt", "line one\nline two\ncafé\n".encode("latin-1"))
    with pytest.raises(DataError, match=f"{re.escape(path)}:3: invalid UTF-8.*exclude"):
        list(iter_documents(_source(path)))


def test_truncated_zst_file(tmp_path: Path, shakespeare_docs) -> None:
    data = zstandard.ZstdCompressor().compress(_jsonl_bytes(_records(shakespeare_docs, 50)))
    path = _write(tmp_path / "cut.jsonl.zst", data[: len(data) // 2])
    with pytest.raises(DataError, match=f"{re.escape(path)}: cannot read"):
        list(iter_documents(_source(path)))


def test_zst_line_longer_than_read_chunks(tmp_path: Path, shakespeare_docs) -> None:
    # One 3.5 MB record spans several 1 MiB reads and several decompressed chunks.
    big = "".join(d.text for d in shakespeare_docs[:500])
    assert len(big) > 3_000_000
    records = [
        {"id": "small", "text": "Exit, pursued by a bear."},
        {"id": "big", "text": big},
        {"id": "end", "text": "."},
    ]
    path = _write(tmp_path / "big.jsonl.zst", _compress_zst_two_frames(_jsonl_bytes(records)))
    assert [(d.id, d.text) for d in iter_documents(_source(path))] == [(r["id"], r["text"]) for r in records]


def test_max_documents_stops_early(tmp_path: Path, shakespeare_docs) -> None:
    good = _write(tmp_path / "a.jsonl", _jsonl_bytes(_records(shakespeare_docs, 5)))
    bad = _write(tmp_path / "b.jsonl", b"{broken\n")
    docs = list(iter_documents(_source(good, bad, max_documents=3)))
    assert [d.id for d in docs] == [d.id for d in shakespeare_docs[:3]]
    # the limit reached exactly at the end of a.jsonl: b.jsonl is never opened
    assert len(list(iter_documents(_source(good, bad, max_documents=5)))) == 5
    with pytest.raises(DataError, match="b.jsonl:1"):
        list(iter_documents(_source(good, bad, max_documents=6)))
