"""Post-training through `forge train`: SFT from a Hugging Face folder, DPO from the SFT run, the export
carrying the chat template so transformers' apply_chat_template + generate reproduce our Generator's greedy
tokens. The long walk-through (quickstart -> chat_sft -> chat_dpo at their shipped sizes) is marked slow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from forge_lm.trainer.hub import to_hf
from forge_lm.trainer.metrics import read_metrics
from tests.conftest import REPO
from tests.unit.test_posttrain import make_tokenizer, tiny_model

FAST = [
    "trainer.device=cpu",
    "trainer.precision=fp32",
    "trainer.wandb.mode=disabled",
    "trainer.tensorboard=false",
    "trainer.plot=false",
    "data.seq_len=256",
    "trainer.global_batch_tokens=2048",
    "trainer.micro_batch_size=8",
    "posttrain.max_examples=400",
    "eval.max_batches=2",
    "eval.batch_size=8",
    "eval.max_new_tokens=8",
]


def forge_train(*overrides: str, nproc: int = 1) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", "forge_lm.trainer.train", *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "forge_lm.trainer.train", *overrides]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A small base model with a BPE without chat template, as a Hugging Face folder."""
    root = tmp_path_factory.mktemp("posttrain_e2e")
    from forge_lm.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(make_tokenizer(root / "bpe")))
    to_hf(tiny_model(tok.vocab_size, seed=0, tie=True), root / "base", tokenizer=tok)
    return root


def test_sft_then_dpo_then_transformers_generate(base):
    root = base
    forge_train("experiment=chat_sft", f"output_root={root}", f"posttrain.init_from={root / 'base'}",
                "trainer.max_steps=6", "trainer.log_every=3", "eval.every=0", *FAST)  # fmt: skip
    sft = root / "chat_sft"
    train = read_metrics(sft, "train")
    assert train[-1]["loss"] < train[0]["loss"]
    config = json.loads((sft / "hf" / "tokenizer_config.json").read_text())
    assert "{% generation %}" in config["chat_template"].replace("{%-", "{%")

    forge_train("experiment=chat_dpo", f"output_root={root}", "trainer.max_steps=4", "trainer.log_every=2",
                "eval.every=2", *FAST)  # fmt: skip
    held_out = read_metrics(root / "chat_dpo", "objective_val")
    assert abs(held_out[0]["loss"] - 0.693147) < 1e-4  # the policy starts as its reference
    assert {"rewards/chosen", "rewards/margins", "rewards/accuracies"} <= set(held_out[-1])
    train = read_metrics(root / "chat_dpo", "train")
    assert "rewards/accuracies" in train[-1]
    from forge_lm.tools.plot_runs import plot_objective

    curves = plot_objective([root / "chat_dpo"], root / "objective.png")  # training and held-out, per metric
    assert curves["rewards/accuracies"] == curves["loss"] == 2 and (root / "objective.png").stat().st_size > 0

    # The exported chat model: transformers renders the template and generates what our Generator does.
    from transformers import AutoTokenizer

    from forge_lm.tools.bench_posttrain import greedy_replies

    hf_dir = root / "chat_dpo" / "hf"
    tok = AutoTokenizer.from_pretrained(hf_dir)
    messages = [{"role": "user", "content": "Hey, how are you doing today?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]
    assert tok.decode(list(prompt)).endswith("<|im_start|>assistant\n")
    ours, theirs = greedy_replies(hf_dir, 12)  # the same prompt through the same template
    assert ours == theirs


def test_dpo_refuses_tensor_parallel(base):
    cmd = [sys.executable, "-m", "forge_lm.trainer.train", "experiment=chat_dpo", f"output_root={base}",
           f"posttrain.init_from={base / 'base'}", "parallel.tp=2", *FAST]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "WANDB_MODE": "disabled"})  # fmt: skip
    assert out.returncode != 0
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_sft_fsdp2_two_ranks_equals_one_process(base):
    from tests.distributed.conftest import assert_same_losses, losses, replace_overrides

    common = replace_overrides(
        ["experiment=chat_sft", f"output_root={base}", f"posttrain.init_from={base / 'base'}", *FAST],
        "trainer.max_steps=4", "trainer.log_every=1", "eval.every=0", "trainer.export_hf=false",
        "trainer.micro_batch_size=4",
    )  # fmt: skip
    forge_train(*common, "name=sft_one")
    forge_train(*common, "name=sft_two", "parallel.dp_shard=2", nproc=2)
    assert_same_losses(losses(base / "sft_two"), losses(base / "sft_one"), tol=1e-4)
