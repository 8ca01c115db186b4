"""Continuous batching: one thread owns the model and interleaves requests step by step.

    scheduler = Scheduler(SlotDecoder(model, slots=16), tokenizer, metrics, queue_size=64)
    scheduler.start()                  # its own thread; or scheduler.run() on this one (forge serve)
    request = GenerationRequest(prompt_ids, max_tokens=64, sampling=SamplingParams(), emit=callback)
    scheduler.submit(request)          # QueueFull when queue_size requests already wait
    ...                                # callback(Event(...)) from the scheduler thread, piece by piece
    scheduler.cancel(request)          # the client went away: its slot is freed before the next step

The loop, forever:
  1. drop what was cancelled: a running request frees its slot, a waiting one leaves the queue;
  2. admit: prefill waiting requests, oldest first, into free slots (lowest row first), each by itself,
     until the slots or this round's prompt-token budget (max_prefill_tokens, at least one request) run
     out; each prefill yields its request's first token;
  3. decode: one step for every running request at once (trainer/inference/slots.py); each gets its next
     token; a request that reached EOS, a stop string or max_tokens leaves and frees its slot.
With nothing to do it sleeps until a request arrives. Every request sees only its own row, so the greedy
tokens of a request do not depend on what runs beside it.

Sampling is per request: greedy rows take the argmax; a sampled row draws from its own torch.Generator
seeded by the request's seed, with the Generator's own `next_tokens`, so the same seed gives the same
tokens as `Generator.generate` for that prompt alone.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

from forge_lm.data.tokenizer import Tokenizer
from forge_lm.trainer.inference.sampling import SamplingParams, next_tokens
from forge_lm.trainer.inference.slots import SlotDecoder
from forge_lm.trainer.serve.metrics import ServeMetrics
from forge_lm.trainer.serve.textstream import TextStream

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """Every slot is busy and queue_size requests already wait."""


@dataclass
class Event:
    """What a request receives from the scheduler thread, in order: pieces of text, then one final event."""

    text: str
    """New text since the previous event (may be "")."""
    token_ids: list[int]
    """New token ids since the previous event."""
    finish_reason: Optional[str] = None
    """Set on the final event: "stop" (EOS or a stop string), "length" (max_tokens), "cancelled", "error"."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Optional[str] = None
    """What went wrong, when finish_reason is "error"."""


_ids = itertools.count()


@dataclass(eq=False)
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    """New tokens at most; prompt + max_tokens must fit the decoder's max_len (checked by the caller)."""
    emit: Callable[[Event], None]
    """Called from the scheduler thread with each Event; must not block."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: Sequence[str] = ()
    """Stop strings: the reply ends before the first of them."""
    eos_ids: frozenset[int] = frozenset()
    """Token ids that end the reply (not part of its text)."""
    id: int = field(default_factory=lambda: next(_ids))
    # Set by the scheduler:
    cancelled: bool = False
    arrival: float = 0.0
    last_token_time: float = 0.0
    generated: int = 0


class _Running:
    """A request in a slot: its reply so far and its sampler."""

    def __init__(self, request: GenerationRequest, tokenizer: Tokenizer, device: torch.device) -> None:
        self.request = request
        self.text = TextStream(tokenizer, request.stop)
        self.generator: Optional[torch.Generator] = None
        if not request.sampling.greedy:
            self.generator = torch.Generator(device=device).manual_seed(request.sampling.seed)
        self.position = len(request.prompt_ids)  # where its next token is written
        self.last_token = 0


class Scheduler:
    def __init__(
        self,
        decoder: SlotDecoder,
        tokenizer: Tokenizer,
        metrics: ServeMetrics,
        queue_size: int = 64,
        max_prefill_tokens: int = 2048,
    ) -> None:
        self.decoder, self.tokenizer, self.metrics = decoder, tokenizer, metrics
        self.queue_size, self.max_prefill_tokens = queue_size, max_prefill_tokens
        self._rows: list[Optional[_Running]] = [None] * decoder.slots
        self._waiting: deque[GenerationRequest] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self._running_here = False
        self.failure: Optional[BaseException] = None
        """Set if the loop itself died (then /health reports it)."""

    # ---- called from other threads ---------------------------------------------------------------------------

    def start(self) -> None:
        """Run the loop on a thread of its own (tests, notebooks: the caller keeps its thread)."""
        self._thread = threading.Thread(target=self._loop, name="forge-serve-scheduler", daemon=True)
        self._thread.start()

    def run(self) -> None:
        """Run the loop on the calling thread until `stop()` (`forge serve`: the main thread, which loaded
        the model; see trainer/serve/server.py for why the model stays on that thread)."""
        self._loop()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        running = self._running_here or (self._thread is not None and self._thread.is_alive())
        return running and self.failure is None

    def submit(self, request: GenerationRequest) -> None:
        """Queue `request`; raises QueueFull when queue_size requests already wait for a slot."""
        with self._wake:
            # Requests about to take a free slot do not count against the queue.
            if len(self._waiting) >= self.queue_size + self._rows.count(None):
                raise QueueFull(f"{len(self._waiting)} requests are already waiting for a slot")
            request.arrival = time.monotonic()
            self._waiting.append(request)
            self.metrics.waiting.set(len(self._waiting))
            self._wake.notify()

    def cancel(self, request: GenerationRequest) -> None:
        """Stop generating for `request` (idempotent; a finished request is left as it is)."""
        if not request.cancelled:
            request.cancelled = True
            with self._wake:
                self._wake.notify()

    # ---- the scheduler thread --------------------------------------------------------------------------------

    def _loop(self) -> None:
        self._running_here = True
        try:
            while True:
                with self._wake:
                    while not self._stopping and not self._waiting and not any(self._rows):
                        self._wake.wait()
                    if self._stopping:
                        break
                self._drop_cancelled()
                self._admit()
                if any(self._rows):
                    self._decode()
        except BaseException as e:  # the loop must never die silently: /health turns unhealthy
            logger.exception("the scheduler loop failed")
            self.failure = e
            for row, running in enumerate(self._rows):
                if running is not None:
                    self._finish(row, "error", error=f"the server's generation loop failed: {e}")
            raise
        finally:
            self._running_here = False
            for row, running in enumerate(self._rows):  # streams in flight end now, not at HTTP's timeout
                if running is not None:
                    self._finish(row, "error", error="the server is shutting down")
            for request in self._take_waiting():
                request.emit(
                    Event("", [], "error", len(request.prompt_ids), 0, "the server is shutting down")
                )

    def _take_waiting(self) -> list[GenerationRequest]:
        with self._wake:
            taken = list(self._waiting)
            self._waiting.clear()
            self.metrics.waiting.set(0)
        return taken

    def _drop_cancelled(self) -> None:
        for row, running in enumerate(self._rows):
            if running is not None and running.request.cancelled:
                self._finish(row, "cancelled")
        with self._wake:
            if any(r.cancelled for r in self._waiting):
                kept = [r for r in self._waiting if not r.cancelled]
                for request in self._waiting:
                    if request.cancelled:
                        self.metrics.finished.inc(reason="cancelled")
                self._waiting = deque(kept)
                self.metrics.waiting.set(len(self._waiting))

    def _admit(self) -> None:
        budget = self.max_prefill_tokens
        admitted = 0
        while None in self._rows:
            with self._wake:
                if not self._waiting:
                    return
                request = self._waiting[0]
                if admitted and len(request.prompt_ids) > budget:
                    return  # the rest waits for the next round: the running streams go on first
                self._waiting.popleft()
                self.metrics.waiting.set(len(self._waiting))
            if request.cancelled:
                self.metrics.finished.inc(reason="cancelled")
                continue
            row = self._rows.index(None)
            running = _Running(request, self.tokenizer, self.decoder.device)
            self._rows[row] = running
            self.metrics.running.set(self._busy())
            budget -= len(request.prompt_ids)
            admitted += 1
            try:
                logits = self.decoder.prefill(row, request.prompt_ids)
                token = self._sample(logits[None], [running])[0]
            except Exception as e:  # one bad request must not stop the others
                logger.exception("prefill failed")
                self._finish(row, "error", error=f"prefill failed: {e}")
                continue
            self.metrics.prompt_tokens.inc(len(request.prompt_ids))
            self._accept(row, token)

    def _decode(self) -> None:
        busy = [row for row, running in enumerate(self._rows) if running is not None]
        width = busy[-1] + 1
        tokens = [0] * width
        positions = [0] * width
        for row in busy:
            tokens[row] = self._rows[row].last_token
            positions[row] = self._rows[row].position
        try:
            logits = self.decoder.decode(tokens, positions)
            chosen = self._sample(logits, [self._rows[row] for row in range(width)])
        except Exception as e:
            logger.exception("decode step failed")
            for row in busy:
                self._finish(row, "error", error=f"decode step failed: {e}")
            return
        self.metrics.decode_steps.inc()
        for row in busy:
            self._rows[row].position += 1
            self._accept(row, chosen[row])

    def _sample(self, logits: torch.Tensor, rows: Sequence[Optional[_Running]]) -> list[int]:
        """Each row's next token: the argmax for greedy requests (and free rows), else a seeded draw."""
        chosen = logits.argmax(dim=-1)
        for i, running in enumerate(rows):
            if running is not None and running.generator is not None:
                chosen[i] = next_tokens(logits[i : i + 1], running.request.sampling, running.generator)[0]
        return chosen.tolist()

    def _accept(self, row: int, token: int) -> None:
        """Hand `token` to the request in `row`; finish it if it ended."""
        running = self._rows[row]
        request = running.request
        now = time.monotonic()
        if request.generated == 0:
            self.metrics.ttft.observe(now - request.arrival)
        else:
            self.metrics.itl.observe(now - request.last_token_time)
        request.last_token_time = now
        request.generated += 1
        running.last_token = token
        self.metrics.generation_tokens.inc()
        if token in request.eos_ids:
            self._finish(row, "stop", [token])
            return
        piece = running.text.push(token)
        if running.text.stopped:
            self._finish(row, "stop", [token], piece)
        elif request.generated >= request.max_tokens:
            self._finish(row, "length", [token], piece)
        else:
            self._emit(request, Event(piece, [token]))

    def _finish(
        self,
        row: int,
        reason: str,
        token_ids: Sequence[int] = (),
        piece: str = "",
        error: Optional[str] = None,
    ) -> None:
        running = self._rows[row]
        self._rows[row] = None
        self.metrics.running.set(self._busy())
        self.metrics.finished.inc(reason=reason)
        request = running.request
        if reason in ("stop", "length") and not running.text.stopped:
            piece += running.text.finish()
        event = Event(piece, list(token_ids), reason, len(request.prompt_ids), request.generated, error)
        self._emit(request, event)

    def _emit(self, request: GenerationRequest, event: Event) -> None:
        try:
            request.emit(event)
        except Exception:  # e.g. the event loop of a client that already went away is closed
            logger.debug("could not deliver an event to request %s", request.id, exc_info=True)
            request.cancelled = True

    def _busy(self) -> int:
        return sum(r is not None for r in self._rows)
