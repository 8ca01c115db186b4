"""The post-training walk-through, run and measured (a script, not a test):

    forge bench posttrain [--output-root runs] [--stages quickstart,chat_sft,chat_dpo,chat_distill]
                          [--steps chat_dpo=60 ...] [--keep]

Runs the documented stages one after the other as `forge train experiment=<stage> output_root=<root>` would
(each in its own process, the shipped experiment unchanged unless --steps shortens it), times each, and
prints one markdown table of what each stage reached on held-out data:

- quickstart: validation loss at step 0 and at the end;
- chat_sft: validation loss on held-out assistant tokens, before and after;
- chat_dpo: held-out reward accuracy, margin and loss before (step 0: policy = reference) and after;
- chat_distill: held-out KL(teacher || student) and the student's loss on the assistant tokens against the
  teacher's own.

Then it checks that the exported chat models (chat_dpo, chat_distill) generate in `transformers` (the chat
template applied by `apply_chat_template`) the same greedy tokens as our Generator.

A stage whose run directory already holds a finished run is not run again with --keep (its numbers are still
read), so the table can be rebuilt after a long walk-through.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

STAGES = ("quickstart", "chat_sft", "chat_dpo", "chat_distill")
PROMPT = [{"role": "user", "content": "Hey, how are you doing today?"}]


def run_stage(stage: str, root: Path, overrides: list[str]) -> float:
    """Train one stage in its own process; returns the wall seconds."""
    cmd = [sys.executable, "-m", "forge_lm.trainer.train", f"experiment={stage}", f"output_root={root}",
           *overrides]  # fmt: skip
    print("$", " ".join(cmd[2:]).replace("forge_lm.trainer.train", "forge train"), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "WANDB_MODE": "disabled"})
    return time.perf_counter() - start


def finished(run_dir: Path) -> bool:
    """A run draws its overview at its very end."""
    return (run_dir / "plots" / "overview.png").is_file()


def first_last(records: list[dict[str, Any]], key: str) -> tuple[Optional[float], Optional[float], int]:
    values = [(r["step"], r[key]) for r in records if key in r]
    if not values:
        return None, None, 0
    return values[0][1], values[-1][1], values[-1][0]


def describe(stage: str, run_dir: Path) -> str:
    from forge_lm.trainer.metrics import read_metrics

    if stage in ("quickstart", "chat_sft"):
        a, b, step = first_last(read_metrics(run_dir, "val"), "loss")
        return f"val loss {a:.4f} (step 0) -> {b:.4f} (step {step})"
    held_out = read_metrics(run_dir, "objective_val")
    if stage == "chat_dpo":
        acc = first_last(held_out, "rewards/accuracies")
        margin = first_last(held_out, "rewards/margins")
        loss = first_last(held_out, "loss")
        return (
            f"held-out reward accuracy {acc[0]:.3f} -> {acc[1]:.3f} (step {acc[2]}), margin {margin[0]:+.4f} -> "
            f"{margin[1]:+.4f}, loss {loss[0]:.4f} -> {loss[1]:.4f}"
        )
    kl = first_last(held_out, "distill/kl")
    student = first_last(held_out, "distill/ce")
    teacher = first_last(held_out, "distill/teacher_ce")
    return (
        f"held-out KL(teacher ‖ student) {kl[0]:.4f} -> {kl[1]:.4f} (step {kl[2]}); student loss "
        f"{student[0]:.4f} -> {student[1]:.4f} against the teacher's {teacher[1]:.4f}"
    )


def greedy_replies(hf_dir: Path, n: int = 24) -> tuple[list[int], list[int]]:
    """The greedy reply to PROMPT of the exported folder in transformers (its chat template applied by
    `apply_chat_template`) and of our Generator, each up to its first end-of-turn token: (ours, theirs)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forge_lm.trainer.inference import Generator, SamplingParams, load_model

    tok = AutoTokenizer.from_pretrained(hf_dir)
    prompt = list(tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=True)
                  ["input_ids"])  # fmt: skip
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    # transformers stops at the end-of-turn token the export names (generation_config.json); ours is cut
    # at the same token. (min_new_tokens would instead forbid that token and pick the runner-up.)
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[0, len(prompt) :].tolist()
    stop = hf.generation_config.eos_token_id
    stop = set(stop if isinstance(stop, list) else [stop])
    model, _ = load_model(hf_dir)
    [out] = Generator(model, compile=False).generate([prompt], n, SamplingParams(temperature=0.0))
    ours = list(out.token_ids)
    ends = [i for i, t in enumerate(ours) if t in stop]
    return (ours[: ends[0] + 1] if ends else ours), want


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output-root", default="runs", help="where the stages' run directories go")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated, in order")
    ap.add_argument("--steps", nargs="*", default=[], metavar="STAGE=N",
                    help="shorten a stage: trainer.max_steps=N (evaluation at its end)")  # fmt: skip
    ap.add_argument(
        "--keep", action="store_true", help="do not rerun a stage whose run directory is finished"
    )
    args = ap.parse_args(argv)
    root = Path(args.output_root).resolve()
    stages = [s for s in args.stages.split(",") if s]
    steps = dict(item.split("=", 1) for item in args.steps)
    for s in [*stages, *steps]:
        if s not in STAGES:
            ap.error(f"unknown stage {s!r}: the stages are {', '.join(STAGES)}")
    load = os.getloadavg()[0]
    rows = []
    for stage in stages:
        overrides = (
            [f"trainer.max_steps={steps[stage]}", f"eval.every={steps[stage]}"] if stage in steps else []
        )
        if args.keep and finished(root / stage):
            seconds = None
        else:
            seconds = run_stage(stage, root, overrides)
        rows.append((stage, steps.get(stage, "shipped"), seconds, describe(stage, root / stage)))

    print(f"\n{platform.node()} ({os.cpu_count()} cores), torch {__import__('torch').__version__}, "
          f"{datetime.date.today()}, load average at start {load:.1f}\n")  # fmt: skip
    print("| stage | steps | wall s | held out |")
    print("|---|---|---|---|")
    for stage, n, seconds, text in rows:
        print(f"| {stage} | {n} | {'' if seconds is None else f'{seconds:.0f}'} | {text} |")
    for stage in ("chat_dpo", "chat_distill"):
        if stage in stages and (root / stage / "hf").is_dir():
            ours, theirs = greedy_replies(root / stage / "hf")
            same = ours == theirs
            print(f"\n{stage}/hf in transformers (apply_chat_template + generate) = our Generator, greedy reply up to "
                  f"the end of its turn: {'yes' if same else 'NO'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
