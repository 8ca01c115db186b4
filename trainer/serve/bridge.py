"""`forge serve` in two processes: the model's generation loop in one, HTTP in another, a pipe between them.

    model process (the one that loaded the model)          HTTP process (spawned)
      main thread:   Scheduler.run()  --- events --->        uvicorn's event loop: the FastAPI app,
      bridge thread: submit / cancel / count <--- requests --  a RemoteScheduler in place of the Scheduler

Why two processes: a decode step is hundreds of small PyTorch calls, and each gives up Python's GIL and
takes it back. With HTTP on a thread of the same process, every streamed token woke that thread, which
then held the GIL for its whole Python burst (event loop, response, JSON) while the decode step waited
for it between two operations; one streaming client got 0.76-0.85x the Generator's tokens/s on the
2-core VM, 0.92-0.98x with HTTP in its own process (docs/BENCHMARKS.md, `forge bench serve`). Servers
such as vLLM and SGLang keep their HTTP front end out of the model's process for the same reason. Here
the model's process pays one pickled message per token and nothing else; all per-request Python
(parsing, chat templates, tokenizing prompts, server-sent events) runs in the HTTP process.

Messages (tuples, pickled by multiprocessing's Connection; both ends are this program):
  HTTP -> model:  ("submit", GenerationRequest without its callback)  ("cancel", id)
                  ("count", endpoint, code)                            ("metrics",)
  model -> HTTP:  ("event", id, Event)  ("metrics", text)  ("failed", reason)  ("exit",)
The HTTP process alone submits, so it knows how many requests wait or run and answers 503 itself with
the scheduler's rule (waiting + running >= queue_size + slots). In-process serving (BackgroundServer:
tests, notebooks) keeps the model and HTTP in one process and does not use this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import signal
import socket
import threading
from collections import deque
from multiprocessing.connection import Connection
from typing import Any, Optional

from forge_lm.trainer.serve.metrics import ServeMetrics
from forge_lm.trainer.serve.scheduler import Event, GenerationRequest, QueueFull, Scheduler

logger = logging.getLogger(__name__)


# ---- the model's process ----------------------------------------------------------------------------------------


class SchedulerHost:
    """The model's side of the pipe: a thread turns the HTTP process's messages into Scheduler calls;
    events go back from the scheduler's thread. Thread-safe sending under one lock."""

    def __init__(self, scheduler: Scheduler, metrics: ServeMetrics, connection: Connection) -> None:
        self.scheduler, self.metrics, self.connection = scheduler, metrics, connection
        self._requests: dict[int, GenerationRequest] = {}
        self._send_lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name="forge-serve-bridge", daemon=True)
        self._closing = False
        self.http_lost = False
        """The HTTP process went away before it was told to (it crashed or was killed)."""

    def start(self) -> None:
        self._thread.start()

    def send(self, message: tuple) -> bool:
        """False when the HTTP process is gone."""
        try:
            with self._send_lock:
                self.connection.send(message)
            return True
        except (OSError, EOFError, ValueError):
            return False

    def close(self, failure: Optional[BaseException]) -> None:
        """The loop ended: tell the HTTP process why (if it failed) and that it should exit."""
        self._closing = True
        if failure is not None:
            self.send(("failed", f"the generation loop failed: {failure}"))
        self.send(("exit",))

    def _serve(self) -> None:
        try:
            while True:
                message = self.connection.recv()
                kind = message[0]
                if kind == "submit":
                    self._submit(message[1])
                elif kind == "cancel":
                    request = self._requests.get(message[1])
                    if request is not None:
                        self.scheduler.cancel(request)
                elif kind == "count":
                    self.metrics.requests.inc(endpoint=message[1], code=message[2])
                elif kind == "metrics":
                    self.send(("metrics", self.metrics.render()))
        except (EOFError, OSError):  # the HTTP process is gone: nobody is left to serve
            self.http_lost = not self._closing
        self.scheduler.stop()

    def _submit(self, request: GenerationRequest) -> None:
        rid = request.id

        def emit(event: Event) -> None:
            if event.finish_reason is not None:
                self._requests.pop(rid, None)
            if not self.send(("event", rid, event)):
                raise BrokenPipeError("the HTTP process is gone")  # the scheduler cancels the request

        request.emit = emit
        self._requests[rid] = request
        try:
            self.scheduler.submit(request)
        except QueueFull as e:  # the HTTP process counts the same way, so this is a race at most
            emit(Event("", [], "error", len(request.prompt_ids), 0, f"the server is overloaded ({e})"))


def serve_in_two_processes(
    scheduler: Scheduler, metrics: ServeMetrics, front: dict[str, Any], sock: socket.socket, log_level: str
) -> Optional[str]:
    """Run the generation loop on this thread and HTTP in a spawned process on `sock` until SIGINT/SIGTERM
    (or the HTTP process dies). `front`: what the HTTP process needs to build its Engine (app.py).
    Returns None after a clean stop, else what went wrong, in one line."""
    context = multiprocessing.get_context("spawn")  # fork would copy OpenMP and tokenizer thread pools
    here, there = context.Pipe()
    worker = context.Process(
        target=http_process, args=(front, sock, there, log_level), name="forge-serve-http", daemon=True
    )
    worker.start()
    there.close()
    host = SchedulerHost(scheduler, metrics, here)
    host.start()

    def stop(signum: int, frame: object) -> None:
        scheduler.stop()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    try:
        scheduler.run()  # ends streams in flight with an error event when stopped
    finally:
        host.close(scheduler.failure)
        worker.join(15)
        if worker.is_alive():
            worker.terminate()
            worker.join(5)
        here.close()
    if scheduler.failure is not None:
        return f"the generation loop failed: {scheduler.failure}"
    if host.http_lost:
        return f"the HTTP process ended unexpectedly (exit code {worker.exitcode}); the server stopped"
    return None


# ---- the HTTP process -------------------------------------------------------------------------------------------


def http_process(front: dict[str, Any], sock: socket.socket, connection: Connection, log_level: str) -> None:
    """The spawned process: the FastAPI app under uvicorn on `sock`, its scheduler across the pipe."""
    import logging as _logging

    from forge_lm.trainer.serve.app import Engine
    from forge_lm.trainer.serve.server import uvicorn_server

    _logging.basicConfig(
        level=getattr(_logging, log_level.upper()), format="%(levelname)s %(name)s: %(message)s"
    )
    # Ctrl-C reaches the whole process group: the model's process decides when to stop (it ends the
    # streams first, then sends "exit"), so this one ignores the signals and waits for that.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    remote = RemoteScheduler(
        connection, slots=front["config"].max_batch, queue_size=front["config"].queue_size
    )
    engine = Engine.front_end(scheduler=remote, metrics=RemoteMetrics(remote), **front)
    server = uvicorn_server(engine, log_level)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]  # see above
    remote.on_exit = lambda: setattr(server, "should_exit", True)
    server.run(sockets=[sock])


class RemoteScheduler:
    """What the app needs of a Scheduler (submit, cancel, alive, failure), across the pipe. Lives on the
    HTTP process's event loop: start() (the app's lifespan) begins reading the pipe there."""

    emits_on_loop = True
    """Events are delivered on the event loop's own thread (the app skips call_soon_threadsafe)."""

    def __init__(self, connection: Connection, slots: int, queue_size: int) -> None:
        self.connection, self.slots, self.queue_size = connection, slots, queue_size
        self._requests: dict[int, GenerationRequest] = {}
        self._metrics_replies: deque[asyncio.Future[str]] = deque()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self.failure: Optional[str] = None
        self.on_exit = lambda: None

    # ---- the Scheduler's interface -----------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.connection.fileno(), self._read)

    def stop(self, timeout: float = 0.0) -> None:
        if self._loop is not None and not self.connection.closed:
            self._loop.remove_reader(self.connection.fileno())

    @property
    def alive(self) -> bool:
        return self.failure is None and not self.connection.closed

    def submit(self, request: GenerationRequest) -> None:
        if len(self._requests) >= self.queue_size + self.slots:
            waiting = len(self._requests) - self.slots
            raise QueueFull(f"{waiting} requests are already waiting for a slot")
        if not self.alive:
            raise RuntimeError(self.failure or "the model's process is gone")
        emit = request.emit
        request.emit = _no_sink  # the callback stays here; the rest of the request crosses the pipe
        try:
            self.connection.send(("submit", request))
        finally:
            request.emit = emit
        self._requests[request.id] = request

    def cancel(self, request: GenerationRequest) -> None:
        if not request.cancelled:
            request.cancelled = True
            if request.id in self._requests and not self.connection.closed:
                self.connection.send(("cancel", request.id))

    # ---- what else crosses -------------------------------------------------------------------------------

    def count_request(self, endpoint: str, code: str) -> None:
        if not self.connection.closed:
            self.connection.send(("count", endpoint, code))

    async def metrics_text(self) -> str:
        reply: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._metrics_replies.append(reply)
        self.connection.send(("metrics",))
        return await asyncio.wait_for(reply, 10)

    def _read(self) -> None:
        try:
            while not self.connection.closed and self.connection.poll():
                self._handle(self.connection.recv())
        except (EOFError, OSError):
            self._gone("the model's process is gone")

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "event":
            _, rid, event = message
            request = self._requests.get(rid)
            if request is None:
                return
            if event.finish_reason is not None:
                del self._requests[rid]
            request.emit(event)
        elif kind == "metrics":
            reply = self._metrics_replies.popleft()
            if not reply.done():
                reply.set_result(message[1])
        elif kind == "failed":
            self.failure = message[1]
        elif kind == "exit":
            self._gone("the server is shutting down")

    def _gone(self, reason: str) -> None:
        """No more events will come: end every request still open, and the server."""
        if self.connection.closed:
            return
        if self._loop is not None:
            self._loop.remove_reader(self.connection.fileno())
        for request in list(self._requests.values()):
            request.emit(Event("", [], "error", len(request.prompt_ids), request.generated, reason))
        self._requests.clear()
        if self.failure is None:
            self.failure = reason
        self.connection.close()
        self.on_exit()


class RemoteMetrics:
    """The app's view of ServeMetrics across the pipe: request counts go to the model's process, which
    renders the whole text (its scheduler updates everything else)."""

    def __init__(self, remote: RemoteScheduler) -> None:
        self.requests = _ForwardedCounter(remote)
        self._remote = remote

    async def render_async(self) -> str:
        return await self._remote.metrics_text()


class _ForwardedCounter:
    def __init__(self, remote: RemoteScheduler) -> None:
        self._remote = remote

    def inc(self, amount: float = 1.0, *, endpoint: str, code: str) -> None:
        self._remote.count_request(endpoint, code)


def _no_sink(event: Event) -> None:
    raise RuntimeError("a request's callback stays in the HTTP process")
