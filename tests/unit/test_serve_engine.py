"""Continuous batching below the HTTP layer: the per-slot cache and decode step, and the scheduler loop.

Requests join a running batch at different steps, in different rows, and leave when done; every one gets
exactly the greedy tokens `Generator.generate` gives its prompt alone, for plain causal attention, ring-
buffer sliding windows with soft-capping (Gemma 2/3) and MoE. A row's logits do not depend on the other
rows of its step (bitwise). The scheduler survives a request that fails, drops cancelled ones, and refuses
work beyond its queue.
"""

from __future__ import annotations

import queue

import pytest
import torch

from forge_lm.data.tokenizer import load_tokenizer
from forge_lm.trainer.inference import Generator
from forge_lm.trainer.inference.slots import SlotDecoder
from forge_lm.trainer.serve.metrics import ServeMetrics
from forge_lm.trainer.serve.scheduler import Event, GenerationRequest, QueueFull, Scheduler
from tests.unit.test_inference import prompts, tiny


def run_staggered(decoder: SlotDecoder, batch: list[list[int]], n: int, every: int = 3) -> list[list[int]]:
    """Greedy decoding where prompt i arrives at step every*i and takes the lowest free row."""
    rows: list = [None] * decoder.slots
    out: dict[int, list[int]] = {i: [] for i in range(len(batch))}
    pending, step = list(range(len(batch))), 0
    with torch.no_grad():
        while pending or any(r is not None for r in rows):
            for r in range(decoder.slots):
                if rows[r] is None and pending and step >= every * pending[0]:
                    i = pending.pop(0)
                    token = int(decoder.prefill(r, batch[i]).argmax())
                    out[i].append(token)
                    rows[r] = [i, len(batch[i]), token] if n > 1 else None
            busy = [r for r in range(decoder.slots) if rows[r] is not None]
            if busy:
                width = busy[-1] + 1
                tokens = [rows[r][2] if rows[r] else 0 for r in range(width)]
                positions = [rows[r][1] if rows[r] else 0 for r in range(width)]
                logits = decoder.decode(tokens, positions)
                for r in busy:
                    i, token = rows[r][0], int(logits[r].argmax())
                    out[i].append(token)
                    rows[r] = [i, rows[r][1] + 1, token] if len(out[i]) < n else None
            step += 1
    return [out[i] for i in range(len(batch))]


@pytest.mark.parametrize("family", ["llama3", "gemma2", "qwen3_moe"])
def test_requests_joining_and_leaving_get_their_solo_greedy_tokens(family: str) -> None:
    model = tiny(family)  # gemma2: soft-capping, and windows of 8 tokens that the ring buffers wrap
    batch = prompts((5, 11, 2, 7, 9))
    solo = [Generator(model).generate([p], 16)[0].token_ids for p in batch]
    got = run_staggered(SlotDecoder(model, slots=3, max_len=128), batch, 16)
    assert got == solo
    assert len({t for ids in got for t in ids}) > 5


def test_a_rows_logits_do_not_depend_on_the_other_rows() -> None:
    model = tiny("llama3")
    decoder = SlotDecoder(model, slots=4, max_len=128)
    a, b, c = prompts((6, 9, 4))
    decoder.prefill(0, a)
    alone = decoder.decode([7, 0, 0, 0], [len(a), 0, 0, 0])[0]  # a 4-row step with row 0 alone
    decoder.prefill(0, a)
    decoder.prefill(1, b)
    decoder.prefill(3, c)
    beside = decoder.decode([7, 3, 0, 11], [len(a), len(b), 0, len(c)])[0]
    assert torch.equal(alone, beside)


def test_decode_steps_take_a_few_fixed_shapes() -> None:
    model = tiny("llama3")
    decoder = SlotDecoder(model, slots=8, max_len=128)
    seen = []
    step = decoder._step
    decoder._step = lambda ids: (seen.append((ids.shape[0], decoder.cache.keys)), step(ids))[1]
    decoder.prefill(0, [1, 2, 3])
    for width, pos in ((1, 3), (2, 3), (3, 70), (5, 3), (8, 100)):
        decoder.decode([1] * width, [pos] * width)
    assert seen == [(1, 64), (2, 64), (4, 128), (8, 64), (8, 128)]
    with pytest.raises(ValueError, match="longer than the model's context"):
        SlotDecoder(model, max_len=4096)


@pytest.fixture(scope="module")
def gpt2_model(gpt2_dir):
    from forge_lm.trainer.model import Decoder
    from forge_lm.trainer.model.families import preset

    tokenizer = load_tokenizer(gpt2_dir)
    cfg = preset("llama3_tiny", vocab_size=tokenizer.vocab_size, d_model=64, n_layers=2, n_heads=4,
                 n_kv_heads=2, max_seq_len=128, init_std=0.3)  # fmt: skip
    return Decoder.build(cfg, seed=0).eval(), tokenizer


def _request(ids: list[int], n: int, events: queue.Queue) -> GenerationRequest:
    return GenerationRequest(ids, n, emit=events.put)


def _collect(events: queue.Queue, timeout: float = 30.0) -> list[Event]:
    out = []
    while not out or out[-1].finish_reason is None:
        out.append(events.get(timeout=timeout))
    return out


def test_the_scheduler_survives_a_failing_request_and_drops_cancelled_ones(gpt2_model) -> None:
    model, tokenizer = gpt2_model
    metrics = ServeMetrics(2)
    scheduler = Scheduler(SlotDecoder(model, slots=2, max_len=128), tokenizer, metrics, queue_size=2)
    scheduler.start()
    try:
        ids = tokenizer.encode("ROMEO: But soft")
        good, bad, gone = queue.Queue(), queue.Queue(), queue.Queue()
        broken = _request([1, 2, 10**9], 4, bad)  # an id no embedding has: the prefill raises
        scheduler.submit(broken)
        [event] = _collect(bad)
        assert event.finish_reason == "error" and "prefill failed" in event.error
        cancelled = _request(ids, 100, gone)
        cancelled.cancelled = True  # gone before it got a slot
        scheduler.submit(cancelled)
        request = _request(ids, 12, good)
        scheduler.submit(request)
        events = _collect(good)
        want = Generator(model).generate([ids], 12, tokenizer=tokenizer)[0]
        assert [t for e in events for t in e.token_ids] == want.token_ids
        assert "".join(e.text for e in events) == want.text
        assert events[-1].finish_reason == "length" and events[-1].completion_tokens == 12
        assert scheduler.alive
        assert metrics.finished.value(reason="error") == 1 and metrics.finished.value(reason="cancelled") == 1
        assert gone.empty()
    finally:
        scheduler.stop()


def test_the_queue_is_bounded(gpt2_model) -> None:
    model, tokenizer = gpt2_model
    scheduler = Scheduler(SlotDecoder(model, slots=1, max_len=128), tokenizer, ServeMetrics(1), queue_size=1)
    # Not started: nothing is admitted, so the free slot and the queue's one place fill up.
    scheduler.submit(_request([1], 1, queue.Queue()))
    scheduler.submit(_request([1], 1, queue.Queue()))
    with pytest.raises(QueueFull):
        scheduler.submit(_request([1], 1, queue.Queue()))
    scheduler.start()
    scheduler.stop()
    assert not scheduler.alive


@pytest.mark.slow
def test_the_compiled_decode_step_gives_the_same_tokens() -> None:
    """Compiled (one graph per row bucket, keys over the whole cache) against the solo Generator."""
    model = tiny("llama3")
    batch = prompts((5, 11, 2, 7, 9))
    solo = [Generator(model).generate([p], 12)[0].token_ids for p in batch]
    assert run_staggered(SlotDecoder(model, slots=4, max_len=128, compile=True), batch, 12) == solo
