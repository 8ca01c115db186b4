"""Evaluation tasks: the documents of a benchmark, the requests they make of a model, and their metrics.

Three kinds, the ones lm-evaluation-harness (lm_eval) uses for the classic pre-training benchmarks:

    multiple_choice  one (context, " " + choice) log-likelihood request per choice; acc and acc_norm
                     (HellaSwag, ARC, PIQA, BIG-bench multiple choice)
    loglikelihood    one (context, target) request; perplexity and acc = "the target is the greedy
                     continuation" (LAMBADA)
    rolling          the log-likelihood of a whole text, over as many context windows as it needs;
                     word perplexity, byte perplexity and bits per byte (WikiText)

The metrics follow lm_eval's definitions exactly (see docs/eval.md), so a task read here from a file
gives the numbers lm_eval gives for its built-in task on the same file. Reading files is
`forge_lm.trainer.eval.formats`; turning requests into numbers is `forge_lm.trainer.eval.scoring`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Union

MULTIPLE_CHOICE = "multiple_choice"
LOGLIKELIHOOD = "loglikelihood"
ROLLING = "rolling"
KINDS = (MULTIPLE_CHOICE, LOGLIKELIHOOD, ROLLING)

# lm_eval's default `target_delimiter`: what goes between the context and each choice.
TARGET_DELIMITER = " "


@dataclass(frozen=True)
class ChoiceDoc:
    """A multiple-choice question: the prompt, the answer texts, and the index of the right one."""

    context: str
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class TargetDoc:
    """A context and the exact continuation expected after it (LAMBADA: the passage's last word)."""

    context: str
    target: str


@dataclass(frozen=True)
class RollingDoc:
    """A text scored as a whole. `words` and `bytes` normalise its log-likelihood; WikiText counts them on
    the original page, before the detokenized `text` the model reads."""

    text: str
    words: int
    bytes: int


Doc = Union[ChoiceDoc, TargetDoc, RollingDoc]


@dataclass(frozen=True)
class LoglikelihoodRequest:
    """log p(continuation | context), and whether greedy decoding would produce the continuation."""

    context: str
    continuation: str


@dataclass(frozen=True)
class RollingRequest:
    """log p(text), the text scored from its first token on (conditioned on BOS, or EOS)."""

    text: str


Request = Union[LoglikelihoodRequest, RollingRequest]


@dataclass
class Task:
    """A benchmark read from a file: its documents in file order and the kind of scoring they need."""

    name: str
    """Metric prefix, e.g. 'arc_easy' gives 'arc_easy/acc'."""
    kind: str
    """One of KINDS."""
    docs: list[Doc]
    format: str = ""
    """The file format it was read from ('hellaswag', 'arc', 'piqa', 'lambada', 'wikitext', 'bigbench')."""
    path: str = ""
    """The file it was read from."""
    notes: list[str] = field(default_factory=list)
    """What the reader did besides parsing (duplicates dropped, examples without choices skipped ...)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: kind={self.kind!r} is not one of {KINDS}.")

    def limited(self, limit: int | None) -> Task:
        """The first `limit` documents (all when None), as `lm_eval --limit` takes them."""
        return self if limit is None else replace(self, docs=self.docs[:limit])

    @property
    def needs_greedy(self) -> bool:
        """Whether the metrics need to know if the continuation is the greedy one (LAMBADA's acc)."""
        return self.kind == LOGLIKELIHOOD

    def requests(self) -> list[Request]:
        """Every request of every document, in document order (a multiple-choice doc: one per choice)."""
        out: list[Request] = []
        for doc in self.docs:
            if isinstance(doc, ChoiceDoc):
                out.extend(LoglikelihoodRequest(doc.context, TARGET_DELIMITER + c) for c in doc.choices)
            elif isinstance(doc, TargetDoc):
                out.append(LoglikelihoodRequest(doc.context, doc.target))
            else:
                out.append(RollingRequest(doc.text))
        return out

    def metrics(self, results: list) -> dict[str, float]:
        """The task's metrics from the results of `requests()` (same order): (loglikelihood, is_greedy)
        pairs for log-likelihood requests, a float for rolling ones."""
        if len(results) != sum(len(d.choices) if isinstance(d, ChoiceDoc) else 1 for d in self.docs):
            raise ValueError(
                f"task {self.name!r}: {len(results)} results for {len(self.requests())} requests."
            )
        if self.kind == MULTIPLE_CHOICE:
            return _choice_metrics(self.docs, results)  # type: ignore[arg-type]
        if self.kind == LOGLIKELIHOOD:
            return _target_metrics(results)
        return _rolling_metrics(self.docs, results)  # type: ignore[arg-type]


def _argmax(values: list[float]) -> int:
    """Index of the largest value, the first one on ties (numpy's argmax, which lm_eval uses)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def _choice_metrics(docs: list[ChoiceDoc], results: list[tuple[float, bool]]) -> dict[str, float]:
    acc = acc_norm = 0.0
    at = 0
    for doc in docs:
        lls = [ll for ll, _ in results[at : at + len(doc.choices)]]
        at += len(doc.choices)
        acc += _argmax(lls) == doc.gold
        # Normalised by the length of the choice in characters (without the delimiter), as lm_eval does.
        acc_norm += _argmax([ll / len(c) if c else -math.inf for ll, c in zip(lls, doc.choices)]) == doc.gold
    n = len(docs)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "n": float(n)} if n else {"n": 0.0}


def _target_metrics(results: list[tuple[float, bool]]) -> dict[str, float]:
    n = len(results)
    if n == 0:
        return {"n": 0.0}
    mean_ll = sum(ll for ll, _ in results) / n
    return {
        "perplexity": math.exp(-mean_ll),
        "acc": sum(1.0 for _, greedy in results if greedy) / n,
        "n": float(n),
    }


def _rolling_metrics(docs: list[RollingDoc], results: list[float]) -> dict[str, float]:
    if not docs:
        return {"n": 0.0}
    total = sum(results)
    words = sum(d.words for d in docs)
    n_bytes = sum(d.bytes for d in docs)
    return {
        "word_perplexity": math.exp(-total / words),
        "byte_perplexity": math.exp(-total / n_bytes),
        "bits_per_byte": -total / n_bytes / math.log(2),
        "n": float(len(docs)),
    }
