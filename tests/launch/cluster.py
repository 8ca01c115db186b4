"""A real SLURM 22.05 cluster on this one machine, for the launch tests: munged, slurmctld and two slurmd.

The two slurmd emulate nodes `n1` and `n2` (names that do not resolve, on purpose: the batch script must
find the head node's address anyway). Everything lives under one scratch directory; the daemons are
started in daemon mode with pid files there and stopped by exactly those pid files, never by name.
Partitions: `debug` (default, PriorityTier 1, preemptible by requeue, GraceTime 10 s) and `urgent`
(PriorityTier 10): a job in `urgent` preempts a `debug` job that holds the nodes it needs.

Also a script, for poking at launch scripts by hand:

    python -m tests.launch.cluster up /tmp/slurm     # prints the `export SLURM_CONF=...` to use
    python -m tests.launch.cluster down /tmp/slurm

Each setting below is commented where it is written; docs/launch.md describes the cluster the tests use.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

DAEMONS = ("slurmctld", "slurmd", "munged")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel")
APT_PACKAGES = ("slurm-wlm", "slurm-client", "munge")
GRACE_TIME_S = 10
"""How long a preempted `debug` job keeps running after its warning signal before SLURM requeues it."""
CRED_EXPIRE_S = 5
"""Also the delay before a requeued job may start again (cred_expire + 1 s)."""

SLURM_CONF = """\
ClusterName=forgetest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={base}/munge/run/munge.socket.2,cred_expire={cred_expire}
SlurmctldPort={ctld_port}
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool/%n
SlurmctldPidFile={base}/run/slurmctld.pid
SlurmdPidFile={base}/run/slurmd-%n.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd-%n.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1,batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=300
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n1_port} CPUs=2 Sockets=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=2000 State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n2_port} CPUs=2 Sockets=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=2000 State=UNKNOWN
PartitionName=debug  Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP PriorityTier=1  PreemptMode=REQUEUE GraceTime={grace}
PartitionName=urgent Nodes=n[1-2] Default=NO  MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
"""


class ClusterError(RuntimeError):
    """The local cluster could not be installed or started (the message says why)."""


def missing_programs() -> list[str]:
    return [p for p in (*DAEMONS, *CLIENTS) if shutil.which(p) is None and not Path("/usr/sbin", p).exists()]


def ensure_installed() -> None:
    """Install Debian's slurm-wlm, slurm-client and munge if any program is missing (needs root and apt).

    Under no init system (or with a policy-rc.d that denies it, as in Docker images) the packages' services
    are not started by the install, so the only daemons that run are the ones `LocalSlurm` starts.
    """
    missing = missing_programs()
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ClusterError(
            f"SLURM programs missing ({', '.join(missing)}) and they cannot be installed here (needs root and "
            f"apt-get): install {' '.join(APT_PACKAGES)}."
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", *APT_PACKAGES]
    out = subprocess.run(install, env=env, capture_output=True, text=True)
    if out.returncode != 0:  # stale package lists: refresh once
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True)
        out = subprocess.run(install, env=env, capture_output=True, text=True)
    if out.returncode != 0 or missing_programs():
        raise ClusterError(
            f"apt-get install {' '.join(APT_PACKAGES)} failed:\n{out.stdout[-1500:]}\n{out.stderr[-1500:]}"
        )


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie, waiting for PID 1 to reap it, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


class LocalSlurm:
    """munged + slurmctld + slurmd n1, n2 under `base`. `env` is what every client command needs."""

    def __init__(self, base: str | os.PathLike) -> None:
        self.base = Path(base).resolve()
        self.conf = self.base / "etc" / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # ---- life cycle ------------------------------------------------------------------------------------

    @property
    def pid_files(self) -> list[Path]:
        """In stop order: nodes, controller, munge."""
        run = self.base / "run"
        return [
            run / "slurmd-n1.pid",
            run / "slurmd-n2.pid",
            run / "slurmctld.pid",
            self.base / "munge/run/munged.pid",
        ]

    def start(self, timeout: float = 30.0) -> None:
        """Start munged, slurmctld and slurmd n1, n2; wait until both nodes are idle. On failure, stop
        whatever was started and raise ClusterError with the daemons' logs."""
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> None:
        b = self.base
        for d in (
            "munge/etc",
            "munge/run",
            "munge/lib",
            "munge/log",
            "state",
            "spool/n1",
            "spool/n2",
            "log",
            "run",
            "etc",
        ):
            (b / d).mkdir(parents=True, exist_ok=True)
        os.chmod(b / "munge", 0o755)
        os.chmod(b / "munge/run", 0o755)  # munged refuses a socket directory that is not world-executable
        key = b / "munge/etc/munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
        ctld_port, n1_port, n2_port = _free_ports(3)
        self.conf.write_text(
            SLURM_CONF.format(
                base=b,
                ctld_port=ctld_port,
                n1_port=n1_port,
                n2_port=n2_port,
                grace=GRACE_TIME_S,
                cred_expire=CRED_EXPIRE_S,
            )
        )
        self._daemon(
            "munged",
            f"--key-file={key}",
            f"--socket={b}/munge/run/munge.socket.2",
            f"--pid-file={b}/munge/run/munged.pid",
            f"--log-file={b}/munge/log/munged.log",
            f"--seed-file={b}/munge/lib/munged.seed",
        )
        self._daemon("slurmctld", "-f", str(self.conf), "-c")  # -c: no job state from an earlier cluster
        for node in ("n1", "n2"):
            self._daemon("slurmd", "-f", str(self.conf), "-N", node)
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
            states = out.stdout.strip()
            nodes = dict(line.split() for line in states.splitlines() if line.strip())
            if nodes.get("n1") == "idle" and nodes.get("n2") == "idle":
                return
            time.sleep(0.1)
        raise ClusterError(
            f"nodes not idle after {timeout:.0f} s (sinfo: {states!r}); logs in {b}/log\n{self.logs()}"
        )

    def _daemon(self, program: str, *args: str) -> None:
        path = shutil.which(program) or f"/usr/sbin/{program}"
        out = subprocess.run([path, *args], env=self.env, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise ClusterError(
                f"{program} {' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}\n{self.logs()}"
            )

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel every job still in this cluster, stop exactly the daemons started here (by pid file), then
        kill what is left of this cluster's jobs (processes whose environment names this cluster's
        SLURM_CONF and a job id: a job step outlives its slurmd)."""
        if self.conf.exists() and any(_alive(pid) for pid in self._pids()):
            deadline = time.monotonic() + timeout
            try:
                while time.monotonic() < deadline:  # again and again: a job may requeue itself once cancelled
                    jobs = self.run("squeue", "-h", "-o", "%i", check=False, timeout=10).stdout.split()
                    if not jobs:
                        break
                    self.run("scancel", "--full", *jobs, check=False, timeout=10)
                    time.sleep(0.5)
            except subprocess.TimeoutExpired:
                pass  # the controller does not answer: stop the daemons anyway
        for pid in self._pids():
            if not _alive(pid):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        for pid in self._leftover_job_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _pids(self) -> list[int]:
        """The daemons' pids from their pid files, in stop order (nodes, controller, munge)."""
        pids = []
        for pid_file in self.pid_files:
            try:
                pids.append(int(pid_file.read_text().split()[0]))
            except (FileNotFoundError, ValueError, IndexError):
                pass
        return pids

    def _leftover_job_processes(self) -> list[int]:
        """Processes of this cluster's jobs still running: their environment holds this cluster's SLURM_CONF
        (and a job id, or they are a slurmstepd). Nothing else on the machine matches."""
        mine = f"SLURM_CONF={self.conf}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
                comm = (entry / "comm").read_text().strip()
            except OSError:
                continue
            if mine in env and (comm == "slurmstepd" or any(v.startswith(b"SLURM_JOB_ID=") for v in env)):
                found.append(int(entry.name))
        return found

    def __enter__(self) -> LocalSlurm:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- clients ---------------------------------------------------------------------------------------

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        out = subprocess.run(
            list(cmd), env=kw.pop("env", self.env), capture_output=True, text=True, timeout=timeout, **kw
        )
        if check and out.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stdout}{out.stderr}")
        return out

    def job(self, job_id: str | int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} once the job is forgotten."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if out.returncode != 0:
            return {}
        fields: dict[str, str] = {}
        for item in out.stdout.split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait_job(self, job_id: str | int, states: tuple[str, ...], timeout: float) -> dict[str, str]:
        """Wait until the job is in one of `states` (e.g. COMPLETED, FAILED); returns its fields."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.25)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout:.0f} s: {info}")

    def logs(self) -> str:
        parts = []
        for log in sorted((self.base / "log").glob("*.log")):
            parts.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("up", "down"):
        print("usage: python -m tests.launch.cluster up|down <scratch dir>", file=sys.stderr)
        return 2
    cluster = LocalSlurm(argv[1])
    if argv[0] == "up":
        ensure_installed()
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
