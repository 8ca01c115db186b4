"""The tokenizer: a thin wrapper around a HuggingFace `tokenizers.Tokenizer` (a tokenizer.json).

Pre-training needs only a few things from a tokenizer: text -> ids without any added special tokens,
the id that separates documents (EOS), and a fingerprint so that shards tokenized with one tokenizer are
never trained with another. `load_tokenizer` reads any tokenizer.json (GPT-2, Llama, Qwen, Mistral ...)
and picks the document separator; `train_bpe` trains a small byte-level BPE on the corpus for models
trained from scratch. `Tokenizer.save` writes files that `transformers.AutoTokenizer` loads offline.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from typing import Any, Optional

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from data.sources import DataError

logger = logging.getLogger(__name__)

# Candidates for the document separator and for BOS, most common first.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>")
# End-of-turn tokens of chat models. Instruct checkpoints often name one of these as `eos_token`, but a
# base-model corpus must be separated with the plain end-of-document token.
CHAT_ONLY_TOKENS = frozenset(
    {"<|im_end|>", "<|im_start|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<start_of_turn>", "<|end|>"}
)
TRAINED_EOS = "<|endoftext|>"


class Tokenizer:
    """Text <-> token ids, plus the document separator and a fingerprint.

    `split_special_tokens=True` (the default) tokenizes special-token strings that occur inside a
    document (say a literal "<|endoftext|>" in a web page or in tokenizer source code) as ordinary
    text, so that only the packer ever inserts document separators.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        eos_token: str,
        bos_token: Optional[str] = None,
        split_special_tokens: bool = True,
    ) -> None:
        self._tok = tokenizer
        self._tok.encode_special_tokens = split_special_tokens
        self.split_special_tokens = split_special_tokens
        self._eos_token = eos_token
        self._bos_token = bos_token
        self._eos_id = self._id_of(eos_token, "eos")
        self._bos_id = None if bos_token is None else self._id_of(bos_token, "bos")
        self._fingerprint: Optional[str] = None

    def _id_of(self, token: str, role: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise DataError(f"{role} token {token!r} is not in the tokenizer's vocabulary.")
        return token_id

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer`."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included: every id is < vocab_size."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        """Id appended after every document (the document separator)."""
        return self._eos_id

    @property
    def eos_token(self) -> str:
        return self._eos_token

    @property
    def bos_id(self) -> Optional[int]:
        return self._bos_id

    @property
    def bos_token(self) -> Optional[str]:
        return self._bos_token

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical tokenizer JSON: equal fingerprints mean equal ids for every text."""
        if self._fingerprint is None:
            self._fingerprint = hashlib.sha256(self._tok.to_str().encode("utf-8")).hexdigest()
        return self._fingerprint

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS or other special tokens are added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of many texts at once, in parallel threads (much faster than a Python loop)."""
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, special tokens included."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def save(self, out_dir: str, model_max_length: Optional[int] = None) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir`.

        These are the files `transformers.AutoTokenizer.from_pretrained(out_dir)` reads (as a
        PreTrainedTokenizerFast), so an exported model ships with a tokenizer that gives the same ids.
        tokenizer.json is written last: its presence marks a complete tokenizer directory.
        """
        os.makedirs(out_dir, exist_ok=True)
        special: dict[str, Any] = {"eos_token": self.eos_token}
        if self.bos_token is not None:
            special["bos_token"] = self.bos_token
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "split_special_tokens": self.split_special_tokens,
        }
        if model_max_length is not None:
            config["model_max_length"] = model_max_length
        _write_json(os.path.join(out_dir, "tokenizer_config.json"), config)
        _write_json(os.path.join(out_dir, "special_tokens_map.json"), special)
        tmp = os.path.join(out_dir, "tokenizer.json.tmp")
        self._tok.save(tmp)
        os.replace(tmp, os.path.join(out_dir, "tokenizer.json"))

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}:{self.eos_id}, "
            f"bos={self.bos_token!r}:{self.bos_id})"
        )


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def _token_content(value: Any) -> Optional[str]:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _resolve_tokenizer_file(path: str) -> str:
    if os.path.isdir(path):
        file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            raise DataError(
                f"no tokenizer.json in directory {path}: give the directory of a HuggingFace tokenizer "
                "(or its tokenizer.json), or set data.tokenizer.train=true to train one there."
            )
        return file
    if os.path.isfile(path):
        return path
    raise DataError(
        f"tokenizer path {path} does not exist: give a directory holding tokenizer.json or the file "
        "itself, or set data.tokenizer.train=true to train one there."
    )


def load_tokenizer(path: str, split_special_tokens: bool = True) -> Tokenizer:
    """Load a tokenizer.json (or a directory holding one) and choose its document separator.

    EOS: the `eos_token` of a tokenizer_config.json next to the file, unless it is a chat end-of-turn
    token (Qwen's <|im_end|>, Llama-3-Instruct's <|eot_id|>); else the first of EOS_CANDIDATES that is
    an added (special) token; else the configured eos_token even if chat-only. BOS likewise, else None.
    Candidates must be added tokens because big BPE vocabularies also hold "<s>" and "</s>" as ordinary
    text pieces (Qwen3 does), which would never be emitted as a separator by the HF tokenizer.
    """
    file = _resolve_tokenizer_file(path)
    try:
        tok = tokenizers.Tokenizer.from_file(file)
    except Exception as e:
        raise DataError(f"{file}: not a valid tokenizer.json ({e}).") from e

    config: dict[str, Any] = {}
    config_file = os.path.join(os.path.dirname(file), "tokenizer_config.json")
    if os.path.isfile(config_file):
        try:
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{config_file}: unreadable ({e}): fix or delete it.") from e

    def in_vocab(token: Optional[str]) -> bool:
        return token is not None and tok.token_to_id(token) is not None

    added = {t.content for t in tok.get_added_tokens_decoder().values()}
    config_eos = _token_content(config.get("eos_token"))
    eos = config_eos if in_vocab(config_eos) and config_eos not in CHAT_ONLY_TOKENS else None
    eos = eos or next((t for t in EOS_CANDIDATES if t in added), None)
    eos = eos or (config_eos if in_vocab(config_eos) else None)
    if eos is None:
        raise DataError(
            f"{file}: found no document separator: none of {EOS_CANDIDATES} is a special token and "
            f"{config_file} names no eos_token. Add an eos_token to tokenizer_config.json."
        )

    config_bos = _token_content(config.get("bos_token"))
    bos = config_bos if in_vocab(config_bos) else None
    bos = bos or next((t for t in BOS_CANDIDATES if t in added), None)
    return Tokenizer(tok, eos_token=eos, bos_token=bos, split_special_tokens=split_special_tokens)


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str, show_progress: bool = True) -> Tokenizer:
    """Train a byte-level BPE on `texts`, save it to `out_dir` and return it.

    Byte-level (GPT-2 style): every string maps to bytes first, so there is no unknown token and
    decode(encode(text)) == text for any text. The only special token is <|endoftext|>, the document
    separator. `out_dir` appears complete or not at all: files go to a temporary sibling directory
    that is renamed into place.
    """
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[TRAINED_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size(with_added_tokens=True) <= 257:
        raise DataError("the tokenizer training text is empty: check that the sources hold documents.")
    trained = Tokenizer(tok, eos_token=TRAINED_EOS)

    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        trained.save(tmp)
        if os.path.isdir(out_dir) and not os.listdir(out_dir):
            os.rmdir(out_dir)
        if not os.path.exists(out_dir):
            os.rename(tmp, out_dir)
        else:  # a non-empty directory (say, a README next to it): move the files in, tokenizer.json last
            for name in ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
                os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("trained a byte-level BPE with %d tokens, saved to %s", trained.vocab_size, out_dir)
    return trained
