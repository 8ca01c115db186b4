"""A kill -9 campaign: training runs under torchrun whose ranks are killed at random moments, every rerun
checked bit for bit against an uninterrupted run (a script and a test, not a benchmark of speed).

    python -m forge_lm.tools.kill_campaign --kills 20                     # async checkpoints, 2 processes
    python -m forge_lm.tools.kill_campaign --kills 6 --sync --dir /tmp/kc [Hydra overrides ...]
    forge bench kills --kills 20

1. An uninterrupted reference run of a tiny model (the packaged `tiny` data; 40 steps, a checkpoint every
   2) on --nproc processes under torchrun.
2. Runs of the same config, each killed --kills-per-run times and then run to the end. Every kill is a
   SIGKILL to one rank chosen at random, aimed alternately at a random moment of training and at the moment
   a checkpoint save begins (a new step_<N>.tmp directory). After each kill the other ranks must be gone
   within --bound seconds; the run is then started again, as a requeued job would be, and resumes from
   its last complete checkpoint.
3. Each finished run must equal the reference exactly: the loss of every step (the last one logged for
   it), every tensor of the final checkpoint (model and optimizer) and its train state (step, RNG, data
   position, schedule).

A kill counts as "during a save" when a checkpoint directory still being written or not yet published
(step_<N>.tmp) existed just before the kill and still does after it; "while writing" when its tensor files
were not all written yet (no .metadata). With async checkpoints (trainer.async_checkpoint=true, the default
here) a save is published at the next save, so most kills fall in one.

Prints one line per kill and a JSON summary (also written to <dir>/campaign.json). Exit status 0 when
every run was identical and every kill ended its job in time, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

# A tiny Llama on the packaged `tiny` data: 8 sequences of 64 tokens per step (the same global batch on any
# number of processes), 0.1-0.3 s a step on one CPU core, so a launch is mostly process start.
TINY_RUN = [
    "data=tiny",
    "data.seq_len=64",
    "model.d_model=64",
    "model.n_layers=4",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.max_seq_len=64",
    "model.tie_embeddings=false",
    "trainer.global_batch_tokens=512",
    "trainer.micro_batch_size=1",
    "trainer.max_steps=40",
    "trainer.checkpoint_every=2",
    "trainer.log_every=1",
    "trainer.lr=3e-3",
    "trainer.warmup_steps=2",
    "trainer.precision=fp32",
    "trainer.device=cpu",
    "trainer.wandb.mode=disabled",
    "trainer.export_hf=false",
    "trainer.plot=false",
    "trainer.tensorboard=false",
    "eval.max_batches=1",
    "eval.batch_size=8",
    "eval.tasks=[]",
    "eval.prompts=[]",
]

POLL_S = 0.01
"""How often the campaign looks at the run directory and the processes."""

LAUNCH_TIMEOUT_S = 900
"""The longest a launch left to run to its end may take (the tiny run needs well under a minute)."""


# ---- processes ------------------------------------------------------------------------------------------


def start_torchrun(
    nproc: int, overrides: list[str], log: Path, env: Optional[dict[str, str]] = None
) -> subprocess.Popen:
    """`torchrun --standalone --nproc-per-node=<nproc> -m forge_lm.trainer.train <overrides>` in its own
    session (so that whatever is left of it can be ended as one group), output into `log`."""
    from forge_lm.launch.torchrun import torchrun_command

    cmd = torchrun_command(sys.executable, 1, nproc, overrides)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
            start_new_session=True,
        )


def alive(pid: int) -> bool:
    """Whether process `pid` exists and has not ended (a zombie waiting for its parent has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def worker_pids(launcher: subprocess.Popen, nproc: int, timeout: float = 120) -> dict[int, int]:
    """{rank: pid} of the worker processes torchrun started (its children, by their RANK variable)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != launcher.pid:
                    continue
                env = dict(
                    item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item
                )
            except (OSError, ValueError):  # it ended meanwhile
                continue
            if "RANK" in env:
                found[int(env["RANK"])] = int(entry.name)
        if len(found) == nproc:
            return found
        if launcher.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"torchrun (pid {launcher.pid}) did not show {nproc} workers within {timeout:g} s")


def end_group(launcher: subprocess.Popen) -> None:
    """End whatever is left of a launch: its session's processes (torchrun and its workers)."""
    try:
        os.killpg(launcher.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    launcher.wait()


def finish(launcher: subprocess.Popen) -> Optional[int]:
    """Wait for a launch to end by itself; its exit status, or None (and it is ended) after LAUNCH_TIMEOUT_S."""
    try:
        return launcher.wait(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        end_group(launcher)
        return None


# ---- what a run wrote ------------------------------------------------------------------------------------


def losses(run_dir: Path) -> dict[int, float]:
    """The loss of every training step, as last logged (a resumed run logs the steps after its checkpoint
    again)."""
    from forge_lm.trainer.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir, "train")}


def last_step(run_dir: Path) -> int:
    return max(losses(run_dir), default=0)


def saves_under_way(run_dir: Path) -> dict[str, bool]:
    """{step_<N>.tmp: whether its tensor files are all written} for the checkpoints begun but not published."""
    root = run_dir / "checkpoints"
    try:
        tmps = [p for p in root.iterdir() if p.name.startswith("step_") and p.name.endswith(".tmp")]
    except OSError:
        return {}
    return {p.name: (p / ".metadata").exists() for p in tmps}


def final_state(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(every tensor of the newest complete checkpoint, model and optimizer, by name; its train state), read
    through the trainer's own verified loading path in this process alone."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from forge_lm.trainer import checkpoint as ckpt
    from forge_lm.trainer.safe_pickle import SafeFileSystemReader, SafeLoadPlanner, load_metadata

    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    if latest is None:
        raise RuntimeError(f"{run_dir} has no complete checkpoint")
    train_state = ckpt.read_train_state(latest.path, collective=False)  # verifies every file's checksum
    tensors = {
        name: torch.empty(meta.size, dtype=meta.properties.dtype)
        for name, meta in load_metadata(latest.path / ".metadata").state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata)
    }
    with warnings.catch_warnings():  # "no process group, assuming a single process": just so
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(
            tensors,
            storage_reader=SafeFileSystemReader(str(latest.path)),
            planner=SafeLoadPlanner(),
            no_dist=True,
        )
    return tensors, train_state


def differences(run_dir: Path, reference: Path) -> list[str]:
    """How `run_dir` differs from `reference`, bit for bit: losses, final tensors, train state ([] if not)."""
    found = []
    got, want = losses(run_dir), losses(reference)
    if got != want:
        steps = sorted(set(got) | set(want))
        first = next(s for s in steps if got.get(s) != want.get(s))
        found.append(f"losses part at step {first}: {got.get(first)!r} vs {want.get(first)!r}")
    (tensors, state), (ref_tensors, ref_state) = final_state(run_dir), final_state(reference)
    if tensors.keys() != ref_tensors.keys():
        found.append(
            f"the final checkpoints hold different tensors: {sorted(tensors.keys() ^ ref_tensors.keys())[:5]}"
        )
    unequal = [k for k in tensors.keys() & ref_tensors.keys() if not torch.equal(tensors[k], ref_tensors[k])]
    if unequal:
        found.append(f"{len(unequal)} tensors of the final checkpoint differ, e.g. {sorted(unequal)[:3]}")
    found += [f"train state: {d}" for d in _state_differences(state, ref_state)]
    return found


def _state_differences(a: Any, b: Any, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}{k}: only in one" for k in sorted(a.keys() ^ b.keys(), key=str)]
        for k in a.keys() & b.keys():
            out += _state_differences(a[k], b[k], f"{where}{k}.")
        return out
    if torch.is_tensor(a) and torch.is_tensor(b):
        return [] if a.dtype == b.dtype and torch.equal(a, b) else [where.rstrip(".")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _state_differences(x, y, f"{where}{i}.")]
    return [] if a == b else [f"{where.rstrip('.')}: {a!r} vs {b!r}"[:200]]


# ---- one kill --------------------------------------------------------------------------------------------


@dataclass
class Kill:
    run: str
    rank: int
    aimed_at: str
    """'training': a random moment after a random step; 'save': the moment a save begins."""
    step: int
    """The last step the run had logged when the kill came."""
    during_save: bool = False
    while_writing: bool = False
    others_gone_s: Optional[float] = None
    """Seconds from the kill until every other rank had ended (None: not within the bound + 30 s)."""
    job_gone_s: Optional[float] = None
    """Seconds from the kill until torchrun itself had ended (it gives a frozen worker 30 s after SIGTERM)."""
    job_status: Optional[int] = None


def kill_one(
    launcher: subprocess.Popen,
    run_dir: Path,
    run: str,
    nproc: int,
    aim: str,
    rng: random.Random,
    bound: float,
    max_steps: int,
) -> Optional[Kill]:
    """Wait for the moment `aim` picks, SIGKILL one random rank, and time how long the others and torchrun
    take to end. None when the launch ended before that moment came (the run had finished)."""
    pids = worker_pids(launcher, nproc)
    # A random step ahead of what the run has logged (a resumed launch first redoes the steps after its
    # checkpoint), then a random moment of training or the next save that begins.
    target = min(max_steps - 1, last_step(run_dir) + rng.randint(1, 8))
    delay = rng.uniform(0, 0.3) if aim == "training" else rng.uniform(0, 0.02)
    seen, moment = set(saves_under_way(run_dir)), None
    while launcher.poll() is None and (moment is None or time.monotonic() < moment):
        if moment is None:
            saving = set(saves_under_way(run_dir))
            if last_step(run_dir) >= target and (aim == "training" or saving - seen):
                moment = time.monotonic() + delay
            seen = saving
        time.sleep(POLL_S)
    if launcher.poll() is not None:
        return None
    rank = rng.randrange(nproc)
    saving = saves_under_way(run_dir)
    os.kill(pids[rank], signal.SIGKILL)
    killed_at = time.monotonic()
    still = saves_under_way(run_dir)
    kill = Kill(run, rank, aim, last_step(run_dir))
    kill.during_save = bool(saving.keys() & still.keys())
    kill.while_writing = any(not written for name, written in saving.items() if name in still)
    others = [pid for r, pid in pids.items() if r != rank]
    while time.monotonic() < killed_at + bound + 30 and (
        kill.others_gone_s is None or kill.job_gone_s is None
    ):
        now = time.monotonic()
        if kill.others_gone_s is None and not any(map(alive, others)):
            kill.others_gone_s = round(now - killed_at, 2)
        if kill.job_gone_s is None and launcher.poll() is not None:
            kill.job_gone_s, kill.job_status = round(now - killed_at, 2), launcher.returncode
        time.sleep(0.02)
    end_group(launcher)  # whatever outlived the bound (a failure, reported) goes now
    return kill


# ---- the campaign ----------------------------------------------------------------------------------------


@dataclass
class Campaign:
    kills: list[Kill] = field(default_factory=list)
    runs: dict[str, list[str]] = field(default_factory=dict)
    """{run: its differences from the reference ([] when identical)}."""
    launches: int = 0
    wall_s: float = 0.0

    def summary(self, bound: float) -> dict[str, Any]:
        ended = [k.others_gone_s for k in self.kills if k.others_gone_s is not None]
        return {
            "kills": len(self.kills),
            "during_saves": sum(k.during_save for k in self.kills),
            "while_writing": sum(k.while_writing for k in self.kills),
            "aimed_at_saves": sum(k.aimed_at == "save" for k in self.kills),
            "ranks_killed": {
                r: sum(k.rank == r for k in self.kills) for r in sorted({k.rank for k in self.kills})
            },
            "runs": len(self.runs),
            "identical": sum(not d for d in self.runs.values()),
            "all_identical": bool(self.runs) and not any(self.runs.values()),
            "slowest_others_gone_s": max(ended, default=None),
            "all_ended_in_time": all(
                k.others_gone_s is not None and k.others_gone_s <= bound and k.job_status not in (None, 0)
                for k in self.kills
            ),
            "launches": self.launches,
            "wall_s": round(self.wall_s, 1),
        }


def _value(overrides: list[str], key: str) -> str:
    """The value the last `key=...` of `overrides` gives (Hydra's rule: the last one wins)."""
    return next(o.split("=", 1)[1] for o in reversed(overrides) if o.startswith(f"{key}="))


def run_config(root: Path, name: str, async_checkpoint: bool, extra: tuple[str, ...] = ()) -> list[str]:
    """The overrides of one campaign run: the tiny model, its output under `root`, then `extra`."""
    mode = f"trainer.async_checkpoint={str(async_checkpoint).lower()}"
    return [*TINY_RUN, f"output_root={root}", mode, *extra, f"name={name}"]


def make_reference(root: Path, nproc: int = 2, extra: tuple[str, ...] = ()) -> Path:
    """The uninterrupted run every campaign run is compared with, with synchronous checkpoints (so an
    asynchronous run that equals it has lost nothing by saving in the background). Returns its directory."""
    log = root / "logs" / "reference.log"
    proc = start_torchrun(nproc, run_config(root, "reference", False, extra), log)
    if finish(proc) != 0:
        raise RuntimeError(f"the reference run failed (exit status {proc.returncode}): see {log}")
    return root / "reference"


def run_campaign(
    root: Path,
    kills: int,
    nproc: int = 2,
    kills_per_run: int = 4,
    async_checkpoint: bool = True,
    seed: int = 0,
    bound: float = 60.0,
    extra: tuple[str, ...] = (),
    reference: Optional[Path] = None,
    prefix: str = "run",
    say=print,
) -> Campaign:
    """Run the campaign under `root` (see the module's docstring), its runs named <prefix>1, <prefix>2, ...
    `reference`: an uninterrupted run of the same config under the same root, to compare with
    (`make_reference`; made when None). One root for all: the data is prepared once, and the runs' train
    states name the same tokenizer."""
    started = time.perf_counter()
    rng = random.Random(seed)
    max_steps = int(_value(run_config(root, "", async_checkpoint, extra), "trainer.max_steps"))
    campaign = Campaign()

    def launch(name: str) -> subprocess.Popen:
        campaign.launches += 1
        log = root / "logs" / f"{name}-{campaign.launches}.log"
        return start_torchrun(nproc, run_config(root, name, async_checkpoint, extra), log)

    if reference is None:
        reference = make_reference(root, nproc, extra)
        say(f"reference: {max(losses(reference))} steps, synchronous checkpoints")
    run_index = 0
    while len(campaign.kills) < kills:
        run_index += 1
        name = f"{prefix}{run_index}"
        in_run = 0
        while True:
            proc = launch(name)
            if in_run < kills_per_run and len(campaign.kills) < kills:
                aim = "save" if len(campaign.kills) % 2 else "training"
                kill = kill_one(proc, root / name, name, nproc, aim, rng, bound, max_steps)
                if kill is not None:
                    in_run += 1
                    campaign.kills.append(kill)
                    say(
                        f"kill {len(campaign.kills)}: {name} rank {kill.rank} at step {kill.step} (aimed at "
                        f"{kill.aimed_at}; during a save: {kill.during_save}, while writing: {kill.while_writing}); "
                        f"the others gone after {kill.others_gone_s} s, torchrun exit status {kill.job_status}"
                    )
                    continue
            status = finish(proc)
            if status != 0:
                raise RuntimeError(f"{name} failed (exit status {status}): see {root / 'logs'}")
            campaign.runs[name] = differences(root / name, reference)
            verdict = (
                "identical to the reference" if not campaign.runs[name] else "; ".join(campaign.runs[name])
            )
            say(f"{name}: finished after {in_run} kills, {verdict}")
            break
    campaign.wall_s = time.perf_counter() - started
    return campaign


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--kills", type=int, default=20, help="how many SIGKILLs in all (default 20)")
    parser.add_argument(
        "--kills-per-run", type=int, default=4, help="kills before a run may finish (default 4)"
    )
    parser.add_argument("--nproc", type=int, default=2, help="processes per run (default 2)")
    parser.add_argument("--sync", action="store_true", help="synchronous checkpoints (default: asynchronous)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments and ranks")
    parser.add_argument("--bound", type=float, default=60.0, help="seconds the other ranks may take to end")
    parser.add_argument("--dir", default=None, help="an empty or new directory (default: a temporary one)")
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides added to every run, e.g. model.n_layers=2"
    )
    args = parser.parse_args(argv)
    if args.kills < 1 or args.kills_per_run < 1 or args.nproc < 2 or args.bound <= 0:
        parser.error("--kills and --kills-per-run must be >= 1, --nproc >= 2 and --bound > 0")
    if bad := [o for o in args.overrides if "=" not in o]:
        parser.error(f"overrides are key=value, e.g. model.n_layers=2; got {bad}")
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="kill-campaign-"))
    if root.exists() and any(root.iterdir()):
        parser.error(f"--dir {root} is not empty: the runs would resume what is there; give a new directory")
    root.mkdir(parents=True, exist_ok=True)
    print(
        f"kill campaign in {root}: {args.kills} kills, {args.nproc} processes, "
        f"{'synchronous' if args.sync else 'asynchronous'} checkpoints",
        flush=True,
    )
    try:
        campaign = run_campaign(
            root,
            args.kills,
            args.nproc,
            args.kills_per_run,
            not args.sync,
            args.seed,
            args.bound,
            tuple(args.overrides),
            say=lambda line: print(line, flush=True),
        )
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    summary = campaign.summary(args.bound)
    record = {
        **summary,
        "command": " ".join(["python -m forge_lm.tools.kill_campaign", *(argv or sys.argv[1:])]),
        "kill_log": [asdict(k) for k in campaign.kills],
        "differences": campaign.runs,
    }
    (root / "campaign.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(summary))
    return 0 if summary["all_identical"] and summary["all_ended_in_time"] else 1


if __name__ == "__main__":
    sys.exit(main())
