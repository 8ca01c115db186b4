"""Post-training runs end to end: SFT and DPO resume exactly, distillation through `forge train` (and a teacher
of another tokenizer refused in one line), DPO and distillation on 2-rank FSDP2 equal to one process, and the
documented walk-through quickstart -> chat_sft -> chat_dpo (+ chat_distill) with the exported chat model
generating in transformers what our Generator does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from forge_lm.tools.bench_posttrain import greedy_replies
from forge_lm.trainer.hub import to_hf
from forge_lm.trainer.metrics import read_metrics
from forge_lm.trainer.train import run
from tests.conftest import REPO, compose_config
from tests.e2e.test_posttrain import FAST, forge_train
from tests.unit.test_posttrain import make_tokenizer, read_chats, tiny_model


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Two small models with one BPE (base, teacher) and one with another BPE (stranger), as HF folders."""
    root = tmp_path_factory.mktemp("posttrain_walk")
    from forge_lm.data.tokenizer import load_tokenizer, train_bpe

    tok = load_tokenizer(str(make_tokenizer(root / "bpe")))
    to_hf(tiny_model(tok.vocab_size, seed=0, tie=True), root / "base", tokenizer=tok)
    to_hf(tiny_model(tok.vocab_size, seed=7, tie=True), root / "teacher", tokenizer=tok)
    train_bpe((m["content"] for c in read_chats(200) for m in c["messages"]), 600, str(root / "bpe600"),
              show_progress=False)  # fmt: skip
    other = load_tokenizer(str(root / "bpe600"))
    to_hf(tiny_model(other.vocab_size, seed=1, tie=True), root / "stranger", tokenizer=other)
    return root


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir, "train")}


RESUMABLE = {
    "sft": ["experiment=chat_sft"],
    "dpo": ["experiment=chat_dpo", "posttrain.max_examples=24"],
}


@pytest.mark.parametrize(  # DPO's resume is slow (its reference pass runs twice); SFT's stays in the default suite
    "objective", [pytest.param(o, marks=[pytest.mark.slow] if o == "dpo" else []) for o in sorted(RESUMABLE)]
)
def test_posttrain_resumes_exactly(base, objective):
    """Stopped at step 2 and run again (the same command), a run equals the uninterrupted one (as pre-training's
    resume tests check)."""
    common = [*RESUMABLE[objective], *FAST, f"output_root={base}", f"posttrain.init_from={base / 'base'}",
              "trainer.max_steps=4", "trainer.log_every=1", "eval.every=0", "trainer.export_hf=false",
              "trainer.micro_batch_size=4", "trainer.global_batch_tokens=2048"]  # fmt: skip
    straight = run(compose_config(*common, f"name={objective}_straight"))
    stopped = compose_config(*common, f"name={objective}_stopped", "trainer.exit_at_step=2")
    first = run(stopped)
    assert first.step == 2
    resumed = run(compose_config(*common, f"name={objective}_stopped", "trainer.exit_at_step=2"))
    assert resumed.step == 4
    a, b = train_losses(straight.run_dir), train_losses(resumed.run_dir)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(abs(a[s] - b[s]) <= 1e-6 for s in a), (a, b)
    assert abs(straight.final_val_loss - resumed.final_val_loss) <= 1e-6


def test_distill_runs_and_refuses_another_tokenizer(base):
    forge_train("experiment=chat_distill", f"output_root={base}", f"posttrain.init_from={base / 'base'}",
                f"posttrain.teacher={base / 'teacher'}", "posttrain.distill_alpha=1.0", "trainer.max_steps=6",
                "trainer.log_every=1", "eval.every=6", "trainer.export_hf=false", "trainer.lr=3e-3",
                *FAST)  # fmt: skip
    train = read_metrics(base / "chat_distill", "train")
    assert train[-1]["distill/kl"] < 0.8 * train[0]["distill/kl"], [r["distill/kl"] for r in train]
    held_out = read_metrics(base / "chat_distill", "objective_val")
    assert [r["step"] for r in held_out] == [0, 6]
    assert held_out[-1]["distill/kl"] < held_out[0]["distill/kl"]
    assert abs(held_out[0]["loss"] - held_out[0]["distill/kl"]) < 1e-6  # alpha = 1: the loss is the KL

    cmd = [sys.executable, "-m", "forge_lm.trainer.train", "experiment=chat_distill", f"output_root={base}",
           "name=distill_stranger", f"posttrain.init_from={base / 'base'}", f"posttrain.teacher={base / 'stranger'}",
           *FAST]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "teacher's tokenizer" in out.stderr and str(base / "stranger") in out.stderr, out.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["dpo", "distill"])
def test_fsdp2_two_ranks_equals_one_process(base, objective):
    from tests.distributed.conftest import assert_same_losses, losses, replace_overrides

    experiment = {"dpo": ["experiment=chat_dpo", "posttrain.max_examples=200"],
                  "distill": ["experiment=chat_distill", f"posttrain.teacher={base / 'teacher'}"]}[objective]  # fmt: skip
    common = replace_overrides(
        [*experiment, f"output_root={base}", f"posttrain.init_from={base / 'base'}", *FAST],
        "trainer.max_steps=4", "trainer.log_every=1", "eval.every=0", "trainer.export_hf=false",
        "trainer.micro_batch_size=4", "trainer.global_batch_tokens=2048",
    )  # fmt: skip
    forge_train(*common, f"name={objective}_one")
    forge_train(*common, f"name={objective}_two", "parallel.dp_shard=2", nproc=2)
    assert_same_losses(losses(base / f"{objective}_two"), losses(base / f"{objective}_one"), tol=1e-4)


# The walk-through of docs/posttrain.md, each run cut short; the quickstart's own tokenizer is trained small.
QUICKSTART = [
    "trainer.max_steps=6", "trainer.log_every=3", "eval.every=0", "eval.tasks=[]", "eval.max_batches=1",
    "eval.max_new_tokens=4", "data.tokenizer.vocab_size=1024", "data.tokenizer.train_max_chars=300000",
    "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
]  # fmt: skip


def test_walkthrough_quickstart_sft_dpo_distill(tmp_path):
    """The short version of the documented chain (each stage a few steps; about half a minute), in CI; the
    full one is `forge bench posttrain`, its numbers in docs/BENCHMARKS.md."""
    root = tmp_path
    forge_train("experiment=quickstart", f"output_root={root}", *QUICKSTART, *FAST[:5])
    forge_train("experiment=chat_sft", f"output_root={root}", "trainer.max_steps=6", "trainer.log_every=3",
                "eval.every=0", *FAST)  # fmt: skip
    forge_train("experiment=chat_dpo", f"output_root={root}", "trainer.max_steps=4", "trainer.log_every=2",
                "eval.every=0", *FAST)  # fmt: skip
    forge_train("experiment=chat_distill", f"output_root={root}", "trainer.max_steps=4", "trainer.log_every=2",
                "eval.every=4", *FAST)  # fmt: skip
    assert (
        read_metrics(root / "chat_sft", "train")[-1]["loss"]
        < read_metrics(root / "chat_sft", "train")[0]["loss"]
    )
    assert "rewards/accuracies" in read_metrics(root / "chat_dpo", "train")[-1]
    held_out = read_metrics(root / "chat_distill", "objective_val")
    assert held_out[-1]["distill/kl"] < held_out[0]["distill/kl"]

    for run_name in ("chat_dpo", "chat_distill"):
        hf_dir = root / run_name / "hf"
        assert (hf_dir / "tokenizer_config.json").is_file(), run_name
        ours, theirs = greedy_replies(hf_dir, 12)
        assert ours == theirs, run_name
