"""Shared fixtures of the data pipeline tests: the real corpora of the repo and a small trained tokenizer.

Everything is real: the Shakespeare corpus shipped in data/corpora, CPython's own standard library
sources, a byte-level BPE trained on ~300 KB of both (vocab 1024, well under a second), and the real
Qwen3 and GPT-2 tokenizers copied into tests/assets.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import pytest

from forge_lm.data.config import SourceConfig
from forge_lm.data.sources import Document, iter_documents, iter_sources
from forge_lm.data.tokenizer import Tokenizer, train_bpe

REPO = Path(__file__).resolve().parents[2]
SHAKESPEARE = REPO / "data" / "corpora" / "shakespeare.jsonl.zst"
QWEN3_DIR = REPO / "tests" / "assets" / "tokenizers" / "qwen3"
GPT2_DIR = REPO / "tests" / "assets" / "tokenizers" / "gpt2"
STDLIB = sysconfig.get_paths()["stdlib"]


@pytest.fixture(scope="session")
def shakespeare_path() -> str:
    """775 scenes, one JSON record {"id", "title", "text"} per line, zstd-compressed."""
    return str(SHAKESPEARE)


@pytest.fixture(scope="session")
def shakespeare_source(shakespeare_path: str) -> SourceConfig:
    return SourceConfig(name="shakespeare", paths=[shakespeare_path])


@pytest.fixture(scope="session")
def shakespeare_docs(shakespeare_source: SourceConfig) -> list[Document]:
    return list(iter_documents(shakespeare_source))


@pytest.fixture(scope="session")
def stdlib_dir() -> str:
    return STDLIB


@pytest.fixture(scope="session")
def stdlib_source(stdlib_dir: str) -> SourceConfig:
    """A few CPython stdlib modules (~70 KB): the json package (a directory) and textwrap.py."""
    return SourceConfig(
        name="stdlib",
        paths=[os.path.join(stdlib_dir, "json"), os.path.join(stdlib_dir, "textwrap.py")],
        exclude=["*/__pycache__/*"],
    )


@pytest.fixture(scope="session")
def stdlib_docs(stdlib_source: SourceConfig) -> list[Document]:
    return list(iter_documents(stdlib_source))


@pytest.fixture(scope="session")
def small_tokenizer(
    tmp_path_factory: pytest.TempPathFactory, shakespeare_source: SourceConfig, stdlib_source: SourceConfig
) -> Tokenizer:
    """Byte-level BPE, vocab 1024, trained on ~230 KB of Shakespeare and ~70 KB of Python."""
    texts, chars = [], 0
    for doc in iter_sources([shakespeare_source]):
        texts.append(doc.text)
        chars += len(doc.text)
        if chars > 230_000:
            break
    texts += [d.text for d in iter_documents(stdlib_source)]
    return train_bpe(
        texts, vocab_size=1024, out_dir=str(tmp_path_factory.mktemp("tok") / "bpe"), show_progress=False
    )


@pytest.fixture(scope="session")
def qwen3_dir() -> str:
    """The real Qwen3 tokenizer (Apache-2.0), copied into tests/assets."""
    return str(QWEN3_DIR)


@pytest.fixture(scope="session")
def gpt2_dir() -> str:
    """The real GPT-2 vocabulary (encoder.json + vocab.bpe, MIT), copied into tests/assets."""
    return str(GPT2_DIR)


@pytest.fixture(scope="session")
def small_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, small_tokenizer: Tokenizer) -> str:
    """`small_tokenizer` saved to a directory, for configs and subprocesses that load it by path."""
    path = tmp_path_factory.mktemp("tokdir") / "bpe"
    small_tokenizer.save(str(path))
    return str(path)


def write_jsonl(path: Path, docs: list[Document]) -> str:
    """Documents as a plain .jsonl file of {"id", "text"} records."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": d.id, "text": d.text}) + "\n" for d in docs), encoding="utf-8")
    return str(path)
