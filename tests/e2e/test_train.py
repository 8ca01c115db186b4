"""End to end: real text -> tokenizer -> shards -> training -> checkpoint -> resume -> HF export."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from forge_lm.trainer.metrics import read_metrics
from forge_lm.trainer.train import run
from tests.conftest import REPO, compose_config, tiny_overrides


def test_tiny_run_learns_checkpoints_and_exports_a_folder_transformers_loads(shared_output_root):
    cfg = compose_config(
        *tiny_overrides(shared_output_root, "learn", "trainer.max_steps=40", "eval.every=20")
    )
    result = run(cfg)

    assert result.step == 40
    assert result.final_val_loss < result.initial_val_loss - 1.0
    train = read_metrics(result.run_dir, "train")
    assert [r["step"] for r in train] == list(range(1, 41))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "step_time_s"} <= set(train[0])
    assert [r["step"] for r in read_metrics(result.run_dir, "val")] == [0, 20, 40]
    assert (result.run_dir / "config.yaml").read_text().count("global_batch_tokens: 1024") == 1
    assert result.checkpoint.name == "step_0000040"
    assert set(result.samples) == set(cfg.eval.prompts)

    # The exported folder loads offline in transformers and gives our logits.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forge_lm.trainer.hub import from_hf

    hf_model = AutoModelForCausalLM.from_pretrained(result.hf_dir).eval()
    ours = from_hf(result.hf_dir).eval()
    hf_tok = AutoTokenizer.from_pretrained(result.hf_dir)
    text = "ROMEO:\nBut soft, what light through yonder window breaks?\ndef f(x):\n    return x"
    ids = torch.tensor([hf_tok(text)["input_ids"]])
    with torch.no_grad():
        diff = (hf_model(ids).logits - ours(ids)).abs().max().item()
    assert diff <= 1e-4
    from forge_lm.data.tokenizer import load_tokenizer

    assert hf_tok(text)["input_ids"] == load_tokenizer(result.hf_dir).encode(text)
    gen = json.loads((result.hf_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == load_tokenizer(result.hf_dir).eos_id


def test_resume_reproduces_the_uninterrupted_run_exactly(shared_output_root):
    n = 4
    uninterrupted = run(
        compose_config(*tiny_overrides(shared_output_root, "straight", f"trainer.max_steps={2 * n}"))
    )

    interrupted = compose_config(
        *tiny_overrides(
            shared_output_root, "stopped", f"trainer.max_steps={2 * n}", f"trainer.exit_at_step={n}"
        )
    )
    first = run(interrupted)
    assert first.step == n and first.checkpoint.name == f"step_{n:07d}"
    second = run(interrupted)  # same command again: resumes from step n
    assert second.step == 2 * n

    straight = {r["step"]: r["loss"] for r in read_metrics(uninterrupted.run_dir, "train")}
    resumed = {r["step"]: r["loss"] for r in read_metrics(second.run_dir, "train")}
    assert sorted(resumed) == list(range(1, 2 * n + 1))
    for step in range(1, 2 * n + 1):
        assert abs(straight[step] - resumed[step]) <= 1e-6, (step, straight[step], resumed[step])
    assert abs(uninterrupted.final_val_loss - second.final_val_loss) <= 1e-6
    assert second.initial_val_loss == uninterrupted.initial_val_loss


def test_cli_runs_a_few_steps_and_prints_where_artifacts_went(shared_output_root):
    args = tiny_overrides(shared_output_root, "cli", "trainer.max_steps=3", "trainer.export_hf=false")
    out = subprocess.run(
        [sys.executable, "-m", "forge_lm.trainer.train", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "run 'cli' finished at step 3" in out.stdout
    assert "metrics (JSONL)" in out.stdout and "checkpoint" in out.stdout
    run_dir = shared_output_root / "cli"
    assert (run_dir / "config.yaml").exists() and (run_dir / ".hydra" / "overrides.yaml").exists()
    assert (run_dir / "train.log").read_text().count("step 3 | loss") == 1


@pytest.mark.slow
def test_quickstart_lowers_validation_loss_by_a_nat(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "forge_lm.trainer.train",
            "experiment=quickstart",
            f"output_root={tmp_path}",
            "trainer.wandb.mode=disabled",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    val = read_metrics(tmp_path / "quickstart", "val")
    assert val[0]["step"] == 0 and val[-1]["step"] == 200
    assert val[-1]["loss"] <= val[0]["loss"] - 1.0


def test_export_tool_turns_a_checkpoint_into_the_same_hf_folder(shared_output_root, tmp_path):
    from forge_lm.tools.export_hf import main as export_main
    from forge_lm.trainer.hub import from_hf

    result = run(compose_config(*tiny_overrides(shared_output_root, "export", "trainer.max_steps=2")))
    assert export_main([str(result.checkpoint), str(tmp_path / "hf")]) == 0
    exported, trained = from_hf(tmp_path / "hf"), from_hf(result.hf_dir)
    for (name, a), (_, b) in zip(exported.state_dict().items(), trained.state_dict().items()):
        assert torch.equal(a, b), name
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == (result.hf_dir / "tokenizer.json").read_text()
    assert export_main([str(tmp_path), str(tmp_path / "hf2")]) == 2  # not a checkpoint: clear error, no export
    assert not (tmp_path / "hf2").exists()


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("best_fit_masked", ["data.packing=best_fit", "data.document_masking=true"]),
        ("online", ["data.mode=online"]),
    ],
)
def test_packing_modes_train_and_resume_through_the_trainer(shared_output_root, name, overrides):
    """Best-fit packing with document masking, and online tokenization, run end to end and resume exactly."""
    straight = run(compose_config(*tiny_overrides(shared_output_root, f"{name}_a", "trainer.max_steps=4",
                                                   "trainer.export_hf=false", *overrides)))
    stopped = compose_config(*tiny_overrides(shared_output_root, f"{name}_b", "trainer.max_steps=4",
                                             "trainer.exit_at_step=2", "trainer.export_hf=false", *overrides))
    run(stopped)
    resumed = run(stopped)
    a = {r["step"]: r["loss"] for r in read_metrics(straight.run_dir, "train")}
    b = {r["step"]: r["loss"] for r in read_metrics(resumed.run_dir, "train")}
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(abs(a[s] - b[s]) <= 1e-6 for s in a), (a, b)
    assert straight.final_val_loss < straight.initial_val_loss
