"""One evaluation of a model: validation loss / perplexity / bits per byte (overall and per source),
benchmark tasks, and samples for fixed prompts. The training loop runs it every `eval.every` steps and
at the end; `forge eval` runs it once on a checkpoint or a Hugging Face folder.

Everything configurable is in `EvalConfig` (trainer/config.py, configs/eval/default.yaml).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from forge_lm.data.tokenizer import Tokenizer
from forge_lm.trainer.config import EvalConfig
from forge_lm.trainer.eval.formats import TaskFormatError, read_task
from forge_lm.trainer.eval.generation import sample_prompts
from forge_lm.trainer.eval.scorers import EvalModel
from forge_lm.trainer.eval.scoring import TextEncoder, run_requests
from forge_lm.trainer.eval.tasks import Task
from forge_lm.trainer.eval.validation import LossFn, ValSet, val_metrics

logger = logging.getLogger(__name__)

# Task files shipped inside the package (forge_lm/data/evalsets, from the repository's data/evalsets).
# A relative task path that does not exist from the working directory is looked up there, so configs can
# name them (bigbench/known_unknowns/task.json) wherever a run starts and however forge-lm is installed.
# The longer form data/evalsets/... is looked up from the folder that holds the data package.
SHIPPED_EVALSETS = Path(__file__).resolve().parents[2] / "data" / "evalsets"


@dataclass
class EvalResult:
    """What one evaluation measured."""

    step: int
    val: dict[str, float] = field(default_factory=dict)
    """loss, perplexity, bpb, tokens (whole validation split), and '<source>/loss' ... per source."""
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)
    """task name -> its metrics (acc, acc_norm / perplexity, acc / word_perplexity, ..., and n)."""
    samples: dict[str, str] = field(default_factory=dict)
    """prompt -> prompt + sampled continuation."""
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    """What was not evaluated, and why."""

    def records(self) -> list[tuple[str, dict[str, Any]]]:
        """(kind, record) pairs for the metrics file: 'val', 'tasks' (flat '<task>/<metric>') and 'generations'."""
        out: list[tuple[str, dict[str, Any]]] = []
        if self.val:
            out.append(("val", dict(self.val)))
        if self.tasks:
            flat = {f"{t}/{m}": v for t, metrics in self.tasks.items() for m, v in metrics.items()}
            out.append(("tasks", {**flat, "seconds": self.seconds.get("tasks", 0.0)}))
        if self.samples:
            out.append(
                ("generations", {"samples": [{"prompt": p, "text": t} for p, t in self.samples.items()]})
            )
        return out

    def summary(self) -> list[str]:
        """Console lines."""
        lines = []
        v = self.val
        if v:
            line = f"step {self.step} | val loss {v['loss']:.4f} | perplexity {v['perplexity']:.2f}"
            if "bpb" in v:
                line += f" | bpb {v['bpb']:.4f}"
            sources = sorted({k.split("/")[0] for k in v if "/" in k})
            for s in sources:
                line += f" | {s}: loss {v[f'{s}/loss']:.4f}" + (
                    f" bpb {v[f'{s}/bpb']:.4f}" if f"{s}/bpb" in v else ""
                )
            lines.append(line)
        for name, m in self.tasks.items():
            shown = ", ".join(f"{k} {x:.4f}" for k, x in m.items() if k != "n")
            lines.append(f"step {self.step} | {name}: {shown} ({int(m.get('n', 0))} examples)")
        for prompt, text in self.samples.items():
            first = text[len(prompt) :].strip().splitlines()
            lines.append(f"step {self.step} | sample {prompt!r} -> {(first[0] if first else '')[:100]!r}")
        lines.extend(f"step {self.step} | {note}" for note in self.notes)
        return lines


def parse_task_spec(spec: str) -> tuple[Optional[str], str]:
    """'path' or 'name:path' -> (name or None, path)."""
    m = re.fullmatch(r"([A-Za-z_][\w.-]*):(?!//)(.+)", spec)
    return (m.group(1), m.group(2)) if m else (None, spec)


def resolve_task_path(path: str) -> Path:
    """As given (absolute or from the working directory), else among the task files shipped with forge-lm."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    for shipped in (SHIPPED_EVALSETS / p, SHIPPED_EVALSETS.parent.parent / p):
        if shipped.exists():
            return shipped
    raise TaskFormatError(
        f"eval.tasks: {path}: no such file (looked in {Path.cwd()} and in the shipped {SHIPPED_EVALSETS}). "
        "Give the path of a task file (see docs/eval.md for the formats)."
    )


def load_tasks(specs: list[str], limit: Optional[int] = None) -> list[Task]:
    """The tasks of `eval.tasks`, each cut to its first `limit` documents; errors name the file."""
    tasks: list[Task] = []
    for spec in specs:
        name, path = parse_task_spec(spec)
        task = read_task(resolve_task_path(path), name=name).limited(limit)
        clash = next((t for t in tasks if t.name == task.name), None)
        if clash is not None:
            raise TaskFormatError(
                f"eval.tasks: {clash.path} and {task.path} are both named {task.name!r}: name one of them "
                f"with 'name:path', e.g. '{task.name}_2:{path}'."
            )
        for note in task.notes:
            logger.info("task %s (%s): %s", task.name, task.path, note)
        tasks.append(task)
    return tasks


class Evaluator:
    """Holds what every evaluation reuses (validation sets, parsed tasks, prompts) and runs evaluations."""

    def __init__(
        self,
        cfg: EvalConfig,
        tokenizer: Tokenizer,
        max_length: int,
        val_sets: Optional[list[ValSet]] = None,
        tasks: Optional[list[Task]] = None,
        seed: int = 0,
        max_context: Optional[int] = None,
    ) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.encoder = TextEncoder(tokenizer)
        self.max_length = cfg.max_length or max_length
        self.val_sets = val_sets or []
        self.tasks = load_tasks(cfg.tasks, cfg.task_limit) if tasks is None else tasks
        self.seed = seed
        self.max_context = max_context
        """Longest context the sampler feeds (the training sequence length in training)."""

    def run(self, step: int, loss_fn: Optional[LossFn], model: Optional[EvalModel]) -> EvalResult:
        """Evaluate. Without `loss_fn` no validation loss; without `model` no tasks and no samples.

        With a sharded model every rank must call this with the same arguments (they make the same
        forward calls); all ranks get the same result.
        """
        result = EvalResult(step)
        if loss_fn is not None and self.val_sets:
            t0 = time.perf_counter()
            result.val = self.validation(loss_fn)
            result.seconds["val"] = time.perf_counter() - t0
        if model is None:
            if self.tasks or self.cfg.prompts:
                result.notes.append(
                    "tasks and samples wait for the end of training (this layout runs them there)"
                )
            return result
        if self.tasks:
            t0 = time.perf_counter()
            result.tasks = self.run_tasks(model)
            result.seconds["tasks"] = time.perf_counter() - t0
        if self.cfg.prompts:
            t0 = time.perf_counter()
            result.samples = sample_prompts(
                model,
                self.tokenizer,
                self.cfg.prompts,
                self.cfg.max_new_tokens,
                self.cfg.temperature,
                self.cfg.top_k,
                self.seed,
                self.max_context,
            )
            result.seconds["samples"] = time.perf_counter() - t0
        return result

    def validation(self, loss_fn: LossFn) -> dict[str, float]:
        """Loss, perplexity and bits per byte of every validation set ('<source>/<metric>' per source)."""
        out: dict[str, float] = {}
        for vs in self.val_sets:
            metrics = val_metrics(loss_fn(vs.batches)["loss"], vs.tokens, vs.bytes)
            if vs.name:
                out.update({f"{vs.name}/{k}": v for k, v in metrics.items()})
            else:
                out.update(metrics)
                out["tokens"] = float(vs.tokens)
        return out

    def run_tasks(self, model: EvalModel) -> dict[str, dict[str, float]]:
        scorer = model.scorer()
        out = {}
        with model.evaluating():
            for task in self.tasks:
                results = run_requests(
                    task.requests(),
                    self.encoder,
                    scorer,
                    self.max_length,
                    self.cfg.task_batch_size,
                    model.device,
                    greedy=task.needs_greedy,
                )
                out[task.name] = task.metrics(results)
        return out
