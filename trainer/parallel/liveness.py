"""Dead or silent peers: every rank heartbeats through the rendezvous store, and a rank whose peer stops ends
itself within `parallel.collective_timeout_s`, so the job ends (and is requeued) instead of hanging.

What ends a multi-process run when one process dies or stops:

- a peer that *dies* (SIGKILL, OOM killer, segfault): gloo collectives on the survivors fail at once
  ("Connection reset by peer"); under torchrun the agent also stops the other workers. NCCL would wait for
  its timeout; the watchdog below does not.
- a peer that stops *answering* without dying (SIGSTOP, a process stuck in the kernel, a node that froze):
  every collective has the process-group timeout (`parallel.collective_timeout_s`, set in
  trainer.parallel.mesh and trainer.parallel.collectives), and the watchdog sees its heartbeat stop.

The watchdog is a daemon thread started with the process group. Every `interval` seconds it bumps this
rank's counter in the store and reads the counters of two peers: the next rank (every silent rank is then
watched by someone, at O(1) store traffic per rank) and rank 0 (which works alone while the others wait:
data preparation, checkpoint publication, the export at the end). A counter that has not moved for
`timeout` seconds by this process's clock (no clock needs to agree across nodes) means that peer is gone.
The thread then prints one line naming it and ends the process at once (os._exit: a normal exit would wait
for threads stuck in a collective with the dead peer), with REQUEUE_EXIT_CODE (75) and the requeue file
written, so that `forge slurm` requeues the job and the restart resumes from the last complete checkpoint.

Why 75 and not 1: the survivors are healthy; what killed or froze the peer (a node fault, the OOM killer,
a stuck file system) usually does not come back on a fresh allocation, and the checkpoint makes the retry
cheap. A requeue loop is bounded by `launch.max_restarts`. A rank that fails with a Python exception is
different: it records the error in the store before it exits (`tell_peers_on_failure`), and the others
then exit with status 1 and point to it, so a bug is not retried.

Long waits for one rank's solo work are not collectives (they would hit the timeout): they go through
`collectives.wait_for_all`, which waits through the store for as long as the watchdog sees everyone alive.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from typing import NoReturn, Optional

import torch.distributed as dist

from forge_lm.trainer.preemption import REQUEUE_EXIT_CODE, write_requeue_file

CRASH_EXIT_CODE = 1
"""Exit status of a rank whose peer failed with an error of its own: a bug is not requeued."""

_FAILED_KEY = "failed"
_watchdog: Optional[Watchdog] = None
_exit_lock = threading.Lock()


def heartbeat_interval(timeout_s: float) -> float:
    """A tenth of the timeout, between 0.5 and 10 s: detection is late by at most one interval."""
    return min(10.0, max(0.5, timeout_s / 10))


def forge_store(store: Optional[dist.Store] = None) -> dist.Store:
    """The rendezvous store (torchrun's agent, or rank 0 without torchrun) under the prefix "forge"."""
    if store is None:
        store = dist.distributed_c10d._get_default_store()
    return dist.PrefixStore("forge", store)


class Watchdog(threading.Thread):
    """Heartbeats for this rank; ends the process when a watched peer is silent for `timeout_s`."""

    def __init__(self, rank: int, world_size: int, timeout_s: float, store: dist.Store) -> None:
        super().__init__(name="forge-liveness", daemon=True)
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.interval = heartbeat_interval(timeout_s)
        # Its own connection: the main thread's store calls (a group being created) may block for long.
        self.store = forge_store(store.clone())
        self.peers = sorted({(rank + 1) % world_size, 0} - {rank})
        now = time.monotonic()
        self._seen = {peer: (-1, now) for peer in self.peers}  # counter, when it last moved
        self._last_contact = now
        self._stopped = threading.Event()

    def stop(self) -> None:
        self._stopped.set()

    def silent_peers(self, longer_than: float) -> dict[int, float]:
        """{peer: seconds since its heartbeat last moved} for the watched peers silent that long."""
        now = time.monotonic()
        return {p: now - t for p, (_, t) in self._seen.items() if now - t > longer_than}

    def run(self) -> None:
        while not self._stopped.wait(self.interval):
            if not dist.is_initialized():  # torn down by someone else: nothing left to guard
                return
            now = time.monotonic()
            try:
                self.store.add(f"heartbeat/{self.rank}", 1)
                for peer in self.peers:
                    count = self.store.add(f"heartbeat/{peer}", 0)  # reads without blocking
                    if count != self._seen[peer][0]:
                        self._seen[peer] = (count, now)
                failed = self.store.get(_FAILED_KEY).decode() if self.store.check([_FAILED_KEY]) else None
                self._last_contact = now
            except Exception as e:  # the store's host is gone (torchrun's agent, or rank 0 without torchrun)
                if now - self._last_contact > self.timeout_s:
                    exit_for_lost_peer(f"the rendezvous store stopped answering ({_first_line(e)})")
                continue
            if failed is not None and not failed.startswith(f"rank {self.rank} "):
                exit_for_lost_peer("another rank failed")
            silent = self.silent_peers(self.timeout_s)
            if silent:
                peer, seconds = max(silent.items(), key=lambda kv: kv[1])
                exit_for_lost_peer(
                    f"rank {peer} stopped answering (no heartbeat for {seconds:.0f} s, "
                    f"parallel.collective_timeout_s={self.timeout_s:g}): it died, hung or was stopped"
                )


def start(rank: int, world_size: int, timeout_s: float) -> None:
    """Start this process's watchdog (once the process group exists; a single process needs none)."""
    global _watchdog
    if world_size < 2 or _watchdog is not None:
        return
    _watchdog = Watchdog(rank, world_size, timeout_s, dist.distributed_c10d._get_default_store())
    _watchdog.store.add(f"heartbeat/{rank}", 1)  # alive from the start, before the first interval
    _watchdog.start()


def stop() -> None:
    """Stop the watchdog (at the end of a run, before the process group goes away)."""
    global _watchdog
    if _watchdog is not None:
        _watchdog.stop()
        _watchdog = None


# What gloo, NCCL and the store say when the other end went away or never answered (a wrong collective,
# e.g. mismatched sizes, says something else and keeps its traceback: it is a bug, not a lost peer).
_LOST_PEER_MARKS = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "Timed out",
    "timed out",
    "Timeout",
    "communicator was aborted",
)


def peer_failure(exc: BaseException) -> bool:
    """Whether `exc` (or an error it was raised from) is a collective or the store failing because another
    process went away: torch's network and store errors, or a reset connection / timeout from gloo or NCCL."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (dist.DistNetworkError, dist.DistStoreError)):
            return True
        if isinstance(exc, RuntimeError) and any(mark in str(exc) for mark in _LOST_PEER_MARKS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def exit_for_lost_peer(reason: str) -> NoReturn:
    """Print one line saying which peer was lost and what to do, then end this process at once: with 75 and
    the requeue file for a peer that died or went silent, with 1 for a peer that recorded an error."""
    with _exit_lock:  # the watchdog and the main thread may both get here; the second one waits for _exit
        rank = _rank()
        failure = _recorded_failure()
        if failure is not None:
            code = CRASH_EXIT_CODE
            line = f"[rank {rank}] ending: {failure}; its log has the traceback. Not requeued (exit status {code})."
        else:
            code = REQUEUE_EXIT_CODE
            line = (
                f"[rank {rank}] peer lost: {reason}. Exiting with status {code} so the job ends (forge slurm "
                "requeues it); running it again resumes from the last complete checkpoint. Why the peer went is "
                "in its own log."
            )
            with contextlib.suppress(OSError):  # a full disk must not keep this process alive
                write_requeue_file({"step": None, "reason": f"peer lost: {reason}", "checkpoint": None})
        sys.stdout.flush()
        print(line, file=sys.stderr, flush=True)
        os._exit(code)


def exit_for_collective_error(exc: BaseException) -> NoReturn:
    """The main thread's end for a `peer_failure` exception: the watchdog's line, naming the silent peer
    where the watchdog has seen one."""
    silent = _watchdog.silent_peers(2 * _watchdog.interval) if _watchdog is not None else {}
    if silent:
        peer, seconds = max(silent.items(), key=lambda kv: kv[1])
        exit_for_lost_peer(
            f"rank {peer} stopped answering (no heartbeat for {seconds:.0f} s; {_first_line(exc)})"
        )
    exit_for_lost_peer(f"a collective failed ({_first_line(exc)}): another rank died or stopped answering")


@contextlib.contextmanager
def tell_peers_on_failure() -> Iterator[None]:
    """Record an error this rank is about to die of in the store, so its peers end with status 1 and name
    it instead of taking its silence for a fault worth a requeue. Errors that are themselves a lost peer
    are not recorded (they would hide the real cause)."""
    try:
        yield
    except Exception as e:
        if _watchdog is not None and not peer_failure(e):
            with contextlib.suppress(Exception):
                _watchdog.store.set(
                    _FAILED_KEY, f"rank {_rank()} failed with {type(e).__name__}: {_first_line(e)}"
                )
        raise


def _recorded_failure() -> Optional[str]:
    if _watchdog is None:
        return None
    try:
        return _watchdog.store.get(_FAILED_KEY).decode() if _watchdog.store.check([_FAILED_KEY]) else None
    except Exception:
        return None


def _rank() -> str:
    return str(dist.get_rank()) if dist.is_initialized() else os.environ.get("RANK", "?")


def _first_line(exc: BaseException) -> str:
    """The gist of an error: its first sentence, without gloo's "[source.cc:123] " prefix."""
    lines = str(exc).strip().splitlines()
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", lines[0]) if lines else type(exc).__name__
    return text.split(". ")[0][:300]
