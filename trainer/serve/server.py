"""Running the app under uvicorn: in the foreground (`forge serve`: HTTP in a process beside the model's,
bridge.py) or on a background thread of this process (tests, a notebook).

    engine = Engine(ServeConfig(model="runs/quickstart/hf"), model, tokenizer, tokenizer_dir)
    with BackgroundServer(engine) as server:      # any free port on 127.0.0.1
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")

The listening socket is bound before uvicorn starts, so port 0 means "any free port" and the real one is
known (and printed) at once.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Optional

import uvicorn

from forge_lm.trainer.serve.app import Engine, create_app
from forge_lm.trainer.serve.bridge import serve_in_two_processes


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free one). OSError if the address is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    # Accepted connections inherit this: without it a response's header and body writes wait on the
    # client's delayed ACK (Nagle), adding ~40 ms to every request.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def uvicorn_server(engine: Engine, log_level: str = "warning") -> uvicorn.Server:
    config = uvicorn.Config(
        create_app(engine), log_level=log_level, access_log=log_level in ("debug", "info"),
        timeout_graceful_shutdown=5,
    )  # fmt: skip
    return uvicorn.Server(config)


def serve_forever(engine: Engine, sock: socket.socket, log_level: str = "warning") -> Optional[str]:
    """`forge serve` in the foreground: the model's generation loop on this (the main) thread, HTTP in a
    process of its own (bridge.py says why), until SIGINT or SIGTERM, which end the streams in flight.

    The model stays on the thread that loaded it. On a CPU, PyTorch's OpenMP gives every thread that runs
    parallel work a team of its own, and once the process has more OpenMP threads than cores they stop
    spinning between operations: a decode step on a second thread ran 2.8x slower than on the first
    (5.0 vs 1.8 ms per token, quickstart-size model, 2 cores). Returns None after a clean stop, else what
    ended the server, in one line.
    """
    return serve_in_two_processes(engine.scheduler, engine.metrics, engine.front, sock, log_level)


class BackgroundServer:
    """The server on a daemon thread, listening on host:port (default: a free loopback port)."""

    def __init__(
        self, engine: Engine, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"
    ) -> None:
        self.engine = engine
        self.socket = bind(host, port)
        self.url = url_of(self.socket)
        self.server = uvicorn_server(engine, log_level)
        self._thread: Optional[threading.Thread] = None

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, name="forge-serve-http", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server at {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self.socket.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
