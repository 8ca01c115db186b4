"""SFT and DPO against Hugging Face TRL (fp32, CPU): same chats, template and weights (our HF export loaded
into TRL's trainers), the same label masks token for token, and losses and reward metrics within 1e-5."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")  # the `dev` extra installs it; without it the comparison cannot run
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

from forge_lm.trainer.hub import to_hf  # noqa: E402
from forge_lm.trainer.loss import IGNORE_INDEX  # noqa: E402
from forge_lm.trainer.posttrain.chat import chat_tokenizer, grow_vocab, tokenize_messages  # noqa: E402
from forge_lm.trainer.posttrain.config import PosttrainConfig  # noqa: E402
from forge_lm.trainer.posttrain.data import (  # noqa: E402
    Example,
    PosttrainReport,
    _Record,
    collate_examples,
    collate_pairs,
    pack,
    pair_example,
    sft_example,
)
from forge_lm.trainer.posttrain.dpo import DPOObjective, reference_logps  # noqa: E402
from tests.unit.test_posttrain import make_tokenizer, read_chats, tiny_model  # noqa: E402

SEQ = 512


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl")
    chat = chat_tokenizer(str(make_tokenizer(root / "bpe")))
    policy, reference = tiny_model(512, seed=1), tiny_model(512, seed=2)
    for m in (policy, reference):
        grow_vocab(m, chat.vocab_size)
    to_hf(policy, root / "policy", tokenizer=chat)
    to_hf(reference, root / "reference", tokenizer=chat)
    return chat, policy.eval(), reference.eval(), root


def _trl_args(cls, root: Path, **kw):
    return cls(
        output_dir=str(root / "out"),
        report_to=[],
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=4,
        **kw,
    )


def _hf(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _our_loss(model, examples: list[Example], eos: int) -> float:
    rows = [[examples[i] for i in row] for row in pack([len(e.ids) for e in examples], SEQ)]
    batch = collate_examples(rows, SEQ, eos)
    with torch.no_grad():
        losses = model(batch["input_ids"], document_ids=batch["document_ids"], labels=batch["labels"])
    return (losses.sum() / (batch["labels"] != IGNORE_INDEX).sum()).item()


@pytest.mark.parametrize("kind", ["assistant", "completion"])
def test_sft_masks_and_loss_equal_trl(setup, kind):
    chat, policy, _, root = setup
    chats = read_chats(12)
    if kind == "assistant":
        rows = [{"messages": c["messages"]} for c in chats]
        args = _trl_args(SFTConfig, root, assistant_only_loss=True, max_length=None)
    else:  # conversational prompt/completion: the last assistant turn is the completion
        rows = []
        for c in chats:
            last = max(i for i, m in enumerate(c["messages"]) if m["role"] == "assistant")
            rows.append({"prompt": c["messages"][:last], "completion": [c["messages"][last]]})
        args = _trl_args(SFTConfig, root, max_length=None)
    tok = AutoTokenizer.from_pretrained(root / "policy")
    trainer = SFTTrainer(
        model=_hf(root / "policy"), args=args, train_dataset=Dataset.from_list(rows), processing_class=tok
    )

    cfg = PosttrainConfig(objective="sft", loss_on="assistant")
    ours = [
        sft_example(_Record(r, f"x:{i}", "c"), chat, cfg, SEQ, PosttrainReport(), strict=True)
        for i, r in enumerate(rows)
    ]
    for ex, theirs in zip(ours, trainer.train_dataset):
        assert ex.ids.tolist() == theirs["input_ids"]
        # TRL's labels are unshifted (the model shifts): label t is learned where our mask[t] is set.
        assert [t != IGNORE_INDEX for t in theirs["labels"]][1:] == (ex.mask[1:] > 0).tolist()

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    with torch.no_grad():
        want = trainer.compute_loss(trainer.model, batch).item()
    got = _our_loss(policy, ours, chat.eos_id)
    assert abs(got - want) < 1e-5, (got, want)


def test_tokenize_messages_equals_transformers_apply_chat_template(setup):
    chat, _, _, root = setup
    tok = AutoTokenizer.from_pretrained(root / "policy")
    for c in read_chats(50):
        ids, mask = tokenize_messages(chat, c["messages"], "assistant")
        out = tok.apply_chat_template(
            c["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert list(out["input_ids"]) == ids and list(out["assistant_masks"]) == mask.tolist()


@pytest.mark.parametrize(
    "loss_type",
    ["sigmoid", pytest.param("ipo", marks=pytest.mark.slow), pytest.param("hinge", marks=pytest.mark.slow)],
)
def test_dpo_loss_and_rewards_equal_trl(setup, loss_type):
    chat, policy, reference, root = setup
    chats = read_chats(16)[8:]
    rows = []
    for i, c in enumerate(chats):
        m = c["messages"]
        j = max(k for k, x in enumerate(m) if x["role"] == "assistant")
        other = next(x for x in chats[(i + 3) % len(chats)]["messages"] if x["role"] == "assistant")
        rows.append({"prompt": m[max(0, j - 2) : j], "chosen": [m[j]], "rejected": [other]})
    tok = AutoTokenizer.from_pretrained(root / "policy")
    args = _trl_args(DPOConfig, root, beta=0.1, loss_type=[loss_type], max_length=None)
    trainer = DPOTrainer(
        model=_hf(root / "policy"), ref_model=_hf(root / "reference"), args=args,
        train_dataset=Dataset.from_list(rows), processing_class=tok,
    )  # fmt: skip
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    trainer.model.train()  # TRL logs under "train" in training mode; the models have no dropout
    with torch.no_grad():
        want = trainer.compute_loss(trainer.model, batch).item()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    cfg = PosttrainConfig(objective="dpo")
    pairs = [pair_example(r["prompt"], r["chosen"], r["rejected"], f"x:{i}", chat, cfg, SEQ, PosttrainReport())
             for i, r in enumerate(rows)]  # fmt: skip
    for p, theirs in zip(pairs, trainer.train_dataset):
        n = len(theirs["prompt_ids"])
        assert p.chosen.ids.tolist() == theirs["prompt_ids"] + theirs["chosen_ids"]
        assert p.rejected.ids.tolist() == theirs["prompt_ids"] + theirs["rejected_ids"]
        assert not p.chosen.mask[:n].any() and p.chosen.mask[n:].all()

    def collate(rows_):
        return collate_pairs(rows_, SEQ, chat.eos_id)

    reference_logps(reference, pairs, collate, torch.device("cpu"))
    objective = DPOObjective(0.1, loss_type)
    packed = [[pairs[i] for i in row] for row in pack([len(p) for p in pairs], SEQ)]
    with torch.no_grad():
        loss, sums = objective.loss_sum(policy, collate(packed), torch.device("cpu"))
    assert abs(loss.item() / len(pairs) - want) < 1e-5, (loss.item() / len(pairs), want)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert abs(sums[name].item() / len(pairs) - metrics[name]) < 1e-5, (
            name,
            sums[name] / len(pairs),
            metrics[name],
        )
