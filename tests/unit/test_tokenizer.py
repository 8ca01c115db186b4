"""data.tokenizer: a trained byte-level BPE, the real Qwen3 and GPT-2 tokenizers, the BOS/EOS policy, HF
compatibility."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import tokenizers

from forge_lm.data.sources import DataError, Document
from forge_lm.data.tokenizer import Tokenizer, load_tokenizer, train_bpe
from tests.conftest import REPO

ASSETS = REPO / "tests" / "assets" / "tokenizers"

ODD_TEXT = (
    "tabs\tand\r\nCRLF, NUL \x00, emoji 🎭, 漢字, Ünïcödé, trailing spaces   \n\n\n  <|endoftext|> literal"
)


@pytest.fixture(scope="module")
def qwen3(qwen3_dir: str) -> Tokenizer:
    return load_tokenizer(qwen3_dir)


def _sample_texts(shakespeare_docs: list[Document], stdlib_docs: list[Document]) -> list[str]:
    # scenes never seen in training (the tokenizer saw the first ~230 KB), plus Python source
    return [d.text for d in shakespeare_docs[-5:]] + [d.text for d in stdlib_docs] + [ODD_TEXT]


def test_trained_bpe_round_trips_exactly(small_tokenizer: Tokenizer, shakespeare_docs, stdlib_docs) -> None:
    for text in _sample_texts(shakespeare_docs, stdlib_docs):
        ids = small_tokenizer.encode(text)
        assert small_tokenizer.decode(ids) == text
        assert all(0 <= i < small_tokenizer.vocab_size for i in ids)


def test_trained_bpe_properties(small_tokenizer: Tokenizer, shakespeare_docs) -> None:
    assert small_tokenizer.vocab_size == 1024
    assert small_tokenizer.eos_token == "<|endoftext|>"
    assert small_tokenizer.eos_id == small_tokenizer.backend.token_to_id("<|endoftext|>")
    assert small_tokenizer.bos_id is None and small_tokenizer.bos_token is None
    text = shakespeare_docs[0].text
    # it learned merges: well under one token per byte on text like its training data
    assert len(small_tokenizer.encode(text)) < 0.5 * len(text.encode())


def test_special_token_text_inside_a_document_is_not_a_separator(small_tokenizer: Tokenizer) -> None:
    ids = small_tokenizer.encode("end <|endoftext|> of doc")
    assert small_tokenizer.eos_id not in ids
    assert small_tokenizer.decode(ids) == "end <|endoftext|> of doc"


def test_encode_batch_equals_encode(small_tokenizer: Tokenizer, shakespeare_docs, stdlib_docs) -> None:
    texts = _sample_texts(shakespeare_docs, stdlib_docs)
    assert small_tokenizer.encode_batch(texts) == [small_tokenizer.encode(t) for t in texts]


def test_fingerprint_survives_save_and_load(
    small_tokenizer: Tokenizer, tmp_path: Path, qwen3: Tokenizer
) -> None:
    small_tokenizer.save(str(tmp_path / "copy"))
    reloaded = load_tokenizer(str(tmp_path / "copy"))
    assert reloaded.fingerprint == small_tokenizer.fingerprint
    assert len(reloaded.fingerprint) == 64
    assert reloaded.fingerprint != qwen3.fingerprint


def test_train_writes_atomically(tmp_path: Path, stdlib_docs) -> None:
    out = tmp_path / "tok"
    tok = train_bpe([d.text for d in stdlib_docs], vocab_size=300, out_dir=str(out), show_progress=False)
    assert sorted(os.listdir(out)) == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert os.listdir(tmp_path) == ["tok"]  # no temporary directory left beside it
    assert tok.vocab_size == 300
    # an existing directory (empty, or holding other files) is filled in
    (tmp_path / "empty").mkdir()
    train_bpe(
        [d.text for d in stdlib_docs], vocab_size=300, out_dir=str(tmp_path / "empty"), show_progress=False
    )
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README").write_text("keep me")
    train_bpe(
        [d.text for d in stdlib_docs], vocab_size=300, out_dir=str(tmp_path / "notes"), show_progress=False
    )
    assert sorted(os.listdir(tmp_path)) == ["empty", "notes", "tok"]
    assert (tmp_path / "notes" / "README").read_text() == "keep me"
    assert load_tokenizer(str(tmp_path / "notes")).fingerprint == tok.fingerprint


def test_train_on_nothing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="empty"):
        train_bpe([], vocab_size=300, out_dir=str(tmp_path / "tok"), show_progress=False)


def test_transformers_autotokenizer_gives_the_same_ids(
    small_tokenizer: Tokenizer, tmp_path: Path, shakespeare_docs, stdlib_docs, monkeypatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    small_tokenizer.save(str(tmp_path / "hf"), model_max_length=256)
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["model_max_length"] == 256
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf.eos_token == "<|endoftext|>" and hf.eos_token_id == small_tokenizer.eos_id
    assert len(hf) == small_tokenizer.vocab_size
    for text in _sample_texts(shakespeare_docs, stdlib_docs):
        ids = small_tokenizer.encode(text)
        assert hf.encode(text) == ids
        assert hf.decode(ids) == text


# --------------------------------------------------------------------------------------------------------
# Loading existing tokenizers
# --------------------------------------------------------------------------------------------------------


def test_qwen3_ids_equal_the_tokenizers_library(
    qwen3: Tokenizer, qwen3_dir: str, shakespeare_docs, stdlib_docs
):
    reference = tokenizers.Tokenizer.from_file(os.path.join(qwen3_dir, "tokenizer.json"))
    texts = [d.text for d in shakespeare_docs[:3]] + [d.text for d in stdlib_docs]
    for text in texts:
        assert qwen3.encode(text) == reference.encode(text).ids
        assert qwen3.decode(qwen3.encode(text)) == text
    assert qwen3.encode_batch(texts) == [e.ids for e in reference.encode_batch(texts)]


def test_qwen3_document_separator_is_endoftext_not_chat_eos(qwen3: Tokenizer, qwen3_dir: str) -> None:
    # tokenizer_config.json names <|im_end|> (end of a chat turn); documents are separated by <|endoftext|>
    assert json.loads(Path(qwen3_dir, "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"
    assert (qwen3.eos_token, qwen3.eos_id) == ("<|endoftext|>", 151643)
    # Qwen3 has no BOS; its vocabulary holds "<s>" and "</s>" only as ordinary text pieces, not specials
    assert qwen3.bos_id is None
    assert qwen3.backend.token_to_id("<s>") is not None and qwen3.backend.token_to_id("</s>") is not None
    assert qwen3.vocab_size == 151669
    # the file itself loads the same as its directory
    assert load_tokenizer(os.path.join(qwen3_dir, "tokenizer.json")).eos_id == 151643


def _variant(
    small_tokenizer: Tokenizer, directory: Path, extra_special: list[str], config: dict | None
) -> str:
    """A copy of the small tokenizer with more special tokens and an optional tokenizer_config.json."""
    backend = tokenizers.Tokenizer.from_str(small_tokenizer.backend.to_str())
    backend.add_special_tokens(extra_special)
    directory.mkdir()
    backend.save(str(directory / "tokenizer.json"))
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return str(directory)


def test_eos_from_tokenizer_config_is_respected(small_tokenizer: Tokenizer, tmp_path: Path) -> None:
    path = _variant(
        small_tokenizer, tmp_path / "t", ["<|end_of_text|>", "<s>"], {"eos_token": "<|end_of_text|>"}
    )
    tok = load_tokenizer(path)
    assert tok.eos_token == "<|end_of_text|>" and tok.eos_id == 1024
    assert tok.bos_token == "<s>" and tok.bos_id == 1025  # found among the BOS candidates


def test_chat_eos_in_dict_form_falls_back_to_candidates(small_tokenizer: Tokenizer, tmp_path: Path) -> None:
    config = {
        "eos_token": {"content": "<|eot_id|>", "special": True},
        "bos_token": {"content": "<|begin_of_text|>"},
    }
    path = _variant(small_tokenizer, tmp_path / "t", ["<|begin_of_text|>", "<|eot_id|>"], config)
    tok = load_tokenizer(path)
    assert tok.eos_token == "<|endoftext|>"
    assert tok.bos_token == "<|begin_of_text|>"


def test_no_separator_at_all(tmp_path: Path, stdlib_docs) -> None:
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|im_end|>"], show_progress=False
    )
    backend.train_from_iterator([d.text for d in stdlib_docs], trainer=trainer)
    (tmp_path / "t").mkdir()
    backend.save(str(tmp_path / "t" / "tokenizer.json"))
    with pytest.raises(DataError, match="found no document separator.*Add an eos_token"):
        load_tokenizer(str(tmp_path / "t"))
    # a chat-only eos is used when it is the only choice
    (tmp_path / "t" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    assert load_tokenizer(str(tmp_path / "t")).eos_token == "<|im_end|>"


def test_load_errors_name_the_path(tmp_path: Path, small_tokenizer: Tokenizer) -> None:
    with pytest.raises(DataError, match=f"tokenizer path {tmp_path}/missing does not exist"):
        load_tokenizer(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        DataError,
        match=f"no tokenizer.json \\(nor encoder.json \\+ vocab.bpe\\) in directory {tmp_path}/empty",
    ):
        load_tokenizer(str(tmp_path / "empty"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(DataError, match="broken/tokenizer.json: not a valid tokenizer.json"):
        load_tokenizer(str(tmp_path / "broken"))
    small_tokenizer.save(str(tmp_path / "badconfig"))
    (tmp_path / "badconfig" / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(DataError, match="badconfig/tokenizer_config.json: unreadable"):
        load_tokenizer(str(tmp_path / "badconfig"))
    shutil.rmtree(tmp_path / "badconfig")


# --------------------------------------------------------------------------------------------------------
# GPT-2 (encoder.json + vocab.bpe)
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2(gpt2_dir: str) -> Tokenizer:
    return load_tokenizer(gpt2_dir)


def test_gpt2_published_ids(gpt2: Tokenizer) -> None:
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode("hello world") == [31373, 995]
    assert (gpt2.eos_token, gpt2.eos_id, gpt2.vocab_size) == ("<|endoftext|>", 50256, 50257)
    assert gpt2.bos_id is None and not gpt2.add_bos and gpt2.add_eos
    # the separator's text inside a document is text, not a separator
    assert 50256 not in gpt2.encode("a <|endoftext|> b")


def test_gpt2_ids_equal_the_tokenizers_library(
    gpt2: Tokenizer, gpt2_dir: str, shakespeare_docs, stdlib_docs
) -> None:
    reference = tokenizers.ByteLevelBPETokenizer.from_file(
        os.path.join(gpt2_dir, "encoder.json"), os.path.join(gpt2_dir, "vocab.bpe")
    )
    texts = (
        [d.text for d in shakespeare_docs[:3]] + [d.text for d in stdlib_docs] + [ODD_TEXT.replace("<|", "<")]
    )
    for text in texts:
        assert gpt2.encode(text) == reference.encode(text).ids
        assert gpt2.decode(gpt2.encode(text)) == text
    assert gpt2.encode_batch(texts) == [e.ids for e in reference.encode_batch(texts)]


def test_gpt2_matches_transformers(gpt2: Tokenizer, gpt2_dir: str, stdlib_docs, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    # transformers' own file names for the same two files
    shutil.copy(os.path.join(gpt2_dir, "encoder.json"), tmp_path / "vocab.json")
    shutil.copy(os.path.join(gpt2_dir, "vocab.bpe"), tmp_path / "merges.txt")
    hf = transformers.GPT2TokenizerFast.from_pretrained(str(tmp_path))
    assert hf.encode("Hello world") == [15496, 995]
    for doc in stdlib_docs:
        assert gpt2.encode(doc.text) == hf.encode(doc.text)
    # and load_tokenizer reads that layout too
    assert load_tokenizer(str(tmp_path)).fingerprint == gpt2.fingerprint


# --------------------------------------------------------------------------------------------------------
# BOS/EOS policy
# --------------------------------------------------------------------------------------------------------


def test_policy_of_the_real_tokenizers(qwen3: Tokenizer, gpt2: Tokenizer, small_tokenizer: Tokenizer) -> None:
    assert qwen3.policy == {
        "bos_token": None,
        "bos_id": None,
        "eos_token": "<|endoftext|>",
        "eos_id": 151643,
        "add_bos": False,
        "add_eos": True,
    }
    assert qwen3.describe_policy().startswith("each document = text + '<|endoftext|>'")
    assert "not the chat end-of-turn '<|im_end|>'" in qwen3.describe_policy()
    assert (qwen3.document_bos_id, qwen3.document_eos_id) == (None, 151643)
    assert gpt2.describe_policy().startswith("each document = text + '<|endoftext|>'")


def _llama_like(
    small_tokenizer: Tokenizer, directory: Path, config: dict | None, post_processor: bool
) -> str:
    """The small tokenizer with Llama-style <s>/</s> specials, optionally a post-processor that adds <s>."""
    backend = tokenizers.Tokenizer.from_str(small_tokenizer.backend.to_str())
    backend.add_special_tokens(["<s>", "</s>"])
    if post_processor:
        backend.post_processor = tokenizers.processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))]
        )
    directory.mkdir()
    backend.save(str(directory / "tokenizer.json"))
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return str(directory)


def test_bos_when_the_tokenizer_asks_for_it(small_tokenizer: Tokenizer, tmp_path: Path) -> None:
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    tok = load_tokenizer(_llama_like(small_tokenizer, tmp_path / "cfg", config, post_processor=False))
    assert (tok.add_bos, tok.bos_token, tok.eos_token) == (True, "<s>", "</s>")
    assert tok.describe_policy().startswith("each document = '<s>' + text + '</s>'")
    assert "add_bos_token=true" in tok.describe_policy()

    tok = load_tokenizer(
        _llama_like(small_tokenizer, tmp_path / "post", {"eos_token": "</s>"}, post_processor=True)
    )
    assert tok.add_bos and (tok.document_bos_id, tok.document_eos_id) == (1024, 1025)
    assert "post-processor adds it" in tok.describe_policy()
    # never twice: text is encoded without the tokenizer's own BOS, the packer adds the one BOS
    assert tok.encode("Exit")[0] != 1024 and tok.backend.encode("Exit").ids[0] == 1024
    assert "its own post-processor (<s> + text) is not applied" in tok.describe_policy()


def test_policy_overrides(small_tokenizer: Tokenizer, tmp_path: Path) -> None:
    path = _llama_like(small_tokenizer, tmp_path / "t", {"bos_token": "<s>", "add_bos_token": True}, False)
    tok = load_tokenizer(path, add_bos=False, eos_token="</s>", add_eos=True)
    assert (tok.add_bos, tok.eos_token, tok.document_bos_id) == (False, "</s>", None)
    assert "set by data.tokenizer" in tok.describe_policy()
    tok = load_tokenizer(path, add_eos=False)
    assert tok.document_eos_id is None and "not separated" in tok.describe_policy()
    with pytest.raises(DataError, match="eos_token='<eos>' is not in the vocabulary"):
        load_tokenizer(path, eos_token="<eos>")
    small_tokenizer.save(str(tmp_path / "plain"))  # no BOS token at all
    with pytest.raises(DataError, match="add_bos is set but the tokenizer has no BOS token.*bos_token"):
        load_tokenizer(str(tmp_path / "plain"), add_bos=True)


def test_pickled_tokenizer_keeps_its_policy_and_special_token_handling(qwen3: Tokenizer) -> None:
    copy = pickle.loads(pickle.dumps(qwen3))
    assert copy.policy == qwen3.policy and copy.fingerprint == qwen3.fingerprint
    text = "doc <|endoftext|> still the same doc"
    assert copy.encode(text) == qwen3.encode(text) and 151643 not in copy.encode(text)


# ---- very long documents ---------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["trained", "gpt2", "qwen3"])
def test_a_long_text_is_encoded_in_pieces_to_the_same_ids(
    which, small_tokenizer, shakespeare_docs, stdlib_docs, monkeypatch
):
    """Long texts are cut into pieces at places proven harmless; the ids equal those of the whole text, for
    our trained BPE and for real GPT-2 and Qwen3 tokenizers, on prose and on code (newlines kept)."""
    import forge_lm.data.tokenizer as module

    tok = small_tokenizer if which == "trained" else load_tokenizer(str(ASSETS / which))
    text = "\n".join(d.text for d in shakespeare_docs[:40] + stdlib_docs[:5])
    whole = tok.encode(text)
    monkeypatch.setattr(module, "LONG_TEXT_CHARS", 5_000)
    monkeypatch.setattr(module, "PIECE_CHARS", 2_000)
    assert len(list(tok._pieces(text))) > 20
    assert tok.encode(text) == whole
    assert tok.encode_batch(["short one", text, "another"]) == [
        tok.encode("short one"),
        whole,
        tok.encode("another"),
    ]
    assert (
        tok.encode("x" * 9_000) == tok._tok.encode("x" * 9_000, add_special_tokens=False).ids
    )  # no place to cut


@pytest.mark.slow
def test_a_50mb_single_line_document_tokenizes_in_bounded_memory(tmp_path):
    """Peak memory of tokenizing one 50 MB line (real prose repeated) stays under 1 GB beyond the text."""
    import subprocess
    import sys

    script = f"""
import resource, json, io, zstandard
from forge_lm.data.tokenizer import load_tokenizer
tok = load_tokenizer({str(ASSETS / "gpt2")!r})
raw = zstandard.ZstdDecompressor().stream_reader(open({str(REPO / "data/corpora/shakespeare.jsonl.zst")!r}, "rb"))
one = " ".join(json.loads(line)["text"].replace("\\n", " ") for line in io.TextIOWrapper(raw, encoding="utf-8"))
doc = (one * (50_000_000 // len(one) + 1))[:50_000_000]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ids = tok.encode_batch([doc])[0]
print(len(ids), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=600
    )
    tokens, overhead = map(int, out.stdout.split())
    assert tokens > 10_000_000
    assert overhead < 2**30, f"{overhead / 2**20:.0f} MiB beyond the text"
