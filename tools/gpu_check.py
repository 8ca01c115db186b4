"""The one-command GPU check: everything only a GPU can settle, in one script and one markdown report.

    python -m forge_lm.tools.gpu_check                 # on a GPU machine, from a checkout (about 6-8 min on one H100)
    python -m forge_lm.tools.gpu_check --cpu           # the same script end to end, tiny sizes, on a CPU (CI)
    forge gpu-check --out report.md

Each check runs as its own process with a time limit, so one failure does not hide the others:

1. the `gpu`-marked tests: Triton kernels in bf16 against their references, FlexAttention block masks
   against the SDPA masks (causal, documents, sliding window), CUDA-graph decode equal to eager;
2. the real trainer under torchrun (NCCL on every visible GPU, one included): FSDP2, bf16, compiled blocks,
   30 steps, and the loss must fall;
3. MFU of the real `Engine.train_step` for a ~1B Llama at sequence 4096, bf16, compiled (`forge bench train`);
4. decode tokens/s and HBM-bandwidth fraction at batch 1 with CUDA graphs (`forge bench inference`);
5. the planner's peak-memory estimate against `torch.cuda.max_memory_allocated` for three layouts
   (`forge memcheck`; on a CPU only the parameter and optimizer bytes are compared).

The report (default `gpu_check.md`) has a summary table and each check's command and output tail; put its
numbers into docs/BENCHMARKS.md with the device and the date. Exit status: 0 when every check passed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

CHECKOUT = Path(__file__).resolve().parents[1]


@dataclass
class Check:
    name: str
    command: list[str]
    timeout_s: int
    summarize: object  # (output: str, workdir: Path) -> (passed: bool, numbers: str)
    env: dict[str, str] = field(default_factory=dict)
    passed: bool = False
    numbers: str = ""
    seconds: float = 0.0
    output: str = ""


def _tests(output: str, _: Path) -> tuple[bool, str]:
    last = next(
        (line for line in reversed(output.splitlines()) if re.search(r"\d+ (passed|skipped|failed)", line)),
        "",
    )
    return ("failed" not in last and "error" not in last and bool(last)), last.strip("= ")


def _training(output: str, workdir: Path) -> tuple[bool, str]:
    path = workdir / "runs" / "gpu_check" / "metrics.jsonl"
    if not path.is_file():
        return False, "no metrics written"
    losses = [r["loss"] for r in map(json.loads, path.read_text().splitlines()) if r.get("kind") == "train"]
    if len(losses) < 10:
        return False, f"only {len(losses)} logged steps"
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    return (
        last < first - 0.3,
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps (mean of 5: {first:.3f} -> {last:.3f})",
    )


def _bench_train(output: str, _: Path) -> tuple[bool, str]:
    lines = [
        " ".join(line.split())
        for line in output.splitlines()
        if "tokens/s" in line or line.startswith("model:")
    ]
    return any("framework compiled" in line for line in lines), "; ".join(lines)


def _bench_inference(output: str, _: Path) -> tuple[bool, str]:
    """The batch-1 row of bench_inference's table, by column name, and its HBM line on a GPU."""
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in output.splitlines()
        if line.startswith("|")
    ]
    header = next((r for r in rows if r and r[0] == "batch"), None)
    row = next((r for r in rows if r and r[0] == "1"), None)
    if header is None or row is None:
        return False, "no batch-1 measurement"
    d = header.index("decode tok/s ours")  # then transformers' and the ratio
    same = row[header.index("same tokens")]
    numbers = f"decode {row[d]} tok/s vs transformers {row[d + 1]} ({row[d + 2]}), same tokens: {same}"
    hbm = [" ".join(line.split()) for line in output.splitlines() if "HBM" in line]
    return same == "yes", "; ".join([numbers, *hbm])


def _memcheck(output: str, _: Path) -> tuple[bool, str]:
    records = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    if not records:
        return False, "no measurement"
    parts = []
    for r in records:
        if "measured_peak" in r:
            parts.append(
                f"{r['layout']}: planned {r['planned_peak'] / 2**30:.2f} GiB vs measured {r['measured_peak'] / 2**30:.2f} GiB ({r['error']:+.1%})"
            )
        else:
            same = (
                r["planned_params"] == r["measured_params"]
                and r["planned_optimizer"] == r["measured_optimizer"]
            )
            parts.append(f"{r['layout']}: parameter and optimizer bytes {'as planned' if same else 'DIFFER'}")
    return "DIFFER" not in " ".join(parts), "; ".join(parts)


def checks(cpu: bool, python: str) -> list[Check]:
    n_gpus = 2 if cpu else max(1, min(torch.cuda.device_count(), 8))
    device = ["trainer.device=cpu"] if cpu else ["trainer.device=cuda"]
    train = [
        "data=tiny", "model=llama3_tiny", "name=gpu_check", "output_root=runs",
        "trainer.max_steps=30", "trainer.log_every=1", "trainer.lr=3e-3", "trainer.warmup_steps=3",
        "trainer.export_hf=false", "trainer.wandb.mode=disabled", "eval.every=0", "eval.max_batches=1",
        "eval.tasks=[]", "eval.prompts=[]", "parallel.compile=true", f"parallel.dp_shard={n_gpus}",
        f"trainer.micro_batch_size={4 if cpu else 8}", f"trainer.global_batch_tokens={n_gpus * (4 if cpu else 8) * 256}",
        f"trainer.precision={'fp32' if cpu else 'bf16'}", *device,
    ]  # fmt: skip
    if cpu:
        train += ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "data.seq_len=64",
                  "model.max_seq_len=64", f"trainer.global_batch_tokens={n_gpus * 4 * 64}"]  # fmt: skip
    bench = ["--preset", "tiny", "--seq", "128", "--batch", "2", "--steps", "2", "--warmup", "1", "--no-hf"] if cpu else [
        "--preset", "1b", "--seq", "4096", "--batch", "1", "--steps", "5", "--warmup", "2", "--no-hf"]  # fmt: skip
    infer = ["--batch", "1", "--prompt", "32", "--new", "16", "--repeats", "1"] if cpu else [
        "--preset", "1b", "--device", "cuda", "--dtype", "bf16", "--batch", "1", "--prompt", "512", "--new", "256"]  # fmt: skip
    mem_model = (["model=llama3_tiny", "model.d_model=64", "model.n_layers=2", "data.seq_len=64", "model.max_seq_len=64",
                  "model.vocab_size=1024", "trainer.micro_batch_size=2", "trainer.device=cpu"] if cpu else
                 ["model=llama3_1b", "data.seq_len=2048", "model.max_seq_len=2048", "trainer.micro_batch_size=2",
                  "trainer.precision=bf16", "launch.gpu=h100"])  # fmt: skip
    tokens = 2 * (64 if cpu else 2048)
    layouts = [("no checkpointing", ["parallel.activation_checkpointing=none"]),
               ("full checkpointing", ["parallel.activation_checkpointing=full"]),
               ("selective checkpointing", ["parallel.activation_checkpointing=selective"])]  # fmt: skip
    forge = [python, "-m", "forge_lm"]
    out = [
        Check(
            "gpu tests",
            [
                python,
                "-m",
                "pytest",
                "-q",
                "-m",
                "gpu",
                "-p",
                "no:cacheprovider",
                str(CHECKOUT / "tests" / "unit" / "test_gpu_paths.py"),
                str(CHECKOUT / "tests" / "unit" / "test_kernels.py"),
            ],
            240,
            _tests,
        ),  # fmt: skip
        Check(
            f"torchrun x{n_gpus}: FSDP2 + compile, 30 steps",
            [
                python,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={n_gpus}",
                "-m",
                "forge_lm.trainer.train",
                *train,
            ],
            300,
            _training,
            {"OMP_NUM_THREADS": "1"},
        ),  # fmt: skip
        Check("train step MFU (Engine.train_step)", [*forge, "bench", "train", *bench], 300, _bench_train),
        Check("decode at batch 1", [*forge, "bench", "inference", *infer], 240, _bench_inference),
    ]
    for label, layout in layouts:
        cmd = [*forge, "memcheck", *mem_model, f"trainer.global_batch_tokens={tokens}", *layout]
        out.append(Check(f"planner vs measured memory: {label}", cmd, 180, _labelled(_memcheck, label)))
    return out


def _labelled(summarize, label):
    def wrapped(output: str, workdir: Path) -> tuple[bool, str]:
        records = [line for line in output.splitlines() if line.startswith("{")]
        tagged = "\n".join(json.dumps({**json.loads(r), "layout": label}) for r in records)
        return summarize(tagged, workdir)

    return wrapped


def run_check(check: Check, workdir: Path) -> None:
    env = {**os.environ, "WANDB_MODE": "disabled", **check.env}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CHECKOUT), env.get("PYTHONPATH")]))
    started = time.perf_counter()
    try:
        proc = subprocess.run(check.command, cwd=workdir, env=env, capture_output=True, text=True,
                              timeout=check.timeout_s)  # fmt: skip
        check.output = proc.stdout + proc.stderr
        check.passed, check.numbers = check.summarize(check.output, workdir)
        check.passed = check.passed and proc.returncode == 0
        if proc.returncode != 0:
            check.numbers = f"exit {proc.returncode}; {check.numbers}"
    except subprocess.TimeoutExpired as e:
        check.output = (
            (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        )
        check.numbers = f"timed out after {check.timeout_s} s"
    check.seconds = time.perf_counter() - started


def report(results: list[Check], cpu: bool) -> str:
    device = "CPU (--cpu: tiny sizes)" if cpu else torch.cuda.get_device_name(0)
    lines = [
        "# GPU check",
        "",
        f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"- device: {device} x{torch.cuda.device_count() if not cpu else 0}; host {platform.node()}",
        f"- torch {torch.__version__}, python {platform.python_version()}",
        f"- command: `python -m forge_lm.tools.gpu_check{' --cpu' if cpu else ''}`",
        "",
        "| check | result | numbers | seconds |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {c.name} | {'pass' if c.passed else 'FAIL'} | {c.numbers} | {c.seconds:.0f} |" for c in results
    ]
    for c in results:
        tail = "\n".join(c.output.strip().splitlines()[-25:])
        lines += ["", f"## {c.name}", "", "```", " ".join(c.command), "```", "", "```", tail, "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU: the script end to end, no GPU")
    p.add_argument("--out", default="gpu_check.md", help="the markdown report (default gpu_check.md)")
    p.add_argument("--only", nargs="*", help="run the checks whose names contain these words")
    args = p.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device is visible; run it on a GPU machine, or with --cpu here",
            file=sys.stderr,
        )
        return 2
    results = [
        c for c in checks(args.cpu, sys.executable) if not args.only or any(w in c.name for w in args.only)
    ]
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for check in results:
            print(f"gpu_check: {check.name} ...", flush=True)
            run_check(check, Path(tmp))
            print(f"gpu_check: {check.name}: {'pass' if check.passed else 'FAIL'} ({check.seconds:.0f} s) {check.numbers}",
                  flush=True)  # fmt: skip
    text = report(results, args.cpu)
    Path(args.out).write_text(text)
    print(f"report written to {args.out}")
    return 0 if all(c.passed for c in results) else 1


if __name__ == "__main__":
    sys.exit(main())
