"""The `forge` command: one subcommand per entry point.

    forge train experiment=quickstart trainer.max_steps=50        # Hydra overrides, as everywhere
    forge train --config-dir my_configs experiment=mine            # your own config folder beside ours
    forge eval eval.checkpoint=runs/quickstart experiment=quickstart
    forge plan model=llama3_8b launch.nodes=2 launch.gpus_per_node=8
    forge bench train --compile

Each subcommand is a thin door to a module's `main` (also reachable as `python -m forge_lm.<module>`);
it gets the rest of the command line unchanged. Under torchrun, start the trainer module itself,
`torchrun --nproc-per-node 8 -m forge_lm.trainer.train <overrides>`, or this command,
`torchrun --nproc-per-node 8 --no-python forge train <overrides>`.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Command:
    target: str
    """`module:function`; the function reads its arguments from sys.argv (Hydra's entry points must)."""
    summary: str
    """One line for `forge --help`."""
    needs: Optional[tuple[str, str, str]] = None
    """(module to import, what it is, the extra that installs it) when the base install lacks it."""


LM_EVAL = ("lm_eval", "lm-evaluation-harness", "eval")
TRANSFORMERS = ("transformers", "transformers (the reference it is timed against)", "bench")
SERVE = ("fastapi", "FastAPI and uvicorn", "serve")

COMMANDS: dict[str, Command] = {
    "train": Command("forge_lm.trainer.train:main", "pre-train a model: Hydra overrides, --config-dir DIR"),
    "prepare": Command("forge_lm.data.prepare:main", "train the tokenizer and write packed token shards"),
    "eval": Command(
        "forge_lm.trainer.eval.__main__:main", "evaluate a run, checkpoint or Hugging Face folder"
    ),
    "export": Command(
        "forge_lm.tools.export_hf:main",
        "export a checkpoint to a Hugging Face folder, or GGUF (--format gguf)",
    ),
    "verify": Command(
        "forge_lm.tools.verify_checkpoint:main", "check checkpoints against their recorded checksums"
    ),
    "plan": Command("forge_lm.launch.plan:main", "will a layout fit, and how fast: mesh, memory, step time"),
    "slurm": Command("forge_lm.launch.slurm:main", "submit a run to SLURM, requeued on preemption"),
    "torchrun": Command(
        "forge_lm.launch.torchrun:main", "start torchrun with its flags filled in from launch.*"
    ),
    "memcheck": Command(
        "forge_lm.launch.memcheck:main", "check the planner's memory estimate against a real run"
    ),
    "plot": Command("forge_lm.tools.plot_runs:main", "PNG pictures of runs: losses, bpb, tasks, lr, norms, speed"),
    "compare": Command(
        "forge_lm.tools.compare_runs:main",
        "the first step where two runs' losses part, and their config diff",
    ),
    "arch-diff": Command("forge_lm.tools.arch_diff:main", "which knobs differ between two architectures"),
    "arch-show": Command("forge_lm.tools.arch_show:main", "an architecture's knobs, parameters and FLOPs"),
    "gpu-check": Command(
        "forge_lm.tools.gpu_check:main", "the one-command GPU check and its report (--cpu: tiny)"
    ),
    "serve": Command(
        "forge_lm.trainer.serve.__main__:main",
        "OpenAI-compatible server: continuous batching, streaming, /metrics, a chat page",
        SERVE,
    ),
    "lm-eval": Command(
        "forge_lm.trainer.eval.harness:main", "lm-evaluation-harness with the model 'forge'", LM_EVAL
    ),
    "lm-eval-tasks": Command(
        "forge_lm.trainer.eval.lm_eval_tasks:main", "write lm_eval task configs over local files", LM_EVAL
    ),
}

BENCHMARKS: dict[str, Command] = {
    "train": Command(
        "forge_lm.tools.bench_train:main", "training tokens/s and MFU vs transformers", TRANSFORMERS
    ),
    "data": Command("forge_lm.tools.bench_data:main", "data pipeline throughput vs the bare tokenizer"),
    "inference": Command(
        "forge_lm.tools.bench_inference:main",
        "prefill and decode tokens/s vs transformers.generate",
        TRANSFORMERS,
    ),
    "kernels": Command(
        "forge_lm.tools.bench_kernels:main",
        "Triton kernels vs their PyTorch references (CUDA)",
        ("triton", "Triton", "dev"),
    ),
    "serve": Command(
        "forge_lm.tools.bench_serve:main",
        "forge serve: concurrent streaming clients vs one at a time vs the Generator",
        ("openai", "the openai client", "serve"),
    ),
    "kills": Command(
        "forge_lm.tools.kill_campaign:main",
        "kill -9 campaign: ranks killed at random, every rerun bit-identical to an uninterrupted run",
    ),
    "posttrain": Command(
        "forge_lm.tools.bench_posttrain:main",
        "the walk-through quickstart -> chat_sft -> chat_dpo -> chat_distill, timed, held-out results",
        TRANSFORMERS,
    ),
}


def usage() -> str:
    from forge_lm import __version__

    width = max(map(len, [*COMMANDS, *(f"bench {b}" for b in BENCHMARKS)])) + 2
    lines = [f"usage: forge <command> [arguments]      (forge-lm {__version__})", "", "commands:"]
    lines += [f"  {name:<{width}}{cmd.summary}" for name, cmd in COMMANDS.items()]
    lines += [f"  {'bench ' + name:<{width}}{cmd.summary}" for name, cmd in BENCHMARKS.items()]
    lines += ["", "`forge <command> --help` shows a command's own options. Examples:"]
    lines += [__doc__.split("\n\n", 1)[1].rstrip()]
    return "\n".join(lines)


def missing_extra(command: str, cmd: Command) -> Optional[str]:
    """The one line to print when the command's optional dependency is not installed, else None."""
    if cmd.needs is None or importlib.util.find_spec(cmd.needs[0]) is not None:
        return None
    _, what, extra = cmd.needs
    return f"forge {command} needs {what}, which is not installed: pip install 'forge-lm[{extra}]'"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        from forge_lm import __version__

        print(f"forge-lm {__version__}")
        return 0
    name, rest = args[0], args[1:]
    table, known = COMMANDS, ", ".join(COMMANDS) + ", bench"
    if name == "bench":
        if not rest or rest[0] not in BENCHMARKS:
            given = f" {rest[0]!r}" if rest else ""
            print(f"forge bench{given}: choose one of {', '.join(BENCHMARKS)}", file=sys.stderr)
            return 0 if rest and rest[0] in ("-h", "--help") else 2
        table, known, name, rest = BENCHMARKS, ", ".join(BENCHMARKS), f"bench {rest[0]}", rest[1:]
    cmd = table.get(name.removeprefix("bench "))
    if cmd is None:
        print(f"forge: unknown command {name!r}; the commands are {known} (forge --help)", file=sys.stderr)
        return 2
    problem = missing_extra(name, cmd)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    module, function = cmd.target.split(":")
    entry = getattr(importlib.import_module(module), function)
    sys.argv = [f"forge {name}", *rest]  # argparse and Hydra read their arguments (and program name) here
    code = entry()
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
