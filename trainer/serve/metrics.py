"""The server's counters, gauges and histograms, exposed at GET /metrics in Prometheus' text format (0.0.4).

A few dozen lines instead of a dependency: the scheduler thread updates them under one lock, the
/metrics handler renders them. Names follow Prometheus conventions (`_total` counters, `_seconds`
histograms with cumulative `_bucket{le=...}`, `_sum`, `_count`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

# Latency buckets in seconds, from a fast GPU step to a long CPU queue wait.
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)  # fmt: skip
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)  # fmt: skip

Labels = tuple[tuple[str, str], ...]


def _labels(labels: Labels, extra: str = "") -> str:
    parts = [f'{k}="{_escape(v)}"' for k, v in labels] + ([extra] if extra else [])
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class Metric:
    def __init__(self, name: str, help: str, kind: str, lock: threading.Lock) -> None:
        self.name, self.help, self.kind, self._lock = name, help, kind, lock

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(Metric):
    """A count that only grows, per label set (e.g. requests by outcome)."""

    def __init__(self, name: str, help: str, lock: threading.Lock, kind: str = "counter") -> None:
        super().__init__(name, help, kind, lock)
        self._values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> list[str]:
        values = self._values or {(): 0.0}
        return self.header() + [f"{self.name}{_labels(k)} {_number(v)}" for k, v in sorted(values.items())]


class Gauge(Counter):
    """A value that goes up and down (queue depth, slots in use)."""

    def __init__(self, name: str, help: str, lock: threading.Lock) -> None:
        super().__init__(name, help, lock, kind="gauge")

    def set(self, value: float, **labels: str) -> None:
        with self._lock:
            self._values[tuple(sorted(labels.items()))] = float(value)


class Histogram(Metric):
    def __init__(self, name: str, help: str, buckets: Sequence[float], lock: threading.Lock) -> None:
        super().__init__(name, help, "histogram", lock)
        self.buckets = tuple(buckets) + (math.inf,)
        self._counts = [0] * len(self.buckets)
        self._sum = 0.0
        self._count = 0

    def observe(self, seconds: float) -> None:
        with self._lock:
            for i, bound in enumerate(self.buckets):
                if seconds <= bound:
                    self._counts[i] += 1
                    break
            self._sum += seconds
            self._count += 1

    def render(self) -> list[str]:
        lines, cumulative = self.header(), 0
        for bound, n in zip(self.buckets, self._counts):
            cumulative += n
            lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {cumulative}')
        lines += [f"{self.name}_sum {_number(self._sum)}", f"{self.name}_count {self._count}"]
        return lines


class ServeMetrics:
    """Everything GET /metrics shows."""

    def __init__(self, slots: int) -> None:
        lock = self._lock = threading.Lock()
        self.requests = Counter(
            "forge_requests_total", "HTTP requests to the API, by endpoint and status code.", lock
        )
        self.finished = Counter(
            "forge_requests_finished_total",
            "Generations ended, by reason: stop (EOS or a stop string), length, cancelled (the client "
            "went away), error.",
            lock,
        )
        self.prompt_tokens = Counter("forge_prompt_tokens_total", "Prompt tokens prefilled.", lock)
        self.generation_tokens = Counter("forge_generation_tokens_total", "Tokens generated.", lock)
        self.decode_steps = Counter("forge_decode_steps_total", "Batched decode steps run.", lock)
        self.waiting = Gauge("forge_requests_waiting", "Requests queued for a free slot.", lock)
        self.running = Gauge("forge_requests_running", "Requests holding a slot of the running batch.", lock)
        self.slots = Gauge("forge_slots", "Slots of the running batch (--max-batch).", lock)
        self.ttft = Histogram(
            "forge_time_to_first_token_seconds",
            "From a request's arrival to its first generated token.",
            TTFT_BUCKETS,
            lock,
        )
        self.itl = Histogram(
            "forge_inter_token_latency_seconds",
            "Between two consecutive generated tokens of one request.",
            ITL_BUCKETS,
            lock,
        )
        self.slots.set(slots)
        self.waiting.set(0)
        self.running.set(0)

    async def render_async(self) -> str:
        """render() for the /metrics handler (bridge.RemoteMetrics has to ask another process)."""
        return self.render()

    def render(self) -> str:
        metrics = (
            self.requests, self.finished, self.prompt_tokens, self.generation_tokens, self.decode_steps,
            self.waiting, self.running, self.slots, self.ttft, self.itl,
        )  # fmt: skip
        with self._lock:
            return "\n".join(line for m in metrics for line in m.render()) + "\n"
