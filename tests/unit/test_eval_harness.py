"""Our lm_eval model ("forge") and our in-loop scoring against lm_eval's own HFLM on the exported folder.

A small random Llama with the real GPT-2 tokenizer is exported with `to_hf`; lm_eval's HFLM wraps the
`transformers` model of that folder, our ForgeLM and our in-loop Evaluator wrap our Decoder. The
requests come from lm_eval's own built-in tasks (hellaswag, arc_easy, piqa, lambada_openai, wikitext,
bigbench) reading the repository's task files through override YAMLs (trainer.eval.lm_eval_tasks).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from lm_eval.evaluator import evaluate  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from forge_lm.data.tokenizer import load_tokenizer  # noqa: E402
from forge_lm.trainer.config import EvalConfig  # noqa: E402
from forge_lm.trainer.eval.evaluator import Evaluator  # noqa: E402
from forge_lm.trainer.eval.formats import read_task  # noqa: E402
from forge_lm.trainer.eval.harness import ForgeLM  # noqa: E402
from forge_lm.trainer.eval.lm_eval_tasks import write_task_config  # noqa: E402
from forge_lm.trainer.eval.scorers import EvalModel  # noqa: E402
from forge_lm.trainer.hub import to_hf  # noqa: E402
from forge_lm.trainer.model import Decoder, ModelConfig  # noqa: E402

ASSETS = REPO / "tests" / "assets" / "eval"
BIGBENCH = REPO / "data" / "evalsets" / "bigbench"
LIMIT = 8  # documents per task (lm_eval --limit): the first ones, as our task_limit takes them
FILES = {
    "arc_format": ASSETS / "arc_format.jsonl",
    "hellaswag_format": ASSETS / "hellaswag_format.jsonl",
    "piqa_format": ASSETS / "piqa_format.jsonl",
    "lambada_format": ASSETS / "lambada_format.jsonl",
    "wikitext_format": ASSETS / "wikitext_format.jsonl",
    "emoji_movie": BIGBENCH / "emoji_movie" / "task.json",
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, gpt2_dir):
    """A random Llama (GPT-2 vocabulary, 128-token context) exported with its tokenizer."""
    tokenizer = load_tokenizer(gpt2_dir)
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128).with_vocab(
        tokenizer.vocab_size
    )
    model = Decoder.build(cfg, seed=0).eval()
    folder = Path(to_hf(model, tmp_path_factory.mktemp("hf") / "model", tokenizer=tokenizer))
    return model, tokenizer, folder


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lm_eval_tasks")
    for path in FILES.values():
        write_task_config(path, out)
    return out


@pytest.fixture(scope="module")
def runs(exported, task_dir):
    """lm_eval's results, samples included, for HFLM and for ForgeLM on every task."""
    model, tokenizer, folder = exported
    names = [f"forge_{n}" for n in FILES]
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    out = {}
    for key, lm in (
        ("hf", HFLM(pretrained=str(folder), device="cpu", batch_size=8)),
        ("forge", ForgeLM(pretrained=str(folder), device="cpu", batch_size=8)),
    ):
        out[key] = evaluate(
            lm=lm, task_dict=manager.load(names), bootstrap_iters=0, log_samples=True, limit=LIMIT
        )
    return out


def _responses(samples: list[dict]) -> list[tuple[float, bool | None]]:
    out = []
    for sample in samples:
        for resp in sample["resps"]:
            value = resp[0]
            if isinstance(value, (list, tuple)):
                out.append((float(value[0]), bool(value[1])))
            else:  # loglikelihood_rolling: a float
                out.append((float(value), None))
    return out


@pytest.mark.parametrize("name", list(FILES))
def test_forge_loglikelihoods_equal_hflm_per_request(runs, name):
    ours = _responses(runs["forge"]["samples"][f"forge_{name}"])
    theirs = _responses(runs["hf"]["samples"][f"forge_{name}"])
    assert len(ours) == len(theirs) > 0
    worst = max(abs(a[0] - b[0]) for a, b in zip(ours, theirs))
    assert worst <= 1e-4, worst
    assert [a[1] for a in ours] == [b[1] for b in theirs]  # is_greedy, request by request
    ours_metrics, their_metrics = (
        runs["forge"]["results"][f"forge_{name}"],
        runs["hf"]["results"][f"forge_{name}"],
    )
    assert ours_metrics.keys() == their_metrics.keys()
    for key, value in their_metrics.items():  # numbers within 1e-5, labels ("name", "alias") equal
        if isinstance(value, (int, float)):
            assert ours_metrics[key] == pytest.approx(value, rel=1e-5), key
        else:
            assert ours_metrics[key] == value, key


def test_in_loop_task_metrics_equal_lm_eval(exported, runs):
    """The Evaluator (what training and `forge eval` run) gives lm_eval's numbers on the same files."""
    model, tokenizer, _ = exported
    cfg = EvalConfig(tasks=[str(p) for p in FILES.values()], task_limit=LIMIT, task_batch_size=5, prompts=[])
    got = (
        Evaluator(cfg, tokenizer, model.cfg.max_seq_len)
        .run(0, None, EvalModel(model, torch.device("cpu")))
        .tasks
    )
    for name in FILES:
        want = {k.split(",")[0]: v for k, v in runs["hf"]["results"][f"forge_{name}"].items() if "," in k}
        want = {k: v for k, v in want.items() if not k.endswith("_stderr")}
        assert set(want) <= set(got[name]), (name, want, got[name])
        for metric, value in want.items():
            assert got[name][metric] == pytest.approx(value, rel=1e-5, abs=1e-9), (name, metric)
        assert got[name]["n"] == min(LIMIT, len(read_task(FILES[name]).docs))


def test_prompts_and_choices_are_lm_evals(task_dir):
    """Each document's prompt, choices and answer as lm_eval's built-in task builds them from the same record."""
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    tasks = manager.load([f"forge_{n}" for n in FILES])["tasks"]
    for name, path in FILES.items():
        theirs = tasks[f"forge_{name}"]
        docs = list(theirs.eval_docs)
        ours = read_task(path)
        assert len(ours.docs) == len(docs), name
        for mine, doc in zip(ours.docs, docs):
            if ours.kind == "multiple_choice":
                assert mine.context == theirs.doc_to_text(doc)
                assert list(mine.choices) == theirs.doc_to_choice(doc)
                assert mine.gold == theirs.doc_to_target(doc)
            elif ours.kind == "loglikelihood":
                assert (mine.context, mine.target) == (theirs.doc_to_text(doc), theirs.doc_to_target(doc))
            else:
                assert mine.text == theirs.doc_to_target(doc)


def test_generate_until_matches_hflm_greedy(exported):
    from lm_eval.api.instance import Instance

    _, _, folder = exported
    kwargs = {"until": ["\n", "."], "max_gen_toks": 12, "do_sample": False}
    contexts = ["ROMEO: But soft, what light", "def main(argv):\n    return", "To be, or not to be"]
    requests = [Instance("generate_until", {}, (c, dict(kwargs)), i) for i, c in enumerate(contexts)]
    ours = ForgeLM(pretrained=str(folder), device="cpu", batch_size=2).generate_until(requests)
    theirs = HFLM(pretrained=str(folder), device="cpu", batch_size=2).generate_until(requests)
    assert ours == theirs
    assert all("\n" not in text and "." not in text for text in ours)


def test_constructor_takes_lm_evals_arguments(exported, caplog):
    model, tokenizer, folder = exported
    lm = ForgeLM(
        pretrained=str(folder),
        batch_size="auto:4",
        max_batch_size=3,
        device="cuda:0",
        dtype="float32",
        revision="main",  # an argument lm_eval may pass that a local model has no use for
    )
    assert lm.batch_size == 3 and lm.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert "ignoring arguments it does not use: revision" in caplog.text
    assert ForgeLM(pretrained=model, tokenizer=tokenizer, batch_size="4").batch_size == 4
    with pytest.raises(ValueError, match="tokenizer"):
        ForgeLM(pretrained=model)


def test_cli_runs_lm_eval_with_the_forge_model(exported, task_dir, tmp_path):
    _, _, folder = exported
    out = tmp_path / "results"
    cmd = [
        sys.executable,
        "-m",
        "forge_lm.trainer.eval.harness",
        "--model",
        "forge",
        "--model_args",
        f"pretrained={folder}",
        "--tasks",
        "forge_arc_format,forge_wikitext_format",
        "--include_path",
        str(task_dir),
        "--limit",
        "3",
        "--batch_size",
        "4",
        "--output_path",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [result_file] = list(out.rglob("results*.json"))
    results = json.loads(result_file.read_text())["results"]
    assert set(results) == {"forge_arc_format", "forge_wikitext_format"}
    assert "bits_per_byte,none" in results["forge_wikitext_format"]
