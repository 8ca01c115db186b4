"""Submit a training run to SLURM: `forge slurm submit <overrides> launch.nodes=2 ...`.

    forge slurm submit experiment=quickstart launch.nodes=2 launch.gpus_per_node=8 \\
        launch.partition=gpu launch.time=24:00:00 [--dry-run]

Everything is checked before anything is submitted: the config (as `forge_lm.trainer.train` will validate it, with
WORLD_SIZE = nodes * gpus_per_node, which must equal the parallel layout's size), `sbatch` on the PATH, the
controller answering, the partition existing and having enough nodes. Then the batch script is rendered
from the config, saved as <run_dir>/slurm/job-<id>.sh, submitted with `sbatch`, and the job id and the log
file are printed. `--dry-run` (or launch.dry_run=true) prints the script and submits nothing.

What the batch script does (see `SCRIPT` below, which is the whole of it):

- one `srun` task per node, each running `torchrun` with a c10d rendezvous on the first node of the job;
  that node's address comes from `getent hosts`, or from SLURM's NodeAddr where its name does not resolve;
- sane defaults for NCCL / torch.distributed and OMP_NUM_THREADS (each overridable with launch.env or the
  submitting environment), logs of every attempt appended to <run_dir>/slurm/job-<id>.out;
- asks for `--requeue` and for SIGUSR1 `launch.signal_seconds` before the time limit. On SIGUSR1 or
  SIGTERM (time limit, preemption, `scancel -b -s USR1 <job>`, `scancel`) it creates the stop file
  ($TRAINER_STOP_FILE) that the trainer checks after every step: the trainer finishes the step, saves a
  complete checkpoint, writes $TRAINER_REQUEUE_FILE and exits. After SIGUSR1 (or when the trainer stopped
  on its own time budget) the script runs `scontrol requeue`; after SIGTERM it does not (a cancelled job
  stays cancelled; SLURM requeues a preempted job itself). The requeued job resumes from the latest
  complete checkpoint (trainer.resume=auto) and logs its restart count. docs/launch.md has the full table.
- The traps only set a variable and `srun` runs in the background under `wait`: two signals arriving
  together (SLURM sends SIGCONT and SIGUSR1 as two concurrent RPCs) cannot break the handler.

Exit status of `forge slurm`: 0 submitted (or printed), 2 bad config or bad cluster, 1 sbatch failed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from forge_lm.launch.config import LaunchConfig, compose, split_overrides
from forge_lm.launch.torchrun import torchrun_command
from forge_lm.trainer.config import Config, ConfigError
from forge_lm.trainer.config_store import config_dir_as_override

STOP_FILE_ENV = "TRAINER_STOP_FILE"  # trainer.preemption reads these two
REQUEUE_FILE_ENV = "TRAINER_REQUEUE_FILE"

DEFAULT_ENV = {
    # NCCL's warnings and errors in the log (NCCL_DEBUG=INFO when debugging a hang or a slow start).
    "NCCL_DEBUG": "WARN",
    # A failed or timed-out collective ends the process, so the job ends (and can be requeued) instead of
    # hanging until its time limit (recent torch's default, made explicit for older ones).
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
    # On a collective timeout, dump the flight recorder's last collectives per rank: it names the rank that
    # did not join.
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
    "TORCH_FR_BUFFER_SIZE": "2000",
    # Python tracebacks on fatal signals; output not held back in buffers.
    "PYTHONFAULTHANDLER": "1",
    "PYTHONUNBUFFERED": "1",
}

SCRIPT = """\
#!/bin/bash
# Rendered by `forge slurm submit` on {date}: run '{name}', {nodes} node(s) x {per_node} process(es).
#   {command}
{sbatch}

set -uo pipefail
# Fork-free traps: only a variable is set, so signals arriving together cannot break the handler.
got_usr1=0
got_term=0
trap 'got_usr1=1' USR1
trap 'got_term=1' TERM

{setup}
# Defaults for the collective libraries and threads; the submitting environment and launch.env win.
{env}
threads=$(( ${{SLURM_CPUS_PER_TASK:-1}} / {per_node} ))
export OMP_NUM_THREADS="${{OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}}"
# torchrun passes SIGUSR1 sent to the job's tasks (scancel -s USR1 <job>) on to the trainer
export TORCHELASTIC_SIGNALS_TO_HANDLE="${{TORCHELASTIC_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}}"

RESTART="${{SLURM_RESTART_COUNT:-0}}"
LOG_DIR={log_dir}
export {stop_env}="$LOG_DIR/stop-$SLURM_JOB_ID-$RESTART"
export {requeue_env}="$LOG_DIR/requeue-$SLURM_JOB_ID-$RESTART"
rm -f "${stop_env}" "${requeue_env}"

# The rendezvous runs on the first node; use its address where its name does not resolve.
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
if getent hosts "$head_node" > /dev/null 2>&1; then
    MASTER_ADDR="$head_node"
else
    MASTER_ADDR=$(scontrol show node "$head_node" | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p')
    MASTER_ADDR="${{MASTER_ADDR:-$head_node}}"
fi
MASTER_PORT=$(( 20000 + (SLURM_JOB_ID * 16 + RESTART) % 40000 ))
export MASTER_ADDR MASTER_PORT
echo "[launch] $(date '+%F %T') job $SLURM_JOB_ID restart $RESTART on $SLURM_JOB_NODELIST, rendezvous $MASTER_ADDR:$MASTER_PORT"

srun --nodes={nodes} --ntasks={nodes} --ntasks-per-node=1 --kill-on-bad-exit=1 \\
    {torchrun} &
srun_pid=$!

# Wait for training. A trapped signal interrupts `wait`; the trainer is told through the stop file and
# stops after its current step with a complete checkpoint.
status=0
while :; do
    if [ "$got_usr1" = 1 ] || [ "$got_term" = 1 ]; then
        if [ ! -e "${stop_env}" ]; then
            echo "[launch] $(date '+%F %T') stop requested: the trainer checkpoints after its current step and exits"
            touch "${stop_env}"
        fi
    fi
    kill -0 "$srun_pid" 2> /dev/null || break
    wait "$srun_pid"
    status=$?
done
wait "$srun_pid" 2> /dev/null
last=$?
[ "$last" -ne 127 ] && status=$last

if [ "$status" -eq 0 ]; then
    echo "[launch] $(date '+%F %T') training finished"
    exit 0
fi
stopped=""
if [ -e "${requeue_env}" ]; then
    stopped=$(cat "${requeue_env}")
    echo "[launch] the trainer asked to be requeued (a stop with a complete checkpoint, or a lost peer): $stopped"
    echo "[launch] (its exit status 75 means 'requeue me'; torchrun and srun report it as a failure above)"
fi
# SIGTERM to this script: scancel, the time limit, or the end of a preemption's grace time. A cancelled job
# stays cancelled; a preempted one is requeued by SLURM itself.
if [ "$got_term" = 1 ]; then
    echo "[launch] $(date '+%F %T') SIGTERM: not requeued by this script (SLURM requeues a preempted job itself)"
    exit "$status"
fi
requeue=$got_usr1
case "$stopped" in
    "") ;;
    *"received SIGTERM"*)
        # Only the tasks got SIGTERM: a preemption without a user signal. SLURM requeues the job if this
        # script still runs when the grace time ends (it then gets SIGTERM); wait for that.
        for _ in $(seq 120); do
            [ "$got_term" = 1 ] && break
            sleep 1 &
            wait $!
        done
        if [ "$got_term" = 1 ]; then
            echo "[launch] $(date '+%F %T') SIGTERM after the tasks': SLURM requeues the job"
            exit "$status"
        fi
        requeue=1
        ;;
    *) requeue=1 ;;  # the warning signal, SIGUSR1 to the tasks, or the trainer's time budget
esac
if [ "$requeue" = 1 ]; then
    if [ "$RESTART" -ge {max_restarts} ]; then
        echo "[launch] not requeued: $RESTART restarts reached launch.max_restarts={max_restarts}"
        exit 1
    fi
    echo "[launch] $(date '+%F %T') requeueing job $SLURM_JOB_ID (restart $(( RESTART + 1 ))); it resumes from its latest complete checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
echo "[launch] $(date '+%F %T') training failed (status $status); not requeued"
exit "$status"
"""


def _sh(token: str) -> str:
    """Quote for the shell, leaving $VARIABLES of the script expandable."""
    if "$" in token and re.fullmatch(r"[\w$.:=/{}-]+", token):
        return f'"{token}"'
    return shlex.quote(token)


def _format_command(cmd: Sequence[str], width: int = 100) -> str:
    """The torchrun command over several lines: the program, one flag per line, then the trainer's overrides."""
    head_end = cmd.index("torch.distributed.run") + 1
    module = len(cmd) - cmd[::-1].index("-m") - 1  # the last "-m": "-m forge_lm.trainer.train"
    lines = [" ".join(_sh(t) for t in cmd[:head_end])]
    lines += [_sh(t) for t in cmd[head_end:module]]
    line = " ".join(_sh(t) for t in cmd[module : module + 2])
    for token in cmd[module + 2 :]:
        if len(line) + 1 + len(_sh(token)) > width:
            lines.append(line)
            line = _sh(token)
        else:
            line += " " + _sh(token)
    lines.append(line)
    return " \\\n    ".join(lines)


def render(cfg: Config, launch: LaunchConfig, train_overrides: Sequence[str], command: str = "") -> str:
    """The batch script for this run (a pure function of the config: no cluster is contacted)."""
    log_dir = Path(launch.log_dir or Path(cfg.run_dir) / "slurm").absolute()
    gpus = cfg.trainer.device != "cpu"
    sbatch = [
        f"--job-name={launch.job_name or cfg.name}",
        f"--nodes={launch.nodes}",
        "--ntasks-per-node=1",
    ]
    if gpus:
        sbatch.append(f"--gpus-per-node={launch.gpus_per_node}")
    if launch.cpus_per_task:
        sbatch.append(f"--cpus-per-task={launch.cpus_per_task}")
    if launch.mem:
        sbatch.append(f"--mem={launch.mem}")
    for key in ("partition", "time", "account", "qos"):
        value = getattr(launch, key)
        if value:
            sbatch.append(f"--{key}={value}")
    if launch.exclusive:
        sbatch.append("--exclusive")
    sbatch += [
        f"--output={log_dir}/job-%j.out",
        "--open-mode=append",
        "--requeue",
        f"--signal=B:USR1@{launch.signal_seconds}",
        f"--chdir={Path.cwd()}",
        *launch.extra_sbatch_args,
    ]
    env = {**DEFAULT_ENV, **{k: str(v) for k, v in launch.env.items()}}
    env_lines = []
    for key, value in env.items():
        if key in launch.env:  # asked for explicitly: set it
            env_lines.append(f"export {key}={shlex.quote(value)}")
        else:  # a default: the submitting environment wins
            env_lines.append(f'export {key}="${{{key}:-{value}}}"')
    torchrun = torchrun_command(
        launch.python or sys.executable,
        launch.nodes,
        launch.gpus_per_node,
        train_overrides,
        rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" if launch.nodes > 1 else None,
        rdzv_id="$SLURM_JOB_ID",
    )
    return SCRIPT.format(
        date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
        name=cfg.name,
        nodes=launch.nodes,
        per_node=launch.gpus_per_node,
        command=command or "forge slurm submit " + shlex.join(train_overrides),
        sbatch="\n".join(f"#SBATCH {arg}" for arg in sbatch),
        setup="\n".join(launch.setup) if launch.setup else "# (no launch.setup lines)",
        env="\n".join(env_lines),
        log_dir=shlex.quote(str(log_dir)),
        stop_env=STOP_FILE_ENV,
        requeue_env=REQUEUE_FILE_ENV,
        max_restarts=launch.max_restarts,
        torchrun=_format_command(torchrun),
    )


# ---------------------------------------------------------------------------------------------------------
# Checks against the cluster, before submitting
# ---------------------------------------------------------------------------------------------------------


class ClusterError(RuntimeError):
    """SLURM is missing, unreachable, or cannot run this job as asked (the message says what to do)."""


def _slurm(*cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise ClusterError(
            f"`{' '.join(cmd)}` did not answer within {timeout:.0f} s: is the SLURM controller up?"
        ) from e


def check_cluster(launch: LaunchConfig) -> str:
    """Fail with a clear error unless this job can be submitted; returns the partition it will go to."""
    for program in ("sbatch", "scontrol"):
        if shutil.which(program) is None:
            raise ClusterError(
                f"`{program}` is not on the PATH: run this on a SLURM login node (or `module load slurm`). "
                "To see the batch script without a cluster, add --dry-run."
            )
    ping = _slurm("scontrol", "ping")
    if ping.returncode != 0 or "UP" not in ping.stdout:
        detail = (ping.stdout + ping.stderr).strip().splitlines()
        raise ClusterError(
            "cannot reach the SLURM controller (`scontrol ping`: "
            f"{detail[-1] if detail else 'no answer'}): check that slurmctld runs and that SLURM_CONF "
            f"({os.environ.get('SLURM_CONF', 'unset')}) points to this cluster's slurm.conf."
        )
    partition = launch.partition
    if partition is None:
        out = _slurm("sinfo", "-h", "-o", "%P")
        defaults = [p.rstrip("*") for p in out.stdout.split() if p.endswith("*")]
        if not defaults:
            raise ClusterError("this cluster has no default partition: set launch.partition.")
        partition = defaults[0]
    out = _slurm("scontrol", "show", "partition", partition, "-o")
    if out.returncode != 0 or f"PartitionName={partition}" not in out.stdout:
        names = [p.rstrip("*") for p in _slurm("sinfo", "-h", "-o", "%P").stdout.split()]
        raise ClusterError(
            f"launch.partition={partition!r} does not exist on this cluster: choose one of {', '.join(names) or '(none)'}."
        )
    total = re.search(r"\bTotalNodes=(\d+)", out.stdout)
    if total and int(total.group(1)) < launch.nodes:
        raise ClusterError(
            f"launch.nodes={launch.nodes} but partition {partition!r} has only {total.group(1)} node(s): "
            "lower launch.nodes or choose a bigger partition."
        )
    return partition


def submit(script: str, log_dir: Path) -> str:
    """Save the script, sbatch it, rename it after the job id; returns the job id."""
    log_dir.mkdir(parents=True, exist_ok=True)
    pending = log_dir / f"submit-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}.sh"
    pending.write_text(script)
    out = _slurm("sbatch", "--parsable", str(pending))
    if out.returncode != 0:
        raise RuntimeError(
            f"sbatch refused the job: {(out.stderr or out.stdout).strip()} (script kept at {pending})"
        )
    job_id = out.stdout.strip().split(";")[0]
    os.replace(pending, log_dir / f"job-{job_id}.sh")
    return job_id


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="forge slurm",
        description="Submit a training run to SLURM (see the module docstring).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_submit = sub.add_parser("submit", help="render the batch script and sbatch it")
    p_submit.add_argument("--dry-run", action="store_true", help="print the batch script, submit nothing")
    p_submit.add_argument("--config-dir", "-cd", help="your own config folder, beside the shipped configs")
    p_submit.add_argument("overrides", nargs="*", help="Hydra overrides, trainer's and launch.*")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    try:
        if args.config_dir:  # the job gets it as hydra.searchpath, an absolute path
            args.overrides = config_dir_as_override(["--config-dir", args.config_dir, *args.overrides])
        cfg, launch = compose(args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    train_overrides, _ = split_overrides(args.overrides)
    command = "forge slurm submit " + shlex.join(args.overrides)
    script = render(cfg, launch, train_overrides, command)
    if args.dry_run or launch.dry_run:
        print(script, end="")
        return 0
    try:
        partition = check_cluster(launch)
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log_dir = Path(launch.log_dir or Path(cfg.run_dir) / "slurm").absolute()
    try:
        job_id = submit(script, log_dir)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    log = log_dir / f"job-{job_id}.out"
    print(
        f"submitted job {job_id}: run '{cfg.name}', {launch.nodes} node(s) x {launch.gpus_per_node} process(es), "
        f"partition {partition}\n"
        f"  batch script  {log_dir / f'job-{job_id}.sh'}\n"
        f"  log           {log}    (follow: tail -f {log})\n"
        f"  run dir       {Path(cfg.run_dir).absolute()}    (metrics.jsonl, train.log, checkpoints/)\n"
        f"  stop + requeue now: scancel -b -s USR1 {job_id}    cancel: scancel {job_id}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
