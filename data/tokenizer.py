"""The tokenizer: a thin wrapper around a HuggingFace `tokenizers.Tokenizer` (a tokenizer.json).

Pre-training needs only a few things from a tokenizer: text -> ids without any added special tokens,
the ids that delimit documents (EOS, and BOS for families that use one), and a fingerprint so that shards
tokenized with one tokenizer are never trained with another. `load_tokenizer` reads any tokenizer.json
(GPT-2, Llama, Qwen, Mistral ...) or a GPT-2 style `encoder.json` + `vocab.bpe` pair, and decides the
BOS/EOS policy; `train_bpe` trains a small byte-level BPE on the corpus for models trained from scratch.
`Tokenizer.save` writes files that `transformers.AutoTokenizer` loads offline.

The BOS/EOS policy is explicit, because its mistakes are silent: a document framed twice with BOS (the
tokenizer's post-processor adding one and the pipeline another), a chat end-of-turn token used as the
document separator, or no separator at all all train fine and give a worse model. Text is always encoded
without the tokenizer's own special tokens (`add_special_tokens=False`); the packer then frames every
document as `[BOS] + ids + [EOS]` following `Tokenizer.add_bos` / `Tokenizer.add_eos`, and
`Tokenizer.policy` says (and `prepare` logs) exactly what was chosen and why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any, Optional

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers

from forge_lm.data.report import DataError

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

LONG_TEXT_CHARS = 1 << 20
"""Texts longer than this are encoded a piece at a time (Tokenizer._encode_long)."""
PIECE_CHARS = 1 << 18
PIECES_PER_BATCH = 4
_CUT = re.compile(r"(?<=\S) (?=[^\W\d_])")
"""A space after a non-space and before a letter: where pre-tokenizers start a new word."""


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
        add_bos: bool = False,
        add_eos: bool = True,
        policy_notes: Optional[list[str]] = None,
    ) -> None:
        self._tok = tokenizer
        self._tok.encode_special_tokens = split_special_tokens
        self.split_special_tokens = split_special_tokens
        self._eos_token = eos_token
        self._bos_token = bos_token
        self._eos_id = self._id_of(eos_token, "eos")
        self._bos_id = None if bos_token is None else self._id_of(bos_token, "bos")
        if add_bos and bos_token is None:
            raise DataError(
                "add_bos is set but the tokenizer has no BOS token: set data.tokenizer.bos_token to one of its "
                "special tokens, or data.tokenizer.add_bos=false."
            )
        self.add_bos = add_bos
        """Put BOS before every document."""
        self.add_eos = add_eos
        """Put EOS after every document."""
        self.policy_notes = list(policy_notes or [])
        """Why the separator tokens and flags are what they are (logged by `prepare`)."""
        self._fingerprint: Optional[str] = None

    def __getstate__(self) -> dict:
        # `encode_special_tokens` is not part of tokenizers' own pickled state: keep the JSON and set it again.
        state = self.__dict__.copy()
        state["_tok"] = self._tok.to_str()
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        tok = tokenizers.Tokenizer.from_str(state["_tok"])
        tok.encode_special_tokens = state["split_special_tokens"]
        state["_tok"] = tok
        self.__dict__.update(state)

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
    def document_bos_id(self) -> Optional[int]:
        """The id the packer puts before each document (None: nothing)."""
        return self._bos_id if self.add_bos else None

    @property
    def document_eos_id(self) -> Optional[int]:
        """The id the packer puts after each document (None: nothing)."""
        return self._eos_id if self.add_eos else None

    @property
    def policy(self) -> dict[str, Any]:
        """The BOS/EOS policy as plain values (stored in manifests, part of the prepared-data fingerprint)."""
        return {
            "bos_token": self._bos_token,
            "bos_id": self._bos_id,
            "eos_token": self._eos_token,
            "eos_id": self._eos_id,
            "add_bos": self.add_bos,
            "add_eos": self.add_eos,
        }

    def describe_policy(self) -> str:
        """One line for the log: how a document is framed, and why."""
        parts = (
            ([self._bos_token] if self.add_bos else [])
            + ["text"]
            + ([self._eos_token] if self.add_eos else [])
        )
        framing = " + ".join(repr(p) if p != "text" else p for p in parts)
        notes = "; ".join(self.policy_notes)
        return f"each document = {framing}" + (f" ({notes})" if notes else "")

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical tokenizer JSON: equal fingerprints mean equal ids for every text."""
        if self._fingerprint is None:
            self._fingerprint = hashlib.sha256(self._tok.to_str().encode("utf-8")).hexdigest()
        return self._fingerprint

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS or other special tokens are added."""
        if len(text) > LONG_TEXT_CHARS:
            return self._encode_long(text)
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of many texts at once, in parallel threads (much faster than a Python loop)."""
        short = [i for i, t in enumerate(texts) if len(t) <= LONG_TEXT_CHARS]
        if len(short) == len(texts):
            return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]
        out: list[list[int]] = [[] for _ in texts]
        for i, e in zip(short, self._tok.encode_batch_fast([texts[i] for i in short], add_special_tokens=False)):
            out[i] = e.ids
        for i, text in enumerate(texts):
            if len(text) > LONG_TEXT_CHARS:
                out[i] = self._encode_long(text)
        return out

    def _encode_long(self, text: str) -> list[int]:
        """A very long text a piece at a time, so memory stays a small multiple of the text (the tokenizers
        library holds ~400 bytes per token of a text it encodes whole: 6.5 GB for a 50 MB document).

        Pieces end where no token can span: before a space that follows a non-space and precedes a letter
        (every pre-tokenizer we ship splits there), and each cut is proven harmless first by encoding a
        window around it whole and cut; a place that fails is skipped for the next one.
        """
        ids: list[int] = []
        group: list[str] = []
        for piece in self._pieces(text):
            group.append(piece)
            if len(group) == PIECES_PER_BATCH:
                ids.extend(i for e in self._tok.encode_batch_fast(group, add_special_tokens=False) for i in e.ids)
                group = []
        if group:
            ids.extend(i for e in self._tok.encode_batch_fast(group, add_special_tokens=False) for i in e.ids)
        return ids

    def _pieces(self, text: str) -> Iterator[str]:
        start = 0
        while len(text) - start > PIECE_CHARS:
            cut = self._safe_cut(text, start + PIECE_CHARS)
            if cut is None:
                break
            yield text[start:cut]
            start = cut
        yield text[start:]

    def _safe_cut(self, text: str, at: int) -> Optional[int]:
        for m in _CUT.finditer(text, at, min(len(text), at + PIECE_CHARS)):
            cut = m.start()
            window = text[max(0, cut - 256) : cut + 256]
            left = cut - max(0, cut - 256)
            whole = self._tok.encode(window, add_special_tokens=False).ids
            parts = self._tok.encode_batch_fast([window[:left], window[left:]], add_special_tokens=False)
            if whole == parts[0].ids + parts[1].ids:
                return cut
        return None

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
            f"bos={self.bos_token!r}:{self.bos_id}, add_bos={self.add_bos}, add_eos={self.add_eos})"
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


# GPT-2 style vocabularies without a tokenizer.json: (vocabulary, merges) file names, OpenAI's and HF's.
BPE_FILE_PAIRS = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))


def has_tokenizer(path: str) -> bool:
    """Whether `path` is a tokenizer.json or a directory that `load_tokenizer` can load."""
    if os.path.isfile(path):
        return True
    return os.path.isfile(os.path.join(path, "tokenizer.json")) or any(
        all(os.path.isfile(os.path.join(path, f)) for f in pair) for pair in BPE_FILE_PAIRS
    )


def _resolve_tokenizer_files(path: str) -> tuple[str, Optional[tuple[str, str]]]:
    """(the file that names the tokenizer, and the (vocab, merges) pair when it is a GPT-2 style directory)."""
    if os.path.isdir(path):
        file = os.path.join(path, "tokenizer.json")
        if os.path.isfile(file):
            return file, None
        for vocab, merges in BPE_FILE_PAIRS:
            pair = (os.path.join(path, vocab), os.path.join(path, merges))
            if os.path.isfile(pair[0]) and os.path.isfile(pair[1]):
                return pair[0], pair
        raise DataError(
            f"no tokenizer.json (nor encoder.json + vocab.bpe) in directory {path}: give the directory of a "
            "HuggingFace tokenizer (or its tokenizer.json), or set data.tokenizer.train=true to train one there."
        )
    if os.path.isfile(path):
        return path, None
    raise DataError(
        f"tokenizer path {path} does not exist: give a directory holding tokenizer.json or the file "
        "itself, or set data.tokenizer.train=true to train one there."
    )


def _byte_level_bpe(vocab_file: str, merges_file: str) -> tokenizers.Tokenizer:
    """GPT-2's tokenizer from its vocabulary (token -> id JSON) and merges (one pair per line) files.

    The same pipeline as GPT-2's reference encoder: its regex pre-split on bytes mapped to printable
    characters, no prefix space, and <|endoftext|> (already id 50256 in GPT-2's vocabulary) as the only
    special token.
    """
    try:
        vocab, merges = models.BPE.read_file(vocab_file, merges_file)
        tok = tokenizers.Tokenizer(models.BPE(vocab, merges))
    except Exception as e:
        raise DataError(f"{vocab_file} + {merges_file}: not a GPT-2 style BPE vocabulary ({e}).") from e
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if TRAINED_EOS in vocab:
        tok.add_special_tokens([AddedToken(TRAINED_EOS, special=True)])
    return tok


def _own_special_ids(tok: tokenizers.Tokenizer) -> tuple[list[int], list[int]]:
    """Ids the tokenizer's own post-processor puts before and after a text (Llama's adds BOS, say)."""
    plain = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[:i], full[i + len(plain) :]
    return [], []


def load_tokenizer(
    path: str,
    split_special_tokens: bool = True,
    *,
    eos_token: Optional[str] = None,
    bos_token: Optional[str] = None,
    add_bos: Optional[bool] = None,
    add_eos: bool = True,
) -> Tokenizer:
    """Load a tokenizer and decide its BOS/EOS policy.

    `path` is a tokenizer.json, a directory holding one, or a GPT-2 style directory (encoder.json +
    vocab.bpe, or vocab.json + merges.txt). The keyword arguments override the choices below (they are
    `data.tokenizer.eos_token` etc.).

    EOS: the `eos_token` of a tokenizer_config.json next to the file, unless it is a chat end-of-turn
    token (Qwen's <|im_end|>, Llama-3-Instruct's <|eot_id|>); else the first of EOS_CANDIDATES that is
    an added (special) token; else the configured eos_token even if chat-only. BOS likewise, else None.
    Candidates must be added tokens because big BPE vocabularies also hold "<s>" and "</s>" as ordinary
    text pieces (Qwen3 does), which would never be emitted as a separator by the HF tokenizer.
    add_bos (when not given): true if tokenizer_config.json says `add_bos_token: true` or the tokenizer's
    own post-processor puts BOS first (what the model family was trained with).
    """
    file, bpe_pair = _resolve_tokenizer_files(path)
    if bpe_pair is not None:
        tok = _byte_level_bpe(*bpe_pair)
    else:
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

    notes: list[str] = []
    added = {t.content for t in tok.get_added_tokens_decoder().values()}
    config_eos = _token_content(config.get("eos_token"))
    if eos_token is not None:
        if not in_vocab(eos_token):
            raise DataError(f"data.tokenizer.eos_token={eos_token!r} is not in the vocabulary of {file}.")
        eos = eos_token
        notes.append("EOS set by data.tokenizer.eos_token")
    else:
        eos = config_eos if in_vocab(config_eos) and config_eos not in CHAT_ONLY_TOKENS else None
        if eos is not None:
            notes.append("EOS from tokenizer_config.json")
        else:
            eos = next((t for t in EOS_CANDIDATES if t in added), None)
            if eos is not None and config_eos in CHAT_ONLY_TOKENS:
                notes.append(f"EOS {eos!r}, not the chat end-of-turn {config_eos!r} of tokenizer_config.json")
            elif eos is not None:
                notes.append(f"EOS {eos!r} is the tokenizer's end-of-document special token")
        if eos is None and in_vocab(config_eos):
            eos = config_eos
            notes.append(f"EOS {eos!r} is chat-only but the only candidate")
    if eos is None:
        raise DataError(
            f"{file}: found no document separator: none of {EOS_CANDIDATES} is a special token and "
            f"{config_file} names no eos_token. Add an eos_token to tokenizer_config.json "
            "(or set data.tokenizer.eos_token)."
        )

    if bos_token is not None:
        if not in_vocab(bos_token):
            raise DataError(f"data.tokenizer.bos_token={bos_token!r} is not in the vocabulary of {file}.")
        bos: Optional[str] = bos_token
    else:
        config_bos = _token_content(config.get("bos_token"))
        bos = config_bos if in_vocab(config_bos) else None
        bos = bos or next((t for t in BOS_CANDIDATES if t in added), None)

    prefix, suffix = _own_special_ids(tok)
    bos_id = None if bos is None else tok.token_to_id(bos)
    if add_bos is not None:
        notes.append(f"add_bos={add_bos} set by data.tokenizer.add_bos")
    elif bos is None:
        add_bos = False
        notes.append("no BOS: the tokenizer has none")
    elif config.get("add_bos_token") is True:
        add_bos = True
        notes.append("BOS because tokenizer_config.json has add_bos_token=true")
    elif prefix == [bos_id]:
        add_bos = True
        notes.append("BOS because the tokenizer's post-processor adds it")
    else:
        add_bos = False
        notes.append(f"no BOS: the tokenizer has {bos!r} but does not add it")
    if prefix or suffix:
        # Never both: text is encoded without the tokenizer's own specials, the packer frames documents.
        own = [tok.id_to_token(i) for i in prefix] + ["text"] + [tok.id_to_token(i) for i in suffix]
        notes.append(f"its own post-processor ({' + '.join(own)}) is not applied")
    if not add_eos:
        notes.append("add_eos=false: documents are not separated by any token")
    return Tokenizer(
        tok,
        eos_token=eos,
        bos_token=bos,
        split_special_tokens=split_special_tokens,
        add_bos=add_bos,
        add_eos=add_eos,
        policy_notes=notes,
    )


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
