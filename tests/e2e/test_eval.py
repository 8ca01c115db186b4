"""Evaluation end to end: a tiny training run that evaluates tasks, per-source bits per byte and samples at
every evaluation; the same numbers from lm_eval on its exported folder; `forge eval` on its
checkpoint and on its Hugging Face folder; and the errors for inputs that do not fit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from forge_lm.trainer.eval.__main__ import main as eval_main
from forge_lm.trainer.metrics import read_metrics
from forge_lm.trainer.train import run
from tests.conftest import REPO, compose_config, tiny_overrides

TASKS = [
    "bigbench/known_unknowns/task.json",
    "tests/assets/eval/arc_format.jsonl",
    "tests/assets/eval/lambada_format.jsonl",
    "tests/assets/eval/wikitext_format.jsonl",
]
NAMES = ["known_unknowns", "arc_format", "lambada_format", "wikitext_format"]
EVAL = [f"eval.tasks=[{','.join(TASKS)}]", "eval.task_limit=10", "eval.max_new_tokens=6"]


@pytest.fixture(scope="module")
def trained(shared_output_root):
    cfg = compose_config(
        *tiny_overrides(shared_output_root, "evaluated", "trainer.max_steps=20", "eval.every=10", *EVAL)
    )
    return cfg, run(cfg)


def test_every_evaluation_logs_tasks_bits_per_byte_per_source_and_generations(trained):
    cfg, result = trained
    val = read_metrics(result.run_dir, "val")
    assert [r["step"] for r in val] == [0, 10, 20]
    for record in val:
        for prefix in ("", "shakespeare/", "cpython/"):  # data=tiny reads two sources
            assert {f"{prefix}loss", f"{prefix}perplexity", f"{prefix}bpb"} <= set(record)
        assert 0 < record["bpb"] < record["loss"] / 0.69  # fewer bits per byte than bits per token
    tasks = read_metrics(result.run_dir, "tasks")
    assert [r["step"] for r in tasks] == [0, 10, 20]
    final = tasks[-1]
    for name in ("known_unknowns", "arc_format"):
        assert (
            0 <= final[f"{name}/acc"] <= 1
            and 0 <= final[f"{name}/acc_norm"] <= 1
            and final[f"{name}/n"] == 10
        )
    assert {"lambada_format/perplexity", "lambada_format/acc", "wikitext_format/bits_per_byte"} <= set(final)
    assert final["wikitext_format/n"] == 5
    generations = read_metrics(result.run_dir, "generations")
    assert [r["step"] for r in generations] == [0, 10, 20]
    assert [s["prompt"] for s in generations[-1]["samples"]] == list(cfg.eval.prompts)
    assert all(s["text"].startswith(s["prompt"]) for s in generations[-1]["samples"])
    assert result.samples == {s["prompt"]: s["text"] for s in generations[-1]["samples"]}
    assert result.final_eval.tasks["arc_format"]["acc"] == final["arc_format/acc"]


def test_in_loop_task_numbers_equal_lm_evals_on_the_exported_folder(trained, tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from forge_lm.trainer.eval.evaluator import resolve_task_path
    from forge_lm.trainer.eval.lm_eval_tasks import write_task_config

    _, result = trained
    names = [write_task_config(resolve_task_path(t), tmp_path) for t in TASKS]
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    hf = HFLM(pretrained=str(result.hf_dir), device="cpu", batch_size=8)
    theirs = evaluate(lm=hf, task_dict=manager.load(names), bootstrap_iters=0, limit=10)["results"]
    ours = result.final_eval.tasks
    for name in NAMES:
        for key, value in theirs[f"forge_{name}"].items():
            metric = key.split(",")[0]
            if "," in key and not metric.endswith("_stderr"):
                assert ours[name][metric] == pytest.approx(value, rel=1e-5), (name, metric)


def _standalone(capsys, *args: str) -> tuple[int, str, str]:
    code = eval_main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_standalone_on_the_checkpoint_reproduces_the_final_evaluation(
    trained, shared_output_root, tmp_path, capsys
):
    cfg, result = trained
    overrides = tiny_overrides(shared_output_root, "evaluated", *EVAL)
    out_file = tmp_path / "results.json"
    code, out, err = _standalone(
        capsys, f"eval.checkpoint={result.checkpoint}", f"eval.output={out_file}", *overrides
    )
    assert code == 0, err
    assert "(step 20)" in out and "known_unknowns: acc" in out
    got = json.loads(out_file.read_text())
    final = result.final_eval
    for key in ("loss", "bpb", "shakespeare/bpb", "cpython/loss"):
        assert got["val"][key] == pytest.approx(final.val[key], rel=1e-5), key
    for name in NAMES:
        assert got["tasks"][name] == pytest.approx(final.tasks[name], rel=1e-5), name


def test_standalone_cli_on_the_hugging_face_folder(trained, tmp_path):
    _, result = trained
    out_file = tmp_path / "hf.json"
    cmd = [
        sys.executable,
        "-m",
        "forge_lm.trainer.eval",
        f"eval.checkpoint={result.hf_dir}",
        f"eval.output={out_file}",
        "eval.validation=false",
        "eval.prompts=[]",
        *EVAL,
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out_file.read_text())
    assert got["val"] == {} and got["samples"] == {}
    for name in NAMES:
        assert got["tasks"][name] == pytest.approx(result.final_eval.tasks[name], rel=1e-5), name


def test_standalone_refuses_what_does_not_fit(trained, tmp_path, capsys):
    _, result = trained
    ckpt = f"eval.checkpoint={result.checkpoint}"
    code, _, err = _standalone(capsys, ckpt, "model=qwen3_tiny")
    assert (
        code == 2 and "another architecture than the model config asks for" in err and "family='llama'" in err
    )
    code, _, err = _standalone(
        capsys, ckpt, f"eval.tokenizer={REPO / 'tests' / 'assets' / 'tokenizers' / 'gpt2'}"
    )
    assert code == 2 and "the tokenizer has 50257 tokens but the model's vocabulary holds" in err
    bad = tmp_path / "questions.jsonl"
    bad.write_text('{"prompt": "2+2=", "answer": "4"}\n')
    code, _, err = _standalone(capsys, ckpt, f"eval.tasks=[{bad}]")
    assert code == 2 and str(bad) in err and "unknown task format" in err and "arc: JSON lines with" in err
    code, _, err = _standalone(capsys, "eval.checkpoint=/no/such/run")
    assert code == 2 and "/no/such/run" in err
