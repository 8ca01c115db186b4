"""Distillation (posttrain.objective=distill) and the post-training bad input the data tests leave out: the loss
against an independent forward KL, a short optimisation, a teacher of another tokenizer refused, equal
chosen/rejected and a failing template counted or named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from forge_lm.data.config import DataConfig, SourceConfig
from forge_lm.data.report import DataError
from forge_lm.data.tokenizer import train_bpe
from forge_lm.trainer.config import ConfigError
from forge_lm.trainer.loss import IGNORE_INDEX
from forge_lm.trainer.posttrain.chat import chat_tokenizer, grow_vocab
from forge_lm.trainer.posttrain.config import PosttrainConfig
from forge_lm.trainer.posttrain.data import build_posttrain_data
from forge_lm.trainer.posttrain.distill import DistillObjective, check_same_vocab
from tests.unit.test_posttrain import make_tokenizer, read_chats, tiny_model, write_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A chat tokenizer, a student and a teacher (other weights) on its vocabulary, and SFT batches."""
    root = tmp_path_factory.mktemp("distill")
    tok_dir = make_tokenizer(root / "bpe")
    chat = chat_tokenizer(str(tok_dir))
    path = write_jsonl(root / "chats.jsonl", read_chats(40))
    data_cfg = DataConfig(sources=[SourceConfig(name="c", paths=[str(path)])], seq_len=128, val_fraction=0.0)
    data = build_posttrain_data(data_cfg, PosttrainConfig(objective="distill"), chat)
    loader = data.loader(4, 0, 0, 1)
    batches = [next(loader) for _ in range(2)]
    student, teacher = tiny_model(512, seed=0), tiny_model(512, seed=1)
    for m in (student, teacher):
        grow_vocab(m, chat.vocab_size)
    return root, tok_dir, chat, student, teacher, batches


def reference_loss(student, teacher, batch, vocab_size, alpha, tau):
    """The mixed loss per learned token, from torch's own kl_div and cross_entropy on the models' logits."""
    kw = {"input_ids": batch["input_ids"], "document_ids": batch["document_ids"]}
    learned = batch["labels"] != IGNORE_INDEX
    s = student(**kw)[learned][:, :vocab_size].double()
    with torch.no_grad():
        t = teacher(**kw)[learned][:, :vocab_size].double()
    kl = F.kl_div(F.log_softmax(s / tau, -1), F.log_softmax(t / tau, -1), log_target=True, reduction="sum")
    ce = F.cross_entropy(s, batch["labels"][learned], reduction="sum")
    n = int(learned.sum())
    return (alpha * tau * tau * kl + (1 - alpha) * ce) / n, kl / n


@pytest.mark.parametrize("alpha,tau", [(1.0, 1.0), (0.5, 2.0), (0.0, 1.0)])
def test_loss_is_forward_kl_mixed_with_next_token_loss(setup, alpha, tau):
    _, _, chat, student, teacher, batches = setup
    batch = batches[0]
    objective = DistillObjective(teacher, chat.vocab_size, alpha, tau)
    loss_sum, metrics = objective.loss_sum(student, batch, torch.device("cpu"))
    units = objective.units(batch)
    with torch.no_grad():
        want, want_kl = reference_loss(student, teacher, batch, chat.vocab_size, alpha, tau)
    assert abs(float(loss_sum.detach() / units) - float(want)) < 1e-6
    assert abs(float(metrics["distill/kl"] / units) - float(want_kl)) < 1e-6
    assert float(want_kl) > 1e-3  # two different models: the test compares something
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_student_approaches_teacher(setup):
    _, _, chat, student, teacher, batches = setup
    student = tiny_model(512, seed=0)
    grow_vocab(student, chat.vocab_size)
    objective = DistillObjective(teacher, chat.vocab_size, 1.0)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    kls = []
    for step in range(12):
        batch = batches[step % 2]
        loss, metrics = objective.loss_sum(student, batch, torch.device("cpu"))
        (loss / objective.units(batch)).backward()
        opt.step()
        opt.zero_grad()
        kls.append(float(metrics["distill/kl"] / objective.units(batch)))
    assert kls[-1] < 0.7 * kls[0], kls
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_of_another_tokenizer_is_refused(setup, tmp_path):
    _, tok_dir, chat, *_ = setup
    other_dir = tmp_path / "other_bpe"
    train_bpe((m["content"] for c in read_chats(200) for m in c["messages"]), 600, str(other_dir),
              show_progress=False)  # fmt: skip
    other = chat_tokenizer(str(other_dir))
    with pytest.raises(ConfigError) as err:
        check_same_vocab(chat, str(tok_dir), other, str(other_dir))
    message = str(err.value)
    assert str(tok_dir) in message and str(other_dir) in message and "\n" not in message
    assert "514 tokens" in message and "602 tokens" in message
    check_same_vocab(chat, str(tok_dir), chat_tokenizer(str(tok_dir)), str(tok_dir))  # the same one passes


def test_equal_chosen_and_rejected_is_a_counted_skip(setup, tmp_path):
    _, tok_dir, chat, *_ = setup
    records = [
        {"prompt": "Hi, how are you?", "chosen": "Fine, thanks.", "rejected": "Go away."},
        {"prompt": "Any plans?", "chosen": "A walk.", "rejected": "A walk."},
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    for on_bad_input in ("skip", "error"):  # not an error in the record's form: counted either way
        data_cfg = DataConfig(sources=[SourceConfig(name="p", paths=[str(path)])], seq_len=128, val_fraction=0.0,
                              on_bad_input=on_bad_input)  # fmt: skip
        data = build_posttrain_data(data_cfg, PosttrainConfig(objective="dpo"), chat)
        assert len(data.train) == 1
        assert data.report.skipped["same_completion"] == 1
        assert "pairs.jsonl:2: chosen equals rejected" in data.report.summary()


def test_template_that_fails_to_render_is_counted_or_named(setup, tmp_path):
    _, tok_dir, chat, *_ = setup
    template = (
        "{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('cannot say boom') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}"
        "<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    custom = chat_tokenizer(str(tok_dir), template)
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "user", "content": "boom"}, {"role": "assistant", "content": "hello"}]}
    path = write_jsonl(tmp_path / "t.jsonl", [good, bad, good])
    data_cfg = DataConfig(sources=[SourceConfig(name="t", paths=[str(path)])], seq_len=64, val_fraction=0.0)
    data = build_posttrain_data(data_cfg, PosttrainConfig(objective="sft"), custom)
    assert len(data.train) == 2 and data.report.skipped["template_failed"] == 1
    assert "t.jsonl:2:" in data.report.examples["template_failed"][0]
    data_cfg.on_bad_input = "error"
    with pytest.raises(DataError, match=r"t.jsonl:2: .*cannot say boom"):
        build_posttrain_data(data_cfg, PosttrainConfig(objective="sft"), custom)


def test_distill_config_is_checked():
    with pytest.raises(ConfigError, match="distill_alpha"):
        PosttrainConfig(objective="distill", distill_alpha=1.5)
    with pytest.raises(ConfigError, match="distill_temperature"):
        PosttrainConfig(objective="distill", distill_temperature=0.0)
