"""Bad input: every kind is skipped and counted with its file:line by default, stops a strict run with its
file:line, and the counts always add up to the input."""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
from pathlib import Path

import pytest
import zstandard

from forge_lm.data.config import DataConfig, SourceConfig, TokenizerConfig
from forge_lm.data.prepare import prepare
from forge_lm.data.report import ERROR_REASONS, REASONS, DataError, InputReport
from forge_lm.data.sources import Document, iter_documents


def _line(doc: Document) -> bytes:
    return (json.dumps({"id": doc.id, "text": doc.text}) + "\n").encode()


@pytest.fixture()
def corpus(tmp_path: Path, shakespeare_docs: list[Document]) -> dict:
    """A directory holding one of every kind of bad input between real Shakespeare scenes."""
    good = [d for d in shakespeare_docs if 100 < len(d.text) < 20_000]
    root = tmp_path / "corpus"
    root.mkdir()
    a = root / "a.jsonl"
    a.write_bytes(
        b"".join(
            [
                _line(good[0]),  # 1 kept
                b'{"id": "x", "text": "unterminated\n',  # 2 malformed_json
                b"\n",  # 3 empty (blank line)
                b'{"id": "y", "text": "caf\xe9"}\n',  # 4 invalid_utf8
                b'["a list"]\n',  # 5 not_an_object
                b'{"id": "z", "body": "no text field"}\n',  # 6 missing_field
                b'{"id": "w", "text": 42}\n',  # 7 not_a_string
                b'{"id": "v", "text": ""}\n',  # 8 empty
                _line(good[1]),  # 9 kept
                b'{"id": "s", "text": "Ay."}\n',  # 10 too_short (min_chars=10)
            ]
        )
    )
    # 60 scenes, cut in the middle of the compressed stream: the first ones are kept, then unreadable_file
    full = zstandard.ZstdCompressor().compress(b"".join(_line(d) for d in good[2:62]))
    (root / "b.jsonl.zst").write_bytes(full[: len(full) // 2])
    (root / "c.txt").write_bytes("line one\nline two\ncafé\n".encode("latin-1"))  # invalid_utf8 at line 3
    (root / "d.txt").write_bytes(b"")  # empty
    (root / "e.txt").write_text("this file is deleted once reading has begun")  # vanished_file
    (root / "f.txt").write_text("x" * 30_000)  # too_long (max_chars=25_000)
    return {"root": root, "good": good, "a": str(a), "b": str(root / "b.jsonl.zst")}


EXPECTED = {
    "malformed_json": 1,
    "invalid_utf8": 2,
    "not_an_object": 1,
    "missing_field": 1,
    "not_a_string": 1,
    "unreadable_file": 1,
    "vanished_file": 1,
    "empty": 3,
    "too_short": 1,
    "too_long": 1,
}


def _source(corpus: dict, **kwargs) -> SourceConfig:
    return SourceConfig(name="bad", paths=[str(corpus["root"])], min_chars=10, max_chars=25_000, **kwargs)


def _read_deleting_e(source: SourceConfig, report: InputReport, root: Path) -> list[Document]:
    """Read all documents; e.txt is deleted after the first document, while the run is under way."""
    docs = []
    for doc in iter_documents(source, report):
        if not docs:
            os.remove(root / "e.txt")
        docs.append(doc)
    return docs


def test_every_kind_is_counted_with_its_location(corpus: dict) -> None:
    assert set(EXPECTED) == set(REASONS)  # this corpus covers every kind there is
    report = InputReport()
    docs = _read_deleting_e(_source(corpus), report, corpus["root"])
    assert dict(report.skipped) == EXPECTED

    # Nothing is lost silently: records = documents kept + skipped, and the records are the input's.
    report.check_totals()
    kept_from_b = len(docs) - 2
    assert 0 < kept_from_b < 60  # the scenes before the damage are kept
    assert [d.id for d in docs] == [d.id for d in corpus["good"][: 2 + kept_from_b]]
    assert report.records == 10 + (kept_from_b + 1) + 4  # a.jsonl lines, b's + its damage, 4 text files
    assert report.documents == len(docs) and report.documents_per_source == {"bad": len(docs)}

    a, root = corpus["a"], corpus["root"]
    first = {reason: locations[0] for reason, locations in report.examples.items()}
    assert first["malformed_json"].startswith(f"{a}:2: malformed JSON")
    assert first["empty"] == f"{a}:3"
    assert first["invalid_utf8"].startswith(f"{a}:4: invalid UTF-8")
    assert report.examples["invalid_utf8"][1].startswith(f"{root}/c.txt:3: invalid UTF-8")
    assert first["not_an_object"].startswith(f"{a}:5: expected a JSON object, got list")
    assert first["missing_field"].startswith(f"{a}:6: record has no field 'text' (fields: id, body)")
    assert first["not_a_string"].startswith(f"{a}:7: field 'text' is a int")
    assert first["too_short"].startswith(f"{a}:10: 3 characters < min_chars=10")
    assert re.match(rf"{re.escape(corpus['b'])}:{kept_from_b + 1}: cannot read", first["unreadable_file"])
    assert first["vanished_file"].startswith(f"{root}/e.txt")
    assert first["too_long"].startswith(f"{root}/f.txt")

    summary = report.summary()
    assert f"{report.records:,} records -> {len(docs)} documents kept" in summary
    assert "skipped 1 x malformed_json" in summary and f"{a}:2" in summary
    assert json.loads(json.dumps(report.to_dict()))["skipped"] == EXPECTED


def test_only_the_first_locations_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "many.jsonl"
    path.write_text("{broken\n" * 12 + '{"text": "fine"}\n')
    report = InputReport(max_examples=3)
    assert [d.text for d in iter_documents(SourceConfig(name="m", paths=[str(path)]), report)] == ["fine"]
    assert report.skipped["malformed_json"] == 12
    assert [e.split(": ")[0] for e in report.examples["malformed_json"]] == [f"{path}:{i}" for i in (1, 2, 3)]
    report.check_totals()


BAD_RECORDS = {
    "malformed_json": (b'{"id": "x", "text": "unterminated\n', "malformed JSON"),
    "invalid_utf8": (b'{"id": "y", "text": "caf\xe9"}\n', "invalid UTF-8"),
    "not_an_object": (b"42\n", "expected a JSON object, got int"),
    "missing_field": (b'{"id": "z", "body": "x"}\n', "record has no field 'text'.*set `text_field`"),
    "not_a_string": (b'{"id": "w", "text": null}\n', "field 'text' is a null, not a string"),
}


@pytest.mark.parametrize("reason", sorted(BAD_RECORDS))
@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_strict_mode_stops_at_the_first_one_naming_file_and_line(
    tmp_path: Path, shakespeare_docs, reason: str, suffix: str
) -> None:
    bad, message = BAD_RECORDS[reason]
    data = _line(shakespeare_docs[0]) + _line(shakespeare_docs[1]) + bad + _line(shakespeare_docs[2])
    path = tmp_path / f"x{suffix}"
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    source = SourceConfig(name="s", paths=[str(path)])
    report = InputReport(strict=True)
    docs = iter_documents(source, report)
    assert [next(docs).id, next(docs).id] == [shakespeare_docs[0].id, shakespeare_docs[1].id]
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:3: {message}"):
        next(docs)
    # the same record, not strict: counted, and the run goes on
    lenient = InputReport()
    assert len(list(iter_documents(source, lenient))) == 3
    assert dict(lenient.skipped) == {reason: 1}


def test_strict_mode_file_level_errors(corpus: dict) -> None:
    root = corpus["root"]
    for name, message in [
        ("b.jsonl.zst", r"b\.jsonl\.zst:\d+: cannot read the file past line \d+"),
        ("c.txt", r"c\.txt:3: invalid UTF-8.*exclude"),
    ]:
        with pytest.raises(DataError, match=message):
            list(iter_documents(SourceConfig(name="s", paths=[str(root / name)]), InputReport(strict=True)))
    good = root / "good.jsonl"
    good.write_bytes(_line(corpus["good"][0]))
    docs = iter_documents(
        SourceConfig(name="s", paths=[str(good), str(root / "e.txt")]), InputReport(strict=True)
    )
    assert next(docs).id == corpus["good"][0].id  # the file list is made; e.txt is next
    os.remove(root / "e.txt")
    with pytest.raises(DataError, match=f"^{re.escape(str(root / 'e.txt'))}: file not found"):
        next(docs)
    # filters are the configuration at work, never errors: empty and too long files only count
    report = InputReport(strict=True)
    source = SourceConfig(name="s", paths=[str(root / "d.txt"), str(root / "f.txt")], max_chars=25_000)
    assert list(iter_documents(source, report)) == []
    assert dict(report.skipped) == {"empty": 1, "too_long": 1}
    assert set(ERROR_REASONS).isdisjoint(report.skipped)


def _prepare_config(tmp_path: Path, source: SourceConfig, tokenizer_dir: str, **kwargs) -> DataConfig:
    return DataConfig(
        name="bad",
        sources=[source],
        tokenizer=TokenizerConfig(path=tokenizer_dir, train=False),
        seq_len=32,
        prepared_dir=str(tmp_path / "prepared"),
        val_fraction=0.0,
        num_workers=0,
        **kwargs,
    )


def test_prepare_counts_bad_input_in_the_manifest_and_summary(
    tmp_path: Path, corpus: dict, small_tokenizer, small_tokenizer_dir: str, caplog
) -> None:
    os.remove(corpus["root"] / "e.txt")  # gone before the run: its pattern still matches the directory
    caplog.set_level(logging.INFO, logger="forge_lm.data")
    cfg = _prepare_config(tmp_path, _source(corpus), small_tokenizer_dir)
    manifests = prepare(cfg, small_tokenizer, show_progress=False)
    report = manifests["train"]["extra"]["input"]
    assert report["skipped"] == {k: v for k, v in EXPECTED.items() if k != "vanished_file"}
    assert report["records"] == report["documents"] + sum(report["skipped"].values())
    assert report["documents"] == manifests["train"]["num_documents"]
    assert report["examples"]["malformed_json"][0].startswith(f"{corpus['a']}:2")
    assert "skipped 1 x malformed_json" in caplog.text and f"{corpus['a']}:2" in caplog.text

    strict = _prepare_config(tmp_path, _source(corpus), small_tokenizer_dir, on_bad_input="error")
    with pytest.raises(DataError, match=f"^{re.escape(corpus['a'])}:2: malformed JSON"):
        prepare(strict, small_tokenizer, show_progress=False)
