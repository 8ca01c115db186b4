"""Running work units in worker processes, results in order, with bounded memory.

`WorkerPool.imap(fn, tasks)` is what `prepare` and the online loader use to tokenize work units in
parallel. Three properties matter more than raw speed:

- Order: results come back in task order, so the output never depends on the number of workers.
- Bounded memory: tasks are pulled from the (possibly endless) iterator only as results are consumed,
  at most `window` in flight. (multiprocessing.Pool.imap would read the whole iterator ahead.)
- No orphans: workers are started with 'spawn' (forking a process that already runs tokenizer threads
  can deadlock) and exit on their own when their parent dies, so a SIGKILLed run leaves no process behind
  still writing files.

With `num_workers=0`, or when the tasks turn out to be few (`local_below`), everything runs in the
calling process (no start-up cost) and the tokenizer uses its own threads.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Optional, TypeVar

T = TypeVar("T")
R = TypeVar("R")
_END = object()


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's core count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_num_workers(num_workers: int) -> int:
    """`data.num_workers`: -1 means one per available core."""
    return available_cpus() if num_workers < 0 else num_workers


def _exit_with_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)
        time.sleep(0.2)


def _worker_start(parent_pid: int, initializer: Optional[Callable[..., None]], initargs: tuple) -> None:
    # One core per worker: the tokenizers library would otherwise start a thread per core in every worker.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    threading.Thread(
        target=_exit_with_parent, args=(parent_pid,), daemon=True, name="exit-with-parent"
    ).start()
    if initializer is not None:
        initializer(*initargs)


class WorkerPool:
    """`imap` over worker processes (see the module docstring). Use as a context manager, or call `close`."""

    def __init__(
        self,
        num_workers: int,
        initializer: Optional[Callable[..., None]] = None,
        initargs: tuple = (),
        window: Optional[int] = None,
        local_below: int = 4,
    ) -> None:
        self.num_workers = num_workers
        self.initializer = initializer
        self.initargs = initargs
        self.window = max(window or 2 * num_workers, local_below + 1)
        """Tasks in flight at most (read ahead of the results being consumed)."""
        self.local_below = local_below
        """Jobs of at most this many tasks run in the calling process."""
        self._executor: Optional[ProcessPoolExecutor] = None
        self._local_ready = False
        self._started = False

    def _local(self, fn: Callable[[T], R], task: T) -> R:
        if not self._local_ready and self.initializer is not None:
            self.initializer(*self.initargs)
        self._local_ready = True
        return fn(task)

    @property
    def started(self) -> bool:
        """Whether worker processes were started (rather than everything running in this process)."""
        return self._started

    def _start(self) -> ProcessPoolExecutor:
        self._started = True
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                max_workers=self.num_workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_start,
                initargs=(os.getpid(), self.initializer, self.initargs),
            )
        return self._executor

    def imap(self, fn: Callable[[T], R], tasks: Iterable[T]) -> Iterator[R]:
        """fn(task) for every task, in order. `fn` must be a module-level function (it is pickled)."""
        it = iter(tasks)
        # Peek: a job of at most `local_below` tasks runs here, since starting processes (each imports the
        # main module again under 'spawn') would cost more than it saves.
        ahead: list[T] = []
        if self.num_workers > 0:
            while len(ahead) <= self.local_below:
                task = next(it, _END)
                if task is _END:
                    break
                ahead.append(task)  # type: ignore[arg-type]
        if self.num_workers == 0 or len(ahead) <= self.local_below:
            for task in itertools.chain(ahead, it):
                yield self._local(fn, task)
            return

        executor = self._start()
        pending: deque[Future] = deque(executor.submit(fn, task) for task in ahead)
        exhausted = False
        try:
            while pending:
                while not exhausted and len(pending) < self.window:
                    task = next(it, _END)
                    if task is _END:
                        exhausted = True
                    else:
                        pending.append(executor.submit(fn, task))
                future = pending.popleft()
                try:
                    result = future.result()
                except BrokenProcessPool as e:
                    raise RuntimeError(
                        "a worker process died: killed or out of memory (run again, finished work units are "
                        "kept; lower data.num_workers or data.chunk_chars if memory is short), or it could not "
                        "start: workers are started with 'spawn', so a script that runs the pipeline must do "
                        "so under `if __name__ == '__main__':` (or use data.num_workers=0)."
                    ) from e
                yield result
        finally:
            for future in pending:
                future.cancel()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
