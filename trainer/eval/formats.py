"""Benchmark files in their public formats, read into `Task`s with the prompts lm_eval builds for them.

    format     file                           a record                                          task kind
    hellaswag  .jsonl (Rowan/hellaswag)       ctx_a, ctx_b, activity_label, endings[4], label   multiple_choice
    arc        .jsonl (allenai/ai2_arc)       question, choices{text[], label[]}, answerKey     multiple_choice
    piqa       .jsonl (PIQA)                  goal, sol1, sol2, label                           multiple_choice
    lambada    .jsonl (lambada_openai)        text (its last word is the target)                loglikelihood
    wikitext   .jsonl (wikitext_document_*)   page                                              rolling
    bigbench   task.json (BIG-bench)          {"examples": [{input, target_scores, [target]}]}  multiple_choice

The prompt and choices of each record are exactly what lm_eval's built-in task (hellaswag, arc_easy /
arc_challenge, piqa, lambada_openai, wikitext, bigbench_*_multiple_choice) builds from the same record,
so the numbers agree (docs/eval.md shows the templates). The format is recognised from the file itself;
a file in no known format, or a record missing what its format needs, raises `TaskFormatError` naming
the file (and line), the format expected and what was found.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import numpy as np

from forge_lm.trainer.eval.tasks import (
    LOGLIKELIHOOD,
    MULTIPLE_CHOICE,
    ROLLING,
    ChoiceDoc,
    Doc,
    RollingDoc,
    TargetDoc,
    Task,
)


class TaskFormatError(ValueError):
    """A task file is not in a known format, or one of its records is malformed."""


# What each format's records must hold, for detection and for error messages.
REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "hellaswag": ("ctx_a", "ctx_b", "activity_label", "endings", "label"),
    "arc": ("question", "choices", "answerKey"),
    "piqa": ("goal", "sol1", "sol2", "label"),
    "wikitext": ("page",),
    "lambada": ("text",),
}
FORMATS = (*REQUIRED_KEYS, "bigbench")


def expected_formats() -> str:
    """One line per known format, for error messages."""
    lines = [f"  {name}: JSON lines with {', '.join(keys)}" for name, keys in REQUIRED_KEYS.items()]
    lines.append('  bigbench: a BIG-bench task.json, {"examples": [{"input", "target_scores"}, ...]}')
    return "\n".join(lines)


def read_task(path: str | Path, name: Optional[str] = None, format: str = "auto") -> Task:
    """Read a benchmark file into a Task. `format='auto'` recognises it from its content."""
    path = Path(path)
    if not path.is_file():
        raise TaskFormatError(f"{path}: no such task file.")
    if format != "auto" and format not in FORMATS:
        raise TaskFormatError(f"{path}: format={format!r} is not one of auto, {', '.join(FORMATS)}.")
    if path.suffix == ".json":
        data = _load_json(path)
        if format in ("auto", "bigbench") and isinstance(data, dict) and "examples" in data:
            return _bigbench_task(path, data, name)
        found = (
            f"an object with keys {sorted(data)[:12]}"
            if isinstance(data, dict)
            else f"a {type(data).__name__}"
        )
        subtasks = sorted(p.parent.name for p in path.parent.glob("*/task.json"))
        if isinstance(data, dict) and subtasks:
            raise TaskFormatError(
                f"{path}: a BIG-bench task made of subtasks ({', '.join(subtasks)}) holds no examples itself: "
                f"point at one subtask's task.json, e.g. {path.parent / subtasks[0] / 'task.json'}."
            )
        raise TaskFormatError(
            f"{path}: not a task file in a known format. A .json task file must be a BIG-bench task.json "
            f'({{"examples": [...]}}); found {found}. Known formats:\n{expected_formats()}'
        )
    records = list(_json_lines(path))
    if not records:
        raise TaskFormatError(f"{path}: no records (an empty file). Known formats:\n{expected_formats()}")
    line, first = records[0]
    fmt = format if format != "auto" else detect_format(first)
    if fmt is None or fmt == "bigbench":
        found = (
            f"a record with keys {sorted(first)}" if isinstance(first, dict) else f"a {type(first).__name__}"
        )
        raise TaskFormatError(
            f"{path}:{line}: unknown task format: found {found}. Known formats:\n{expected_formats()}"
        )
    reader, kind = _READERS[fmt]
    docs: list[Doc] = []
    for line, record in records:
        where = f"{path}:{line}"
        _require(record, REQUIRED_KEYS[fmt], fmt, where)
        try:
            docs.append(reader(record))
        except (KeyError, ValueError, TypeError, AttributeError, IndexError) as e:
            raise TaskFormatError(f"{where}: malformed {fmt} record ({type(e).__name__}: {e}).") from e
    return Task(name or _default_name(path), kind, docs, format=fmt, path=str(path))


def detect_format(record: Any) -> Optional[str]:
    """The JSON-lines format a record belongs to, or None. The most specific key sets are tried first."""
    if not isinstance(record, dict):
        return None
    for fmt, keys in REQUIRED_KEYS.items():
        if all(k in record for k in keys):
            return fmt
    return None


def _default_name(path: Path) -> str:
    stem = path.name.removesuffix(".jsonl").removesuffix(".json")
    return path.parent.name if stem == "task" else stem


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TaskFormatError(f"{path}: not valid JSON ({e}).") from e
    except UnicodeDecodeError as e:
        raise TaskFormatError(f"{path}: not UTF-8 text ({e}).") from e


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as e:
                    raise TaskFormatError(
                        f"{path}:{number}: not a JSON object per line ({e}). Task files other than a BIG-bench "
                        f"task.json are JSON lines. Known formats:\n{expected_formats()}"
                    ) from e
    except UnicodeDecodeError as e:
        raise TaskFormatError(f"{path}: not UTF-8 text ({e}).") from e


def _require(record: Any, keys: tuple[str, ...], fmt: str, where: str) -> None:
    if not isinstance(record, dict):
        raise TaskFormatError(
            f"{where}: a {fmt} record must be a JSON object; found a {type(record).__name__}."
        )
    missing = [k for k in keys if k not in record]
    if missing:
        raise TaskFormatError(
            f"{where}: a {fmt} record needs {', '.join(keys)}; missing {', '.join(missing)} "
            f"(found keys {sorted(record)})."
        )


def _texts(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a non-empty list of strings, got {value!r:.80}")
    return tuple(value)


def _gold(index: int, n: int) -> int:
    if not 0 <= index < n:
        raise ValueError(f"the answer index {index} is not one of the {n} choices")
    return index


# ---- HellaSwag --------------------------------------------------------------------------------------------


def hellaswag_clean(text: str) -> str:
    """lm_eval's HellaSwag text clean-up: the WikiHow part carries bracketed markers ('[title]', '[step]')."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(r: dict) -> ChoiceDoc:
    # ctx_b starts mid-sentence in lower case; lm_eval capitalises it (str.capitalize also lowers the rest).
    context = r["ctx_a"] + " " + r["ctx_b"].capitalize()
    choices = tuple(hellaswag_clean(e) for e in _texts(r["endings"], "endings"))
    return ChoiceDoc(
        hellaswag_clean(r["activity_label"] + ": " + context), choices, _gold(int(r["label"]), len(choices))
    )


# ---- ARC and PIQA ---------------------------------------------------------------------------------------


def _arc(r: dict) -> ChoiceDoc:
    choices = r["choices"]
    if not isinstance(choices, dict):
        raise ValueError(f"choices must be an object {{text: [...], label: [...]}}, got {choices!r:.80}")
    texts, labels = _texts(choices["text"], "choices.text"), list(choices["label"])
    if r["answerKey"] not in labels:
        raise ValueError(f"answerKey {r['answerKey']!r} is not one of the labels {labels}")
    return ChoiceDoc(
        f"Question: {r['question']}\nAnswer:", texts, _gold(labels.index(r["answerKey"]), len(texts))
    )


def _piqa(r: dict) -> ChoiceDoc:
    choices = (r["sol1"], r["sol2"])
    if not all(isinstance(c, str) for c in choices):
        raise ValueError("sol1 and sol2 must be strings")
    if isinstance(r["label"], bool) or not isinstance(r["label"], int):
        raise ValueError(f"label must be 0 or 1, got {r['label']!r}")
    return ChoiceDoc(f"Question: {r['goal']}\nAnswer:", choices, _gold(r["label"], 2))


# ---- LAMBADA and WikiText --------------------------------------------------------------------------------


def _lambada(r: dict) -> TargetDoc:
    # lambada_openai: the context is every space-separated word but the last; the target is " " + last word.
    words = r["text"].split(" ")
    if len(words) < 2:
        raise ValueError("text must hold at least two space-separated words")
    return TargetDoc(" ".join(words[:-1]), " " + words[-1])


def wikitext_detokenize(page: str) -> str:
    """Undo WikiText's tokenization (' @-@ ', ' , ' ...) as lm_eval's wikitext task does, rule for rule."""
    s = page.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    for spaced, joined in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")):
        s = s.replace(spaced, joined)
    for mark in ": ; . ! ? ,".split():
        s = s.replace(f" {mark} ", f"{mark} ")
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    s = s.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    s = s.replace(" " + chr(176) + " ", chr(176))
    s = s.replace(" \n", "\n").replace("\n ", "\n")
    s = s.replace(" N ", " 1 ")
    return s.replace(" 's", "'s")


def _wikitext(r: dict) -> RollingDoc:
    page = r["page"]
    if not isinstance(page, str):
        raise ValueError("page must be a string")
    # Words and bytes are counted on the page as stored, before detokenization (lm_eval's convention).
    return RollingDoc(wikitext_detokenize(page), len(re.split(r"\s+", page)), len(page.encode("utf-8")))


_READERS: dict[str, tuple[Callable[[dict], Doc], str]] = {
    "hellaswag": (_hellaswag, MULTIPLE_CHOICE),
    "arc": (_arc, MULTIPLE_CHOICE),
    "piqa": (_piqa, MULTIPLE_CHOICE),
    "lambada": (_lambada, LOGLIKELIHOOD),
    "wikitext": (_wikitext, ROLLING),
}


# ---- BIG-bench -------------------------------------------------------------------------------------------

# BIG-bench's JSON-task defaults (bigbench/api/json_task.py), used where a task.json does not set its own.
BIGBENCH_DEFAULTS = {
    "example_input_prefix": "\nQ: ",
    "example_output_prefix": "\nA: ",
    "choice_prefix": "\n  choice: ",
    "append_choices_to_input": True,
}
# The seed BIG-bench formats examples with (JsonTask's default, used for lm_eval's hails/bigbench data).
BIGBENCH_SEED = 42


def bigbench_examples(path: str | Path, data: dict) -> tuple[list[dict], list[str]]:
    """A task.json's multiple-choice examples as lm_eval's BIG-bench data holds them, plus notes.

    Each example becomes {"inputs", "targets", "multiple_choice_targets", "multiple_choice_scores"}:
    `inputs` = task_prefix + example_input_prefix + input [+ choice_prefix + each choice, in BIG-bench's
    fixed shuffled order] + example_output_prefix, as BIG-bench's `default_format_fn` writes it;
    duplicates are dropped (as BIG-bench's JsonTask does) and examples without target_scores skipped
    (as lm_eval's filter_multiple_choice does).
    """
    examples = data.get("examples")
    if not isinstance(examples, list):
        raise TaskFormatError(f"{path}: 'examples' must be a list of objects.")
    opt = {k: data.get(k, v) for k, v in BIGBENCH_DEFAULTS.items()}
    task_prefix = str(data.get("task_prefix", ""))
    seen: set[str] = set()
    out, notes, duplicates, without_choices = [], [], 0, 0
    for i, ex in enumerate(examples):
        where = f"{path}: examples[{i}]"
        if not isinstance(ex, dict) or "input" not in ex or not isinstance(ex["input"], str):
            raise TaskFormatError(f"{where}: a BIG-bench example needs a string 'input'; found {ex!r:.120}.")
        key = json.dumps(ex)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        scores = ex.get("target_scores")
        if not scores:
            without_choices += 1
            continue
        if not isinstance(scores, dict) or not all(isinstance(v, (int, float)) for v in scores.values()):
            raise TaskFormatError(
                f"{where}: target_scores must map each choice to a number; found {scores!r:.120}."
            )
        text = ex["input"]
        if opt["append_choices_to_input"]:
            # BIG-bench lists the choices in the prompt in one fixed order per number of choices: a fresh
            # RandomState(42) permutes the sorted choices of every example.
            ordered = sorted(scores)
            permutation = np.random.RandomState(BIGBENCH_SEED).permutation(len(ordered))
            text += opt["choice_prefix"] + opt["choice_prefix"].join(ordered[j] for j in permutation)
        target = ex.get("target")
        if target is None:
            best = max(scores.values())
            if best <= min(scores.values()) and len(scores) > 1:
                raise TaskFormatError(
                    f"{where}: no choice scores higher than the others (no correct answer)."
                )
            target = next(k for k, v in scores.items() if v == best)
        out.append(
            {
                "inputs": task_prefix + opt["example_input_prefix"] + text + opt["example_output_prefix"],
                "targets": target if isinstance(target, list) else [target],
                "multiple_choice_targets": list(scores),
                "multiple_choice_scores": list(scores.values()),
            }
        )
    if duplicates:
        notes.append(f"{duplicates} duplicate examples dropped")
    if without_choices:
        notes.append(f"{without_choices} examples without target_scores skipped")
    return out, notes


def _bigbench_doc(record: dict) -> ChoiceDoc:
    choices = tuple(record["multiple_choice_targets"])
    target = record["targets"][0] if record["targets"] else None
    if target in choices:  # lm_eval's template A: the index of the first target
        gold = choices.index(target)
    else:  # template B (tasks whose 'target' is an explanation): the first best-scored choice
        scores = record["multiple_choice_scores"]
        gold = scores.index(max(scores))
    return ChoiceDoc(record["inputs"], choices, gold)


def _bigbench_task(path: Path, data: dict, name: Optional[str]) -> Task:
    records, notes = bigbench_examples(path, data)
    if not records:
        raise TaskFormatError(
            f"{path}: this BIG-bench task has no multiple-choice examples (none with target_scores): only "
            "multiple-choice BIG-bench tasks can be evaluated here."
        )
    task_name = name or str(data.get("name") or _default_name(path))
    return Task(task_name, MULTIPLE_CHOICE, [_bigbench_doc(r) for r in records], "bigbench", str(path), notes)
