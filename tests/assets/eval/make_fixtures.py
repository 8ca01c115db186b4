"""Writes the benchmark-format fixtures of this directory from real text in the repository.

    python -m tests.assets.eval.make_fixtures

HellaSwag, ARC, PIQA, LAMBADA and WikiText cannot be obtained offline, so the evaluation code is tested
on small files in their public schemas whose text is real: Shakespeare's lines (data/corpora) and the
docstrings of CPython's standard library (this Python's own). They are format fixtures, not the
benchmarks: the questions are built mechanically (which line follows, which function a docstring
describes) and their numbers mean nothing beyond checking that we score like lm_eval does.
The output is deterministic for a given Python version (the docstrings come from its stdlib); the
committed files were written with CPython 3.11.
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import re
from pathlib import Path

from forge_lm.data.config import SourceConfig
from forge_lm.data.sources import iter_documents

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
N = 20


def _verse_lines(text: str) -> list[str]:
    """The spoken lines of a scene (Markdown: speaker names in bold, stage directions in italics)."""
    lines = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", "_", "**", "[")) or len(line.split()) < 6:
            continue
        lines.append(line)
    return lines


def _scenes() -> list[tuple[str, str]]:
    source = SourceConfig(
        name="shakespeare", paths=[str(REPO / "data" / "corpora" / "shakespeare.jsonl.zst")]
    )
    return [(doc.id, doc.text) for doc in iter_documents(source)]


def _title(doc_id: str) -> str:
    return doc_id.split("/")[0].replace("-", " ").title()


def hellaswag(scenes: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    """Which ending continues the line? ctx_a is a line, ctx_b the next line's first words (lower-cased, as in
    HellaSwag), the endings that line's rest and three other lines' rests."""
    pool = [(doc_id, line) for doc_id, text in scenes for line in _verse_lines(text)]
    out = []
    for i in range(N):
        doc_id, text = rng.choice(scenes)
        lines = _verse_lines(text)
        if len(lines) < 2:
            continue
        k = rng.randrange(len(lines) - 1)
        nxt = lines[k + 1].split()
        distractors = [line.split()[3:] for _, line in rng.sample(pool, 3)]
        endings = [" ".join(nxt[3:])] + [" ".join(d) for d in distractors]
        order = list(range(4))
        rng.shuffle(order)
        ctx_b = " ".join(nxt[:3])
        ctx_b = ctx_b[0].lower() + ctx_b[1:]
        out.append(
            {
                "ind": i,
                "activity_label": _title(doc_id),
                "ctx_a": lines[k],
                "ctx_b": ctx_b,
                "ctx": lines[k] + " " + ctx_b,
                "endings": [endings[j] for j in order],
                "source_id": doc_id,
                "split": "val",
                "split_type": "indomain",
                "label": str(order.index(0)),  # a string, as in the published validation set
            }
        )
    return out


STDLIB_MODULES = (
    "textwrap",
    "string",
    "json",
    "shutil",
    "os.path",
    "fnmatch",
    "base64",
    "statistics",
    "heapq",
    "bisect",
)


def _documented_functions() -> list[tuple[str, str, str]]:
    """(module, function, first docstring sentence) of public stdlib functions with a one-line summary."""
    out = []
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        for fname, fn in sorted(vars(module).items()):
            if fname.startswith("_") or not inspect.isfunction(fn) or fn.__module__ != module.__name__:
                continue
            doc = inspect.getdoc(fn) or ""
            summary = doc.split("\n\n")[0].replace("\n", " ").strip()
            if 20 <= len(summary) <= 160 and summary.endswith("."):
                out.append((name, fname, summary))
    return out


def arc(functions: list[tuple[str, str, str]], rng: random.Random) -> list[dict]:
    out = []
    for i, (module, fname, summary) in enumerate(rng.sample(functions, N)):
        same = [f"{m}.{f}" for m, f, _ in functions if m == module and f != fname]
        if len(same) < 3:
            same = [f"{m}.{f}" for m, f, _ in functions if f != fname]
        names = [f"{module}.{fname}", *rng.sample(same, 3)]
        rng.shuffle(names)
        labels = ["1", "2", "3", "4"] if i % 5 == 4 else ["A", "B", "C", "D"]  # ARC has both kinds of labels
        out.append(
            {
                "id": f"stdlib-{module}-{fname}",
                "question": f"Which function of Python's standard library is documented as follows: {summary}",
                "choices": {"text": names, "label": labels},
                "answerKey": labels[names.index(f"{module}.{fname}")],
            }
        )
    return out


def piqa(functions: list[tuple[str, str, str]], rng: random.Random) -> list[dict]:
    out = []
    for module, fname, summary in rng.sample(functions, N):
        other = rng.choice([f"{m}.{f}" for m, f, _ in functions if f != fname])
        right, wrong = f"Call {module}.{fname}().", f"Call {other}()."
        label = rng.randrange(2)
        sols = (right, wrong) if label == 0 else (wrong, right)
        out.append({"goal": summary.rstrip("."), "sol1": sols[0], "sol2": sols[1], "label": label})
    return out


def lambada(scenes: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    """Passages of three to five lines whose last word is the target (final punctuation removed)."""
    out = []
    while len(out) < N:
        _, text = rng.choice(scenes)
        lines = _verse_lines(text)
        if len(lines) < 6:
            continue
        k = rng.randrange(len(lines) - 5)
        passage = " ".join(lines[k : k + rng.randint(3, 5)])
        passage = re.sub(r"[^A-Za-z']+$", "", passage)
        if re.search(r" [A-Za-z']{3,}$", passage):
            out.append({"text": passage})
    return out


def _wikitext_tokenize(text: str) -> str:
    """Space punctuation and hyphens apart the way WikiText stores its pages (' , ', ' @-@ ')."""
    text = re.sub(r"(?<=\w)-(?=\w)", " @-@ ", text)
    text = re.sub(r"\s*([,;:!?.])(?=\s|$)", r" \1", text)
    return text


def wikitext(scenes: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    out = []
    for doc_id, text in rng.sample(scenes, 5):
        body = "\n".join(_verse_lines(text)[:30])
        page = f" = {_title(doc_id)} = \n \n " + _wikitext_tokenize(body).replace("\n", " \n ") + " \n"
        out.append({"page": page})
    return out


def main() -> None:
    rng = random.Random(2026)
    scenes = _scenes()
    functions = _documented_functions()
    files = {
        "hellaswag_format.jsonl": hellaswag(scenes, rng),
        "arc_format.jsonl": arc(functions, rng),
        "piqa_format.jsonl": piqa(functions, rng),
        "lambada_format.jsonl": lambada(scenes, rng),
        "wikitext_format.jsonl": wikitext(scenes, rng),
    }
    for name, records in files.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        (HERE / name).write_text(text, encoding="utf-8")
        print(f"{name}: {len(records)} records, {len(text.encode()):,} bytes")


if __name__ == "__main__":
    main()
