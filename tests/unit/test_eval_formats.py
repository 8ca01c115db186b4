"""Task files: every public format parses into the prompts lm_eval builds; bad files give errors that name
the file, the format expected and what was found. (The prompts are compared with lm_eval's own tasks in
test_eval_harness.py; here, the parsing and the errors.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from forge_lm.trainer.config import ConfigError, EvalConfig
from forge_lm.trainer.eval.evaluator import load_tasks, parse_task_spec, resolve_task_path
from forge_lm.trainer.eval.formats import (
    TaskFormatError,
    bigbench_examples,
    hellaswag_clean,
    read_task,
    wikitext_detokenize,
)
from forge_lm.trainer.eval.tasks import ChoiceDoc, RollingDoc, TargetDoc
from tests.conftest import REPO

ASSETS = REPO / "tests" / "assets" / "eval"
BIGBENCH = REPO / "data" / "evalsets" / "bigbench"


@pytest.mark.parametrize(
    "file, fmt, kind, n",
    [
        ("hellaswag_format.jsonl", "hellaswag", "multiple_choice", 20),
        ("arc_format.jsonl", "arc", "multiple_choice", 20),
        ("piqa_format.jsonl", "piqa", "multiple_choice", 20),
        ("lambada_format.jsonl", "lambada", "loglikelihood", 20),
        ("wikitext_format.jsonl", "wikitext", "rolling", 5),
    ],
)
def test_each_public_format_is_recognised_and_parsed(file, fmt, kind, n):
    task = read_task(ASSETS / file)
    assert (task.format, task.kind, len(task.docs), task.name) == (fmt, kind, n, file.removesuffix(".jsonl"))
    record = json.loads((ASSETS / file).read_text().splitlines()[0])
    doc = task.docs[0]
    if fmt == "arc":
        assert doc == ChoiceDoc(
            f"Question: {record['question']}\nAnswer:",
            tuple(record["choices"]["text"]),
            record["choices"]["label"].index(record["answerKey"]),
        )
    elif fmt == "piqa":
        assert doc == ChoiceDoc(
            f"Question: {record['goal']}\nAnswer:", (record["sol1"], record["sol2"]), record["label"]
        )
    elif fmt == "hellaswag":
        ctx = record["activity_label"] + ": " + record["ctx_a"] + " " + record["ctx_b"].capitalize()
        assert doc == ChoiceDoc(ctx, tuple(record["endings"]), int(record["label"]))
    elif fmt == "lambada":
        *words, last = record["text"].split(" ")
        assert doc == TargetDoc(" ".join(words), " " + last)
    else:
        assert isinstance(doc, RollingDoc) and doc.bytes == len(record["page"].encode())
        assert (
            " @-@ " not in doc.text and " , " not in doc.text
        )  # detokenized; words counted on the page as stored


def test_requests_are_one_per_choice_with_the_target_delimiter():
    task = read_task(ASSETS / "piqa_format.jsonl").limited(2)
    requests = task.requests()
    assert len(requests) == 4
    assert (
        requests[0].context == task.docs[0].context
        and requests[0].continuation == " " + task.docs[0].choices[0]
    )


def test_text_clean_ups_follow_lm_eval():
    pytest.importorskip("lm_eval")
    from lm_eval.tasks.hellaswag.utils import preprocess
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    texts = [
        "Removing ice from car: Then, the man writes over the snow covering the window of a car [title] And more.",
        "[header] How to stay warm [step] Wear layers  of clothing. [substeps] Wool is best.",
        " = Valkyria Chronicles III = \n Senjō no Valkyria 3 : Unrecorded Chronicles ( Japanese : 戦場のヴァルキュリア3 , "
        "lit . Valkyria of the Battlefield 3 ) , commonly referred to as Valkyria Chronicles III outside Japan , is a "
        'tactical role @-@ playing video game ... 1 @,@ 000 copies , 2 @.@ 5 points ; " quoted " \' s',
        *[json.loads(line)["page"] for line in (ASSETS / "wikitext_format.jsonl").read_text().splitlines()],
    ]
    for text in texts:
        assert hellaswag_clean(text) == preprocess(text)
        assert wikitext_detokenize(text) == wikitext_detokenizer({"page": text})


def test_bigbench_tasks_parse_with_bigbench_prompts():
    code = read_task(BIGBENCH / "code_line_description" / "task.json")
    assert (code.name, code.format, code.kind, len(code.docs)) == (
        "code_line_description",
        "bigbench",
        "multiple_choice",
        60,
    )
    first = code.docs[0]
    assert first.context.startswith("\nPython code:\nfor i in range(23):\n    print(i)\n")
    assert first.context.endswith("\n\nEnglish language description:\n")
    assert "\n  choice: prints values from 0 to 22" in first.context  # choices listed in the prompt
    assert first.choices[first.gold] == "prints values from 0 to 22"
    crash = read_task(BIGBENCH / "crash_blossom" / "task.json")  # task_prefix, choices not appended
    assert (
        crash.docs[0].context.startswith("Identify the part of speech")
        and "choice:" not in crash.docs[0].context
    )
    assert {
        t: len(read_task(BIGBENCH / t / "task.json").docs) for t in ("known_unknowns", "emoji_movie")
    } == {
        "known_unknowns": 46,
        "emoji_movie": 100,
    }


def test_bigbench_duplicates_and_examples_without_choices(tmp_path):
    task = {
        "name": "tiny",
        "examples": [
            {"input": "2 + 2 =", "target_scores": {"4": 1, "5": 0}},
            {"input": "2 + 2 =", "target_scores": {"4": 1, "5": 0}},
            {"input": "Name a colour.", "target": "red"},
            {"input": "Pick.", "target_scores": {"a": 0, "b": 1}, "target": "why b is right"},
        ],
    }
    path = tmp_path / "task.json"
    path.write_text(json.dumps(task))
    records, notes = bigbench_examples(path, task)
    assert len(records) == 2 and notes == [
        "1 duplicate examples dropped",
        "1 examples without target_scores skipped",
    ]
    parsed = read_task(path)
    assert parsed.docs[0].gold == 0 and parsed.docs[1].gold == 1  # the target is not a choice: best score


def bad_file(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("unknown.jsonl", '{"prompt": "x", "answer": "y"}\n', [r"unknown task format", r"\['answer', 'prompt'\]", "hellaswag: JSON lines"]),
        ("arc.jsonl", '{"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "A"}\n'
         '{"question": "q", "choices": {"text": ["a"], "label": ["A"]}}\n', [r"arc\.jsonl:2", "arc record needs", "missing answerKey"]),
        ("arc_key.jsonl", '{"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"}\n',
         [r"arc_key\.jsonl:1", "malformed arc record", "answerKey 'C' is not one of the labels"]),
        ("hellaswag.jsonl", '{"ctx_a": "a", "ctx_b": "b", "activity_label": "x", "endings": ["e"], "label": ""}\n',
         [r"hellaswag\.jsonl:1", "malformed hellaswag record"]),
        ("broken.jsonl", '{"text": "a b"}\nnot json\n', [r"broken\.jsonl:2", "not a JSON object per line"]),
        ("empty.jsonl", "\n", ["no records"]),
        ("config.json", '{"model": "x"}', ["not a task file in a known format", "BIG-bench task.json", r"\['model'\]"]),
        ("list.json", "[1, 2]", ["found a list"]),
    ],
)  # fmt: skip
def test_bad_task_files_name_the_file_the_format_and_what_was_found(tmp_path, name, text, expected):
    path = bad_file(tmp_path, name, text)
    with pytest.raises(TaskFormatError) as info:
        read_task(path)
    assert str(path) in str(info.value)
    for pattern in expected:
        assert re.search(pattern, str(info.value)), (pattern, str(info.value))


def test_bigbench_task_made_of_subtasks_points_at_them(tmp_path):
    (tmp_path / "logic" / "three_objects").mkdir(parents=True)
    (tmp_path / "logic" / "task.json").write_text(json.dumps({"name": "logic", "description": "parent"}))
    (tmp_path / "logic" / "three_objects" / "task.json").write_text("{}")
    with pytest.raises(TaskFormatError, match="made of subtasks .*three_objects.*point at one subtask"):
        read_task(tmp_path / "logic" / "task.json")


def test_task_specs_paths_and_names(tmp_path):
    assert parse_task_spec("arc:some/arc.jsonl") == ("arc", "some/arc.jsonl")
    assert parse_task_spec("some/arc.jsonl") == (None, "some/arc.jsonl")
    # Relative paths fall back to the task files shipped in the package, so configs work from any directory.
    shipped = BIGBENCH / "known_unknowns" / "task.json"
    assert resolve_task_path("bigbench/known_unknowns/task.json").samefile(shipped)
    assert resolve_task_path("data/evalsets/bigbench/known_unknowns/task.json").samefile(shipped)
    with pytest.raises(TaskFormatError, match="no such file"):
        resolve_task_path("no/such/task.jsonl")
    same = str(ASSETS / "arc_format.jsonl")
    with pytest.raises(TaskFormatError, match="both named 'arc_format'"):
        load_tasks([same, same])
    tasks = load_tasks([same, f"arc2:{same}"], limit=3)
    assert [t.name for t in tasks] == ["arc_format", "arc2"] and len(tasks[1].docs) == 3


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("task_limit", 0, "eval.task_limit=0"),
        ("task_batch_size", 0, "eval.task_batch_size=0"),
        ("source_max_batches", 0, "eval.source_max_batches=0"),
        ("max_length", -1, "eval.max_length=-1"),
        ("tasks", [""], "eval.tasks holds empty entries"),
    ],
)
def test_eval_config_refuses_bad_values(field, value, match):
    with pytest.raises(ConfigError, match=match):
        EvalConfig(**{field: value})
