"""Post-training data: conversation, prompt/completion and preference records -> packed micro-batches.

Records come through the data pipeline's readers (data/sources.py: .jsonl, .jsonl.zst, .json.gz, parquet,
Hugging Face datasets, every bad line counted or, with data.on_bad_input=error, named by file:line):

    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}     SFT
    {"prompt": [...messages] or "text", "completion": [...] or "text"}                     SFT, completion only
    {"prompt": ..., "chosen": ..., "rejected": ...}                                         DPO
    {"messages": ...} with posttrain.objective=dpo                                          DPO pairs made from chats

Each record becomes one example (SFT) or pair (DPO) of token ids with a loss mask (trainer/posttrain/chat.py).
Examples are packed whole into rows of data.seq_len tokens (best fit decreasing, the rest padding), each
example its own document, so with data.document_masking packed examples never attend to each other; the two
sequences of a DPO pair always share a row. An example longer than a row is cut or skipped
(posttrain.truncation), and counted. Held-out examples are chosen by a hash of the record id (data.val_fraction),
as pre-training's documents are.

A batch holds input_ids, labels (-100 outside the loss), position_ids and document_ids like pre-training's,
so the engine trains SFT unchanged: its loss is the summed token loss over the global count of labels.
DPO batches add `segments` (which sequence of the micro-batch each position belongs to: 2p chosen, 2p + 1
rejected, -1 padding) and `ref_logps` [pairs, 2] (the frozen reference's log-probabilities).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from forge_lm.data.config import DataConfig, SourceConfig
from forge_lm.data.report import DataError, InputReport
from forge_lm.data.sources import _Reader, expand_paths
from forge_lm.trainer.loss import IGNORE_INDEX
from forge_lm.trainer.posttrain.chat import (
    ChatTokenizer,
    TemplateError,
    tokenize_messages,
    tokenize_prompt_completion,
    validate_messages,
)
from forge_lm.trainer.posttrain.config import PosttrainConfig

logger = logging.getLogger(__name__)

# Why a record or example was left out (data.on_bad_input=error stops at the first of the first group).
BAD_RECORD = {
    "bad_conversation": "each record needs `messages` (roles system/user/assistant, at least one assistant turn), "
    "`prompt` + `completion`, or `prompt` + `chosen` + `rejected`",
    "template_failed": "the chat template cannot render this conversation: fix the record or the template",
}
FILTERED = {
    "too_long": "longer than data.seq_len with posttrain.truncation=skip, or a DPO pair that would be cut",
    "no_loss_tokens": "no token left in the loss (after truncation)",
    "same_completion": "a DPO pair whose chosen and rejected completions are equal (nothing to prefer)",
}


# ---------------------------------------------------------------------------------------------------------
# Examples
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Example:
    """One tokenized sequence: ids and which of them are learned (mask[i]: predict ids[i] from ids[:i])."""

    ids: np.ndarray
    mask: np.ndarray
    where: str


@dataclass
class Pair:
    """A preference pair: two sequences sharing their prompt, and the reference's log-probabilities."""

    chosen: Example
    rejected: Example
    where: str
    ref_logps: tuple[float, float] = (0.0, 0.0)

    def __len__(self) -> int:
        return len(self.chosen.ids) + len(self.rejected.ids)


@dataclass
class PosttrainReport:
    """What was read, kept, cut and skipped (logged at start)."""

    records: int = 0
    kept: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, where: str, detail: str, strict: bool) -> None:
        if strict and reason in BAD_RECORD:
            raise DataError(f"{where}: {detail}: {BAD_RECORD[reason]} (or set data.on_bad_input=skip).")
        self.skipped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(f"{where}: {detail}")

    def summary(self) -> str:
        line = f"{self.records:,} records -> {self.kept:,} examples ({self.truncated:,} cut to data.seq_len)"
        for reason, n in sorted(self.skipped.items()):
            line += f"; skipped {n:,} x {reason} (first: {'; '.join(self.examples[reason])})"
        return line


@dataclass
class _Record:
    data: dict[str, Any]
    where: str
    source: str


class _RecordReader(_Reader):
    """The pipeline's reader, handing over whole JSON records instead of a text field."""

    def record(self, record: Any, where: str) -> Optional[_Record]:  # type: ignore[override]
        if not isinstance(record, dict):
            self.report.skip("not_an_object", where, f"expected a JSON object, got {type(record).__name__}")
            return None
        self.report.keep(self.source.name, "")
        return _Record(record, where, self.source.name)


def read_records(sources: Sequence[SourceConfig], strict: bool) -> tuple[list[_Record], InputReport]:
    """Every record of the sources, in order (each source's max_documents applies)."""
    report = InputReport(strict=strict)
    out: list[_Record] = []
    for source in sources:
        reader = _RecordReader(source, report)
        found = 0
        stream = (
            reader.hf_dataset()
            if source.hf_dataset is not None
            else (r for path in expand_paths(source) for r in reader.file(path))
        )
        for rec in stream:
            out.append(rec)  # type: ignore[arg-type]
            found += 1
            if source.max_documents is not None and found >= source.max_documents:
                break
    return out, report


def is_val(rec: _Record, id_field: str, val_fraction: float) -> bool:
    """Held out: a stable hash of (source, id) as the pre-training split (data/chunks.py)."""
    doc_id = rec.data.get(id_field, rec.where)
    digest = hashlib.blake2b(f"{rec.source}\x00{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


def _as_messages(value: Any, role: str) -> Optional[list[dict[str, Any]]]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return value
    return None


def _fit(ids: list[int], mask: np.ndarray, where: str, seq_len: int, cfg: PosttrainConfig,
         report: PosttrainReport, cut_allowed: bool = True) -> Optional[Example]:  # fmt: skip
    """The example, cut to seq_len tokens by the truncation policy, or None (counted)."""
    if len(ids) > seq_len:
        if cfg.truncation == "skip" or not cut_allowed:
            report.skip("too_long", where, f"{len(ids)} tokens > data.seq_len={seq_len}", strict=False)
            return None
        ids, mask = ids[:seq_len], mask[:seq_len]
        report.truncated += 1
    if not mask[1:].any():
        report.skip("no_loss_tokens", where, "no token to learn", strict=False)
        return None
    return Example(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.int8), where)


def sft_example(rec: _Record, chat: ChatTokenizer, cfg: PosttrainConfig, seq_len: int,
                report: PosttrainReport, strict: bool) -> Optional[Example]:  # fmt: skip
    """The SFT example of one record (None: skipped and counted)."""
    d, where = rec.data, rec.where
    try:
        if cfg.messages_field in d:
            messages = d[cfg.messages_field]
            problem = validate_messages(messages)
            if problem:
                report.skip("bad_conversation", where, problem, strict)
                return None
            loss_on = cfg.loss_on
            if loss_on == "completion":  # a conversation's completion is its last assistant turn
                last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
                ids, mask, _ = tokenize_prompt_completion(
                    chat, messages[:last], [messages[last]], "completion"
                )
            else:
                ids, mask = tokenize_messages(chat, messages, loss_on)
        elif cfg.prompt_field in d and cfg.completion_field in d:
            prompt = _as_messages(d[cfg.prompt_field], "user")
            completion = _as_messages(d[cfg.completion_field], "assistant")
            problem = (
                None
                if prompt is not None and completion is not None
                else "prompt/completion are not text or messages"
            )
            problem = problem or validate_messages([*prompt, *completion])  # type: ignore[list-item]
            if problem:
                report.skip("bad_conversation", where, problem, strict)
                return None
            loss_on = "all" if cfg.loss_on == "all" else "completion"
            ids, mask, _ = tokenize_prompt_completion(chat, prompt, completion, loss_on)  # type: ignore[arg-type]
        else:
            fields = ", ".join(map(str, d)) or "none"
            report.skip("bad_conversation", where, f"no {cfg.messages_field!r} or {cfg.prompt_field!r} + "
                        f"{cfg.completion_field!r} field (fields: {fields})", strict)  # fmt: skip
            return None
    except TemplateError as e:
        report.skip("template_failed", where, str(e), strict)
        return None
    return _fit(ids, mask, where, seq_len, cfg, report)


def pair_example(prompt: list[dict[str, Any]], chosen: list[dict[str, Any]], rejected: list[dict[str, Any]],
                 where: str, chat: ChatTokenizer, cfg: PosttrainConfig, seq_len: int,
                 report: PosttrainReport) -> Optional[Pair]:  # fmt: skip
    """A preference pair tokenized as TRL's DPOTrainer does: the completion starts where the prompt rendered
    with the generation prompt and prompt + completion part (the smaller of the two points)."""
    c_ids, _, c_start = tokenize_prompt_completion(chat, prompt, chosen, "completion")
    r_ids, _, r_start = tokenize_prompt_completion(chat, prompt, rejected, "completion")
    start = min(c_start, r_start)
    if len(c_ids) + len(r_ids) > seq_len:  # both sequences of a pair share one row
        report.skip("too_long", where, f"chosen + rejected = {len(c_ids) + len(r_ids)} tokens > data.seq_len="
                    f"{seq_len}", strict=False)  # fmt: skip
        return None
    out = []
    for ids in (c_ids, r_ids):
        mask = np.zeros(len(ids), dtype=np.int8)
        mask[start:] = 1
        ex = _fit(ids, mask, where, seq_len, cfg, report, cut_allowed=False)
        if ex is None:
            return None
        out.append(ex)
    return Pair(out[0], out[1], where)


def pairs_from_records(records: Sequence[_Record], chat: ChatTokenizer, cfg: PosttrainConfig, seq_len: int,
                       seed: int, report: PosttrainReport, strict: bool) -> list[Pair]:  # fmt: skip
    """DPO pairs: explicit prompt/chosen/rejected records, or pairs made from conversations.

    From a conversation, each of its last `max_pairs_per_chat` assistant turns (after the first exchange)
    gives a prompt (the `pair_context_messages` messages before that turn), chosen = the real turn, rejected = the assistant turn at the
    same index of another conversation, picked by a seeded derangement (never the same conversation): a
    fluent reply that does not answer this chat, the preference a model has to learn from context.
    """
    pairs: list[Pair] = []
    chats: list[tuple[_Record, list[dict[str, Any]]]] = []
    for rec in records:
        d = rec.data
        if all(k in d for k in (cfg.prompt_field, cfg.chosen_field, cfg.rejected_field)):
            prompt = _as_messages(d[cfg.prompt_field], "user")
            chosen = _as_messages(d[cfg.chosen_field], "assistant")
            rejected = _as_messages(d[cfg.rejected_field], "assistant")
            if prompt is None or chosen is None or rejected is None:
                report.skip(
                    "bad_conversation", rec.where, "prompt/chosen/rejected are not text or messages", strict
                )
                continue
            problem = validate_messages([*prompt, *chosen]) or validate_messages([*prompt, *rejected])
            if problem:
                report.skip("bad_conversation", rec.where, problem, strict)
                continue
            if chosen == rejected:  # its loss would be a constant log 2: no preference to learn
                report.skip("same_completion", rec.where, "chosen equals rejected", strict=False)
                continue
            try:
                pair = pair_example(prompt, chosen, rejected, rec.where, chat, cfg, seq_len, report)
            except TemplateError as e:
                report.skip("template_failed", rec.where, str(e), strict)
                continue
            if pair is not None:
                pairs.append(pair)
        elif cfg.pairs_from_chats and cfg.messages_field in d:
            problem = validate_messages(d[cfg.messages_field])
            if problem:
                report.skip("bad_conversation", rec.where, problem, strict)
                continue
            chats.append((rec, d[cfg.messages_field]))
        else:
            report.skip("bad_conversation", rec.where, f"no {cfg.chosen_field!r}/{cfg.rejected_field!r} (or "
                        f"{cfg.messages_field!r}) field", strict)  # fmt: skip
    if len(chats) >= 2:
        rng = np.random.default_rng(seed)
        n = len(chats)
        # A derangement: conversation i borrows from conversation (i + shift) mod n, shift in [1, n).
        shift = int(rng.integers(1, n))
        for i, (rec, messages) in enumerate(chats):
            other = chats[(i + shift) % n][1]
            other_turns = [m for m in other if m["role"] == "assistant"]
            turns = [j for j, m in enumerate(messages) if m["role"] == "assistant" and j >= 2]
            for k, j in enumerate(turns[-cfg.max_pairs_per_chat :]):
                rejected = other_turns[min(len(other_turns) - 1, k)]
                if rejected["content"] == messages[j]["content"]:
                    report.skip("same_completion", f"{rec.where}#turn{j}", "the other chat's turn is the same",
                                strict=False)  # fmt: skip
                    continue
                try:
                    prompt = messages[max(0, j - cfg.pair_context_messages) : j]
                    pair = pair_example(prompt, [messages[j]], [rejected], f"{rec.where}#turn{j}",
                                        chat, cfg, seq_len, report)  # fmt: skip
                except TemplateError as e:
                    report.skip("template_failed", rec.where, str(e), strict)
                    continue
                if pair is not None:
                    pairs.append(pair)
    return pairs


# ---------------------------------------------------------------------------------------------------------
# Packing and batches
# ---------------------------------------------------------------------------------------------------------


def pack(lengths: Sequence[int], row_len: int) -> list[list[int]]:
    """Indices of the items in each row: best fit decreasing (each item into the fullest row it fits)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        best = -1
        for r, space in enumerate(free):
            if space >= lengths[i] and (best < 0 or space < free[best]):
                best = r
        if best < 0:
            rows.append([])
            free.append(row_len)
            best = len(rows) - 1
        rows[best].append(i)
        free[best] -= lengths[i]
    return rows


def collate_examples(rows: Sequence[Sequence[Example]], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """A batch of packed rows: every example its own document, positions from 0 in each, padding after."""
    B = len(rows)
    input_ids = np.full((B, seq_len), pad_id, dtype=np.int64)
    labels = np.full((B, seq_len), IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros((B, seq_len), dtype=np.int64)
    documents = np.zeros((B, seq_len), dtype=np.int64)
    for b, row in enumerate(rows):
        at = 0
        for d, ex in enumerate(row):
            n = len(ex.ids)
            input_ids[b, at : at + n] = ex.ids
            # Position t predicts token t + 1 of the same example; the last predicts nothing.
            labels[b, at : at + n - 1] = np.where(ex.mask[1:] > 0, ex.ids[1:], IGNORE_INDEX)
            positions[b, at : at + n] = np.arange(n)
            documents[b, at : at + n] = d
            at += n
        documents[b, at:] = len(row)  # the padding is a document of its own
        positions[b, at:] = np.arange(seq_len - at)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(positions),
        "document_ids": torch.from_numpy(documents),
    }


def collate_pairs(rows: Sequence[Sequence[Pair]], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """A DPO batch: chosen then rejected of each pair as two documents, `segments` and `ref_logps`."""
    flat_rows = [[ex for p in row for ex in (p.chosen, p.rejected)] for row in rows]
    batch = collate_examples(flat_rows, seq_len, pad_id)
    segments = np.full((len(rows), seq_len), -1, dtype=np.int64)
    seq = 0
    for b, row in enumerate(flat_rows):
        at = 0
        for ex in row:
            segments[b, at : at + len(ex.ids)] = seq
            at += len(ex.ids)
            seq += 1
    pairs = [p for row in rows for p in row]
    batch["segments"] = torch.from_numpy(segments)
    batch["ref_logps"] = torch.tensor([p.ref_logps for p in pairs], dtype=torch.float32).reshape(
        len(pairs), 2
    )
    return batch


class PackedLoader:
    """Training micro-batches of packed rows for one data-parallel rank, reshuffled every epoch.

    The order is a pure function of (seed, epoch) and the state is one global row position, so a resumed run
    (on any data-parallel size) continues exactly where it stopped. Same interface as data.loader.Loader.
    """

    def __init__(self, items: Sequence[Any], rows: list[list[int]], collate: Any, micro_batch_size: int,
                 seed: int, dp_rank: int = 0, dp_world_size: int = 1, what: str = "examples") -> None:  # fmt: skip
        if not rows:
            raise DataError("no post-training example is left to train on: see the counts above.")
        self.items, self.rows, self.collate = items, rows, collate
        self.mbs, self.seed, self.rank, self.world = micro_batch_size, seed, dp_rank, dp_world_size
        self.position = 0
        self.what = what

    def _row(self, k: int) -> list[int]:
        epoch, i = divmod(k, len(self.rows))
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
        return self.rows[int(order[i])]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        start = self.position + self.rank * self.mbs
        picked = [[self.items[i] for i in self._row(k)] for k in range(start, start + self.mbs)]
        self.position += self.mbs * self.world
        return self.collate(picked)

    @property
    def samples_seen(self) -> int:
        return self.position

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "rows": len(self.rows), "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("rows") != len(self.rows):
            raise DataError(
                f"the checkpoint's post-training data packed into {state.get('rows')} rows, this data into "
                f"{len(self.rows)}: the data or data.seq_len changed since it was saved. Resume with the same "
                "data, or start a new run (trainer.resume=never)."
            )
        self.position = int(state["position"])

    def describe(self) -> str:
        n = len(self.items)
        return (
            f"{n:,} {self.what} packed into {len(self.rows):,} rows, {self.mbs} rows per micro-batch per rank"
        )

    def close(self) -> None:
        pass


class PackedBatches:
    """Held-out batches, the same every time they are iterated."""

    def __init__(self, items: Sequence[Any], collate: Any, seq_len: int, batch_size: int,
                 max_batches: Optional[int]) -> None:  # fmt: skip
        lengths = [len(x) if isinstance(x, Pair) else len(x.ids) for x in items]
        rows = pack(lengths, seq_len)
        rows.sort(key=lambda r: min(r))  # a fixed order, independent of lengths' ties
        self.batches = [
            [[items[i] for i in row] for row in rows[s : s + batch_size]]
            for s in range(0, len(rows), batch_size)
        ][:max_batches]
        self.collate = collate

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for rows in self.batches:
            yield self.collate(rows)

    def __len__(self) -> int:
        return len(self.batches)


@dataclass
class PosttrainData:
    """Everything the run needs from the data: train and held-out items, and how to batch them."""

    train: list[Any]
    val: list[Any]
    report: PosttrainReport
    collate: Any
    seq_len: int

    def loader(self, micro_batch_size: int, seed: int, dp_rank: int, dp_world_size: int) -> PackedLoader:
        lengths = [len(x) if isinstance(x, Pair) else len(x.ids) for x in self.train]
        what = "preference pairs" if self.train and isinstance(self.train[0], Pair) else "examples"
        return PackedLoader(self.train, pack(lengths, self.seq_len), self.collate, micro_batch_size, seed,
                            dp_rank, dp_world_size, what)  # fmt: skip

    def val_batches(self, batch_size: int, max_batches: Optional[int]) -> PackedBatches:
        if not self.val:
            raise DataError("no held-out post-training example: raise data.val_fraction (or add data).")
        return PackedBatches(self.val, self.collate, self.seq_len, batch_size, max_batches)


def build_posttrain_data(data_cfg: DataConfig, cfg: PosttrainConfig, chat: ChatTokenizer) -> PosttrainData:
    """Read, tokenize, mask, cut and split the post-training records of `data_cfg.sources`."""
    strict = data_cfg.on_bad_input == "error"
    records, input_report = read_records(data_cfg.sources, strict)
    if cfg.max_examples is not None:
        records = records[: cfg.max_examples]
    report = PosttrainReport(records=len(records))
    seq_len = data_cfg.seq_len
    pad_id = chat.eos_id
    splits: dict[bool, list[Any]] = {False: [], True: []}
    if cfg.objective == "dpo":
        for held_out in (False, True):
            part = [r for r in records if is_val(r, "id", data_cfg.val_fraction) == held_out]
            splits[held_out] = pairs_from_records(part, chat, cfg, seq_len, data_cfg.seed, report, strict)

        def collate(rows: Any) -> dict[str, torch.Tensor]:
            return collate_pairs(rows, seq_len, pad_id)

    else:
        for rec in records:
            ex = sft_example(rec, chat, cfg, seq_len, report, strict)
            if ex is not None:
                splits[is_val(rec, "id", data_cfg.val_fraction)].append(ex)

        def collate(rows: Any) -> dict[str, torch.Tensor]:
            return collate_examples(rows, seq_len, pad_id)

    report.kept = len(splits[False]) + len(splits[True])
    if input_report.num_skipped:
        logger.warning("post-training input: %s", input_report.summary())
    logger.info(
        "post-training data: %s; %d train, %d held out",
        report.summary(),
        len(splits[False]),
        len(splits[True]),
    )
    return PosttrainData(splits[False], splits[True], report, collate, seq_len)
