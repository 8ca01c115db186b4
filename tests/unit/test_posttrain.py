"""Post-training data: chat templates, loss masks, bad input, packing, the loader, a grown vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard

from forge_lm.data.config import DataConfig, SourceConfig
from forge_lm.data.report import DataError
from forge_lm.data.tokenizer import train_bpe
from forge_lm.trainer.loss import IGNORE_INDEX
from forge_lm.trainer.model import Decoder, ModelConfig
from forge_lm.trainer.posttrain.chat import (
    DEFAULT_TEMPLATE,
    ChatTemplate,
    TemplateError,
    chat_tokenizer,
    grow_vocab,
    tokenize_messages,
    tokenize_prompt_completion,
)
from forge_lm.trainer.posttrain.config import PosttrainConfig
from forge_lm.trainer.posttrain.data import build_posttrain_data, collate_examples, pack
from tests.conftest import REPO

CHATS = REPO / "data" / "corpora" / "chitchat.jsonl.zst"


def read_chats(n: int) -> list[dict]:
    text = zstandard.ZstdDecompressor().decompress(CHATS.read_bytes(), max_output_size=1 << 30).decode()
    return [json.loads(line) for line in text.splitlines()[:n]]


def make_tokenizer(path: Path) -> Path:
    """A small byte-level BPE trained on the shipped chats (no chat template, like the quickstart's)."""
    if not (path / "tokenizer.json").is_file():
        chats = read_chats(600)
        train_bpe((m["content"] for c in chats for m in c["messages"]), 512, str(path), show_progress=False)
    return path


def tiny_model(vocab_size: int, seed: int = 0, tie: bool = False) -> Decoder:
    cfg = ModelConfig(
        family="llama", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256, tie_embeddings=tie
    )
    return Decoder.build(cfg.with_vocab(vocab_size), seed=seed)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("posttrain") / "bpe")


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_default_template_adds_chat_tokens_and_masks_assistant_turns(tok_dir):
    chat = chat_tokenizer(str(tok_dir))
    assert chat.vocab_size == 514 and chat.end_of_turn_id == chat.backend.token_to_id("<|im_end|>")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how are you?"},
        {"role": "assistant", "content": "fine"},
    ]
    ids, mask = tokenize_messages(chat, messages, "assistant")
    learned = chat.decode([i for i, m in zip(ids, mask) if m])
    assert learned == "hello<|im_end|>fine<|im_end|>"
    assert ids.count(chat.backend.token_to_id("<|im_start|>")) == 5  # special tokens, not text pieces
    ids_all, mask_all = tokenize_messages(chat, messages, "all")
    assert ids_all == ids and mask_all.all()
    # completion only: the last assistant turn, starting after the generation prompt
    ids_pc, mask_pc, start = tokenize_prompt_completion(chat, messages[:4], messages[4:], "completion")
    assert ids_pc == ids and chat.decode(ids_pc[start:]) == "fine<|im_end|>\n"
    assert not mask_pc[:start].any() and mask_pc[start:].all()


def test_template_is_sandboxed_and_errors_are_clear():
    with pytest.raises(TemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(TemplateError, match="failed to render"):
        ChatTemplate("{{ raise_exception('no system role') }}").render([{"role": "user", "content": "x"}])
    # No escape to Python internals: the sandbox refuses attribute access to dunders.
    with pytest.raises(TemplateError):
        ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}").render([])
    assert "generation" in DEFAULT_TEMPLATE


def test_bad_records_are_counted_or_named(tok_dir, tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    records = [
        good,
        {"messages": [{"role": "user", "content": "only a question"}]},
        "{not json",
        {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "x"}]},
        {"text": "no conversation"},
        {"prompt": "What is 2+2?", "completion": "4"},
    ]
    path = write_jsonl(tmp_path / "chats.jsonl", records)
    chat = chat_tokenizer(str(tok_dir))
    data_cfg = DataConfig(sources=[SourceConfig(name="c", paths=[str(path)])], seq_len=64, val_fraction=0.0)
    data = build_posttrain_data(data_cfg, PosttrainConfig(objective="sft"), chat)
    assert len(data.train) == 2
    assert data.report.skipped["bad_conversation"] == 3
    assert any(
        ":2: the conversation has no assistant turn" in e for e in data.report.examples["bad_conversation"]
    )
    strict = DataConfig(sources=data_cfg.sources, seq_len=64, val_fraction=0.0, on_bad_input="error")
    with pytest.raises(DataError, match=r"chats.jsonl:3: malformed JSON"):
        build_posttrain_data(strict, PosttrainConfig(objective="sft"), chat)
    no_answer = write_jsonl(tmp_path / "q.jsonl", records[:2])
    strict.sources = [SourceConfig(name="c", paths=[str(no_answer)])]
    with pytest.raises(DataError, match=r"q.jsonl:2: the conversation has no assistant turn"):
        build_posttrain_data(strict, PosttrainConfig(objective="sft"), chat)


def test_truncation_policy_counts(tok_dir, tmp_path):
    long = {
        "messages": [{"role": "user", "content": "a " * 10}, {"role": "assistant", "content": "b " * 200}]
    }
    path = write_jsonl(tmp_path / "long.jsonl", [long])
    chat = chat_tokenizer(str(tok_dir))
    src = [SourceConfig(name="c", paths=[str(path)])]
    cut = build_posttrain_data(
        DataConfig(sources=src, seq_len=64, val_fraction=0.0), PosttrainConfig(objective="sft"), chat
    )
    assert cut.report.truncated == 1 and len(cut.train[0].ids) == 64
    skip = build_posttrain_data(
        DataConfig(sources=src, seq_len=64, val_fraction=0.0),
        PosttrainConfig(objective="sft", truncation="skip"),
        chat,
    )
    assert skip.report.skipped["too_long"] == 1 and not skip.train


def test_packing_keeps_examples_apart(tok_dir):
    chat = chat_tokenizer(str(tok_dir))
    chats = read_chats(40)
    data_cfg = DataConfig(
        sources=[SourceConfig(name="c", paths=[str(CHATS)], max_documents=40)], seq_len=256, val_fraction=0.0
    )
    data = build_posttrain_data(data_cfg, PosttrainConfig(objective="sft"), chat)
    rows = pack([len(e.ids) for e in data.train], 256)
    assert sorted(i for r in rows for i in r) == list(range(len(data.train)))
    assert all(sum(len(data.train[i].ids) for i in r) <= 256 for r in rows)
    assert len(rows) < len(data.train)  # several conversations share a row
    # One packed row gives each conversation the same per-token losses it gets alone.
    model = tiny_model(chat.vocab_size).eval()
    row = max(rows, key=len)
    batch = collate_examples([[data.train[i] for i in row]], 256, chat.eos_id)
    with torch.no_grad():
        packed = model(batch["input_ids"], document_ids=batch["document_ids"], labels=batch["labels"])
        at = 0
        for i in row:
            ex = data.train[i]
            alone = collate_examples([[ex]], len(ex.ids), chat.eos_id)
            single = model(alone["input_ids"], labels=alone["labels"])
            torch.testing.assert_close(packed[0, at : at + len(ex.ids)], single[0], atol=1e-5, rtol=1e-5)
            at += len(ex.ids)
    assert chats  # the corpus is readable as plain JSON lines too


def test_loader_resumes_exactly_on_another_world_size(tok_dir):
    chat = chat_tokenizer(str(tok_dir))
    data_cfg = DataConfig(
        sources=[SourceConfig(name="c", paths=[str(CHATS)], max_documents=60)], seq_len=256, val_fraction=0.0
    )
    data = build_posttrain_data(data_cfg, PosttrainConfig(objective="sft"), chat)
    one = data.loader(2, seed=3, dp_rank=0, dp_world_size=1)
    want = [next(one)["input_ids"] for _ in range(6)]  # 12 rows, 2 per step
    first = data.loader(2, seed=3, dp_rank=0, dp_world_size=1)
    next(first), next(first)
    state = first.state_dict()
    ranks = [data.loader(1, seed=3, dp_rank=r, dp_world_size=2) for r in (0, 1)]
    for loader in ranks:
        loader.load_state_dict(state)
    for step in range(2, 6):
        got = torch.cat([next(loader)["input_ids"] for loader in ranks])
        assert torch.equal(got, want[step])


@pytest.mark.parametrize("tie", [True, False])
def test_grow_vocab_adds_mean_rows(tie):
    model = tiny_model(512, tie=tie)
    old = model.tok_embeddings.weight.detach().clone()
    old_out = model.output.weight.detach().clone()
    added = grow_vocab(model, 514)
    assert added == 64 and model.cfg.vocab_size == 576
    w = model.tok_embeddings.weight
    assert torch.equal(w[:512], old) and torch.allclose(w[512:], old.mean(0).expand(64, -1))
    if tie:
        assert model.output.weight is w  # still tied
    else:
        assert torch.allclose(model.output.weight[512:], old_out.mean(0).expand(64, -1))
    out = model(torch.tensor([[1, 513, 2]]))
    assert out.shape == (1, 3, 576)
    assert grow_vocab(model, 576) == 0


def test_labels_are_shifted_assistant_tokens(tok_dir):
    chat = chat_tokenizer(str(tok_dir))
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ids, mask = tokenize_messages(chat, messages, "assistant")
    from forge_lm.trainer.posttrain.data import Example

    batch = collate_examples([[Example(np.array(ids), mask, "x")]], 32, chat.eos_id)
    labels = batch["labels"][0].tolist()
    want = [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX] * (
        33 - len(ids)
    )
    assert labels == want


def test_objective_steps_compute_in_the_runs_precision(tok_dir):
    """A DPO step and its held-out evaluation run the policy in bf16 when the run asks for bf16 without FSDP2
    (autocast, as the token loss does), and the reference log-probabilities come from the same precision, so
    the policy starts exactly at its reference (loss log 2)."""
    from forge_lm.trainer.engine import Engine
    from forge_lm.trainer.parallel.mesh import init_parallel
    from forge_lm.trainer.posttrain.data import PosttrainReport, collate_pairs, pair_example
    from forge_lm.trainer.posttrain.dpo import DPOObjective, reference_logps
    from tests.conftest import compose_config

    chat = chat_tokenizer(str(tok_dir))
    model = tiny_model(512, seed=3)
    grow_vocab(model, chat.vocab_size)
    chats = [c["messages"] for c in read_chats(12)]
    pairs = [
        pair_example(m[:1], [m[1]], [chats[(i + 1) % len(chats)][1]], f"x:{i}", chat, PosttrainConfig("dpo"), 256,
                     PosttrainReport())  # fmt: skip
        for i, m in enumerate(chats)
    ]

    def collate(rows):
        return collate_pairs(rows, 256, chat.eos_id)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference_logps(model, pairs, collate, torch.device("cpu"))
    cfg = compose_config("trainer.precision=bf16", "trainer.device=cpu", "data.seq_len=256",
                         "trainer.micro_batch_size=4", "trainer.global_batch_tokens=1024")  # fmt: skip
    cfg.model = model.cfg
    engine = Engine(cfg, init_parallel(cfg.parallel, "cpu"), torch.device("cpu"), model)
    engine.objective = DPOObjective(0.1, "sigmoid")
    seen = []
    model.layers[0].attention.wq.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    batch = collate([[p] for p in pairs[:4]])
    held_out = engine.evaluate_objective([batch])
    assert seen and set(seen) == {torch.bfloat16}
    assert abs(held_out["loss"] - 0.693147) < 1e-5 and held_out["rewards/margins"] == 0.0
    seen.clear()
    engine.train_step([batch])
    assert seen and set(seen) == {torch.bfloat16}
