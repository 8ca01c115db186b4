"""data.sources: every file format and Hugging Face datasets, path expansion, filters, and the strict errors
that name file:line (skipping and counting bad input is tested in test_bad_input.py)."""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path

import pytest
import zstandard

from forge_lm.data.config import SourceConfig
from forge_lm.data.sources import DataError, Document, expand_paths, iter_documents, iter_sources


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
    with pytest.raises(DataError, match=f"{re.escape(path)}:\\d+: cannot read the file past line"):
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


# --------------------------------------------------------------------------------------------------------
# Parquet, Hugging Face datasets, plain-text splitting, filters
# --------------------------------------------------------------------------------------------------------


def _parquet(path: Path, columns: dict, row_group_size: int = 64) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), str(path), row_group_size=row_group_size)
    return str(path)


def test_parquet_is_read_in_record_batches(tmp_path: Path, shakespeare_docs) -> None:
    docs = shakespeare_docs[:300]  # more rows than one record batch and several row groups
    path = _parquet(
        tmp_path / "scenes.parquet",
        {"uid": [d.id for d in docs], "content": [d.text for d in docs], "n": list(range(300))},
    )
    got = list(iter_documents(_source(path, text_field="content", id_field="uid")))
    assert [(d.id, d.text) for d in got] == [(d.id, d.text) for d in docs]
    # without an id column, a row is named path:row (1-based, like lines)
    got = list(iter_documents(_source(path, text_field="content")))
    assert [d.id for d in got[:2]] == [f"{path}:1", f"{path}:2"]


def test_parquet_without_the_text_column(tmp_path: Path) -> None:
    path = _parquet(tmp_path / "x.parquet", {"body": ["a", "b"]})
    with pytest.raises(
        DataError, match=f"{re.escape(path)}: no column 'text' \\(columns: body\\).*text_field"
    ):
        list(iter_documents(_source(path)))


def test_saved_hugging_face_dataset(tmp_path: Path, shakespeare_docs) -> None:
    datasets = pytest.importorskip("datasets")
    docs = shakespeare_docs[:40]
    table = {"id": [d.id for d in docs], "text": [d.text for d in docs]}
    datasets.Dataset.from_dict(table).save_to_disk(str(tmp_path / "single"))
    source = SourceConfig(name="hf", hf_dataset=str(tmp_path / "single"))
    assert [(d.id, d.text) for d in iter_documents(source)] == [(d.id, d.text) for d in docs]

    both = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(table),
            "test": datasets.Dataset.from_dict({"text": ["held out"]}),
        }
    )
    both.save_to_disk(str(tmp_path / "dict"))
    source = SourceConfig(name="hf", hf_dataset=str(tmp_path / "dict"), hf_split="test")
    (doc,) = iter_documents(source)
    assert doc.text == "held out" and doc.id == f"{tmp_path}/dict[test]:1"
    with pytest.raises(DataError, match="has splits \\['train', 'test'\\], not hf_split='validation'"):
        list(
            iter_documents(SourceConfig(name="hf", hf_dataset=str(tmp_path / "dict"), hf_split="validation"))
        )


def test_streamed_load_dataset_spec(tmp_path: Path, shakespeare_docs, stdlib_docs) -> None:
    pytest.importorskip("datasets")
    docs = shakespeare_docs[:25]
    path = tmp_path / "scenes.jsonl"
    path.write_bytes(_jsonl_bytes(_records(docs, 25)))
    source = SourceConfig(name="hf", hf_dataset="json", hf_data_files=[str(path)])
    assert [(d.id, d.text) for d in iter_documents(source)] == [(d.id, d.text) for d in docs]
    # the parquet builder, with a custom text column and no id column
    pq_path = _parquet(tmp_path / "code.parquet", {"code": [d.text for d in stdlib_docs]})
    source = SourceConfig(name="hf", hf_dataset="parquet", hf_data_files=[pq_path], text_field="code")
    got = list(iter_documents(source))
    assert [d.text for d in got] == [d.text for d in stdlib_docs]
    assert got[0].id == "parquet[train]:1"
    with pytest.raises(DataError, match="cannot open hf_dataset='no/such-dataset'"):
        list(iter_documents(SourceConfig(name="hf", hf_dataset="no/such-dataset")))


def test_text_split_by_line_and_paragraph(tmp_path: Path, shakespeare_docs) -> None:
    text = "First para, line one.\nline two.\n\n\nSecond para.\n   \nThird\r\n"
    path = _write(tmp_path / "poem.txt", text.encode())
    lines = list(iter_documents(_source(path, text_split="line")))
    assert [(d.text, d.id) for d in lines] == [
        ("First para, line one.", f"{path}:1"),
        ("line two.", f"{path}:2"),
        ("Second para.", f"{path}:5"),
        ("   ", f"{path}:6"),
        ("Third", f"{path}:7"),
    ]
    paragraphs = list(iter_documents(_source(path, text_split="paragraph")))
    assert [(d.text, d.id) for d in paragraphs] == [
        ("First para, line one.\nline two.", f"{path}:1"),
        ("Second para.", f"{path}:5"),
        ("Third", f"{path}:7"),
    ]
    # a real scene split into its speeches
    scene = _write(tmp_path / "scene.txt", shakespeare_docs[1].text.encode())
    speeches = list(iter_documents(_source(scene, text_split="paragraph")))
    assert len(speeches) > 10
    assert "\n\n".join(d.text for d in speeches) == shakespeare_docs[1].text.strip("\n")


def test_character_filters(tmp_path: Path, shakespeare_docs) -> None:
    docs = shakespeare_docs[:60]
    path = _write(tmp_path / "x.jsonl", _jsonl_bytes(_records(docs, 60)))
    kept = list(iter_documents(_source(path, min_chars=2000, max_chars=6000)))
    assert [d.id for d in kept] == [d.id for d in docs if 2000 <= len(d.text) <= 6000]
    assert 0 < len(kept) < 60
    # a whole-file document bigger than 4 x max_chars bytes is skipped without being read
    big = _write(tmp_path / "big.txt", b"x" * 5000)
    assert list(iter_documents(_source(big, max_chars=1000))) == []
