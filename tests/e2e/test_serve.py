"""`forge serve` through the official `openai` client against a real uvicorn server on 127.0.0.1.

The model is a tiny random Llama with GPT-2's real tokenizer, saved as a Hugging Face folder. Greedy
replies are compared token for token with `Generator.generate` on the same prompt alone: for completions
and chat, streamed or not, and for 32 concurrent streaming clients sharing 8 slots (requests join and
leave the running batch between steps). Also: a client that disconnects frees its slot (seen in /metrics),
bad requests get OpenAI-style 4xx bodies naming the field, the API key is enforced, a full queue answers
503 with Retry-After, and the command line refuses bad options in one line.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from forge_lm.trainer.inference import Generator, SamplingParams
from tests.e2e.serve_helpers import NAME, CommandServer, engine, metric, metrics, serve, tiny_hf_folder

GREEDY = SamplingParams()
PROMPTS = [
    "ROMEO: But soft, what light",
    "def main(",
    "To be, or not to be",
    "The quick brown fox",
    "import numpy as np\n",
    "Friends, Romans, countrymen",
    "Once upon a time",
    "HAMLET:",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_hf_folder(tmp_path_factory.mktemp("serve"))


# Each test runs against both ways of serving: the model and HTTP in one process (BackgroundServer), and
# `forge serve` itself, the model's process with HTTP in a process of its own (trainer/serve/bridge.py).
HOW = ["in-process", "command"]


@pytest.fixture(scope="module", params=HOW)
def server(folder, request):
    server = serve(folder, request.param, max_batch=8, queue_size=64)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(server):
    """The Generator on the served model itself, one prompt at a time."""
    eng = server.engine
    gen = Generator(eng.scheduler.decoder.model, max_batch_size=1)

    def greedy(ids: list[int], n: int, stop=(), sampling=GREEDY) -> tuple[list[int], str, str]:
        [c] = gen.generate([ids], n, sampling, eos_ids=sorted(eng.prompter.eos_ids), stop_strings=stop,
                           tokenizer=eng.tokenizer)  # fmt: skip
        reason = "length" if c.finish_reason == "length" else "stop"
        return c.token_ids, c.text, reason

    return greedy


def client(server, **kw) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{server.url}/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw
    )


def test_models_and_health(server) -> None:
    [model] = client(server).models.list().data
    assert model.id == NAME and model.owned_by == "forge-lm"
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_completions_equal_the_generator(server, reference) -> None:
    c = client(server)
    for prompt in PROMPTS[:3]:
        ids = server.engine.prompter.encode_prompt(prompt)
        want_ids, want_text, reason = reference(ids, 24)
        got = c.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0)
        assert got.choices[0].text == want_text
        assert got.choices[0].finish_reason == reason == "length"
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(ids), len(want_ids))
        # Token ids as the prompt give the same reply.
        by_ids = c.completions.create(model=NAME, prompt=ids, max_tokens=24, temperature=0)
        assert by_ids.choices[0].text == want_text
        stream = c.completions.create(
            model=NAME, prompt=prompt, max_tokens=24, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = list(stream)
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want_text
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want_ids)
    assert len({t for t in want_ids}) > 5  # not a model that repeats one token


def test_chat_equals_the_generator_on_the_rendered_conversation(server, reference) -> None:
    messages = [
        {"role": "system", "content": "You speak in verse."},
        {"role": "user", "content": "Who goes there?"},
    ]
    assert not server.engine.prompter.has_own_template  # GPT-2 has none: the documented default
    rendered = "System: You speak in verse.\n\nUser: Who goes there?\n\nAssistant:"
    assert server.engine.prompter.render(messages) == rendered
    ids = server.engine.prompter.encode(rendered)
    want_ids, want_text, _ = reference(ids, 20)
    c = client(server)
    got = c.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want_text and got.choices[0].finish_reason == "length"
    assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == 20
    chunks = list(
        c.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want_text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings_cut_the_reply_as_the_generator_does(server, reference) -> None:
    prompt = PROMPTS[0]
    ids = server.engine.prompter.encode_prompt(prompt)
    _, free_text, _ = reference(ids, 24)
    stop = free_text[12:15]  # text that appears in the middle of the reply
    want_ids, want_text, reason = reference(ids, 24, stop=[stop])
    assert reason == "stop" and len(want_text) <= 12
    c = client(server)
    got = c.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0, stop=stop)
    assert (got.choices[0].text, got.choices[0].finish_reason) == (want_text, "stop")
    assert got.usage.completion_tokens == len(want_ids)
    stream = c.completions.create(
        model=NAME, prompt=prompt, max_tokens=24, temperature=0, stop=[stop], stream=True
    )
    pieces = [ch.choices[0].text for ch in stream]
    assert "".join(pieces) == want_text and stop not in "".join(pieces)


def test_sampling_is_seeded_like_the_generator(server, reference) -> None:
    prompt = PROMPTS[1]
    ids = server.engine.prompter.encode_prompt(prompt)
    hot = SamplingParams(temperature=1.3, top_p=0.9, seed=7)
    _, want_text, _ = reference(ids, 16, sampling=hot)
    c = client(server)
    texts = [
        c.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=1.3, top_p=0.9, seed=7)
        .choices[0].text for _ in range(2)
    ]  # fmt: skip
    assert texts == [want_text, want_text]
    other = c.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=1.3, top_p=0.9, seed=8)
    assert other.choices[0].text != want_text


def test_32_concurrent_streams_each_get_their_solo_greedy_reply(server, reference) -> None:
    """32 clients, 8 slots: requests queue, join the batch as others finish (lengths differ), and each
    reply is exactly the Generator's for its prompt alone."""
    jobs = [(PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)), 8 + (i * 7) % 29) for i in range(32)]
    want = []
    for prompt, n in jobs:
        _, text, _ = reference(server.engine.prompter.encode_prompt(prompt), n)
        want.append(text)
    steps_before = metric(server.url, "forge_decode_steps_total")
    tokens_before = metric(server.url, "forge_generation_tokens_total")

    async def one(c: openai.AsyncOpenAI, prompt: str, n: int) -> tuple[str, str]:
        stream = await c.completions.create(
            model=NAME, prompt=prompt, max_tokens=n, temperature=0, stream=True
        )
        pieces, reason = [], None
        async for chunk in stream:
            pieces.append(chunk.choices[0].text)
            reason = chunk.choices[0].finish_reason or reason
        return "".join(pieces), reason

    async def all_of_them():
        c = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        async with c:
            return await asyncio.gather(*(one(c, p, n) for p, n in jobs))

    got = asyncio.run(all_of_them())
    assert [text for text, _ in got] == want
    assert all(reason == "length" for _, reason in got)
    tokens = metric(server.url, "forge_generation_tokens_total") - tokens_before
    steps = metric(server.url, "forge_decode_steps_total") - steps_before
    assert tokens == sum(n for _, n in jobs)
    assert steps < tokens / 4  # decoded in batches, not one request at a time
    assert metric(server.url, "forge_requests_running") == 0


def _wait_for(condition, timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_a_client_that_disconnects_frees_its_slot(server) -> None:
    cancelled = metric(server.url, "forge_requests_finished_total", reason="cancelled")
    c = client(server)
    stream = c.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=200, temperature=0, stream=True)
    received = [next(iter(stream)) for _ in range(3)]
    assert len(received) == 3
    stream.close()  # the connection goes away mid-stream
    _wait_for(lambda: metric(server.url, "forge_requests_running") == 0, what="the slot to be freed")
    assert metric(server.url, "forge_requests_finished_total", reason="cancelled") == cancelled + 1
    produced = metric(server.url, "forge_generation_tokens_total")
    time.sleep(0.3)
    assert metric(server.url, "forge_generation_tokens_total") == produced  # no more compute spent on it


def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


BAD_REQUESTS = [
    # (endpoint, body, status, param, a word of the message)
    ("completions", {"prompt": "hi", "temperature": -0.5}, 400, "temperature", "greater than or equal to 0"),
    ("completions", {"prompt": "hi", "temperature": 2.5}, 400, "temperature", "less than or equal to 2"),
    ("completions", {"prompt": "hi", "top_p": 0}, 400, "top_p", "greater than 0"),
    ("completions", {"prompt": "hi", "top_p": 1.5}, 400, "top_p", "less than or equal to 1"),
    ("completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ("completions", {"prompt": "hi", "max_tokens": 500}, 400, "max_tokens", "maximum context length is 256"),
    ("completions", {"prompt": list(range(300)), "max_tokens": 1}, 400, "prompt", "maximum context length"),
    ("completions", {"prompt": [1, 2, 60000]}, 400, "prompt", "outside the model's vocabulary"),
    ("completions", {"prompt": "hi", "top_k": -5}, 400, "top_k", "greater than or equal to -1"),
    ("completions", {"prompt": "hi", "stop": ["", "x"]}, 400, "stop", "must not be empty"),
    ("completions", {"prompt": "hi", "n": 3}, 400, "n", "one choice"),
    ("completions", {"prompt": ["a", "b"]}, 400, "prompt", "one prompt per request"),
    ("completions", {"max_tokens": 4}, 400, "prompt", "Field required"),
    ("completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model", "does not exist"),
    ("chat/completions", {"messages": []}, 400, "messages", "at least 1 item"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role", "'user'"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000}, 400,
     "max_tokens", "maximum context length"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400,
     "temperature", "valid number"),
]  # fmt: skip


@pytest.mark.parametrize(
    "endpoint,body,status,param,words", BAD_REQUESTS, ids=[f"{b[0]}-{b[3]}" for b in BAD_REQUESTS]
)
def test_bad_requests_get_an_openai_error_naming_the_field(
    server, endpoint, body, status, param, words
) -> None:
    response = httpx.post(f"{server.url}/v1/{endpoint}", json={"model": NAME, **body}, timeout=10)
    assert response.status_code == status, response.text
    error = _error(response)
    assert error["param"] == param and words in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_malformed_bodies_and_unknown_paths_get_openai_errors_and_the_server_lives_on(server) -> None:
    url = f"{server.url}/v1/completions"
    for raw in (b'{"prompt": "hi", "max_tokens": ', b"not json at all", b"[1, 2, 3]"):
        response = httpx.post(url, content=raw, headers={"Content-Type": "application/json"}, timeout=10)
        assert response.status_code == 400, response.text
        assert "JSON" in _error(response)["message"] or "object" in _error(response)["message"]
    response = httpx.get(f"{server.url}/v1/nothing", timeout=10)
    assert response.status_code == 404 and "/v1/completions" in _error(response)["message"]
    # The official client sees the same errors as exceptions carrying the body.
    with pytest.raises(openai.BadRequestError) as e:
        client(server).completions.create(model=NAME, prompt="hi", temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as e:
        client(server).completions.create(model="nope", prompt="hi")
    assert e.value.body["code"] == "model_not_found"
    # Still serving.
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert (
        client(server).completions.create(model=NAME, prompt="hi", max_tokens=2).usage.completion_tokens == 2
    )
    counts = metrics(server.url)
    assert counts[("forge_requests_total", (("code", "400"), ("endpoint", "/v1/completions")))] >= 3


def test_metrics_are_valid_prometheus_text(server) -> None:
    samples = metrics(server.url)
    names = {name for name, _ in samples}
    for family in ("forge_time_to_first_token_seconds", "forge_inter_token_latency_seconds"):
        assert {f"{family}_bucket", f"{family}_sum", f"{family}_count"} <= names
        assert samples[(f"{family}_count", ())] > 0
        assert samples[(f"{family}_bucket", (("le", "+Inf"),))] == samples[(f"{family}_count", ())]
    assert samples[("forge_slots", ())] == 8 and samples[("forge_requests_waiting", ())] == 0
    assert samples[("forge_prompt_tokens_total", ())] > 0


@pytest.mark.parametrize("how", HOW)
def test_the_api_key_is_enforced(folder, how) -> None:
    server = serve(folder, how, api_key="s3cret", max_batch=2)
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            client(server, api_key="wrong").completions.create(model=NAME, prompt="hi", max_tokens=2)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        for path, method in (("/v1/models", "GET"), ("/v1/completions", "POST"), ("/metrics", "GET")):
            response = httpx.request(method, f"{server.url}{path}", content=b"{bad json", timeout=10)
            assert response.status_code == 401, path  # the key is checked before the body is read
            assert _error(response)["code"] == "invalid_api_key"
        assert httpx.get(f"{server.url}/health").status_code == 200  # open, for load balancers
        good = client(server, api_key="s3cret").completions.create(model=NAME, prompt="hi", max_tokens=2)
        assert good.usage.completion_tokens == 2
        auth = {"Authorization": "Bearer s3cret"}
        assert (
            metrics(server.url, auth)[
                ("forge_requests_total", (("code", "401"), ("endpoint", "/v1/completions")))
            ]
            == 2
        )
    finally:
        server.stop()


@pytest.mark.parametrize("how", HOW)
def test_a_full_queue_answers_503_with_retry_after(tmp_path, how) -> None:
    # A long context, so that the request holding the only slot takes a while on any machine.
    server = serve(tiny_hf_folder(tmp_path, max_seq_len=1024), how, max_batch=1, queue_size=1)
    try:
        c = client(server)
        running = c.completions.create(model=NAME, prompt="hi", max_tokens=1000, temperature=0, stream=True)
        next(iter(running))  # it holds the only slot
        waiting_result = {}
        waiter = threading.Thread(
            target=lambda: waiting_result.update(
                r=c.completions.create(model=NAME, prompt="hi", max_tokens=3, temperature=0)
            )
        )
        waiter.start()
        _wait_for(lambda: metric(server.url, "forge_requests_waiting") == 1, what="a request in the queue")
        response = httpx.post(
            f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10
        )
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        error = _error(response)
        assert error["type"] == "server_error" and error["code"] == "overloaded"
        running.close()  # the slot frees, the waiting request runs
        waiter.join(30)
        assert waiting_result["r"].usage.completion_tokens == 3
        assert metric(server.url, "forge_requests_total", code="503", endpoint="/v1/completions") == 1
        # A non-streaming client that gives up while queued is dropped from the queue.
        running = c.completions.create(model=NAME, prompt="hi", max_tokens=1000, temperature=0, stream=True)
        next(iter(running))
        cancelled = metric(server.url, "forge_requests_finished_total", reason="cancelled")
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=0.3)
        _wait_for(lambda: metric(server.url, "forge_requests_waiting") == 0, what="the queue to drop it")
        assert metric(server.url, "forge_requests_finished_total", reason="cancelled") == cancelled + 1
        running.close()
    finally:
        server.stop()


def test_the_command_line_refuses_bad_options_in_one_line(tmp_path, folder, capsys) -> None:
    from forge_lm.trainer.serve.__main__ import main

    for args, words in (
        ([str(tmp_path / "missing")], "does not exist"),
        ([str(folder), "--max-batch", "0"], "--max-batch=0: at least 1 slot"),
        ([str(folder), "--max-context", "5000"], "longer than the model's context of 256"),
        ([str(folder), "--dtype", "float16", "--device", "nodevice"], "not a torch device"),
        ([str(tmp_path)], "neither a Hugging Face folder"),
    ):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err


def test_engine_options_are_checked(folder) -> None:
    with pytest.raises(ValueError, match="--max-context=999 is longer than the model's context of 256"):
        engine(folder, max_context=999)
    json.dumps(engine(folder, max_batch=2).metrics.render())  # renders before any request


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_the_command_stops_cleanly_on_a_signal_mid_stream(folder, signame) -> None:
    """`forge serve` decodes in its own process and serves HTTP in another: SIGTERM or Ctrl-C while a reply
    streams stops both, ends the stream, and exits 0 within seconds."""
    import re
    import signal
    import subprocess
    import sys

    from tests.conftest import REPO

    process = subprocess.Popen(
        [sys.executable, "-m", "forge_lm.trainer.serve", str(folder), "--port", "0", "--model-name", NAME,
         "--log-level", "warning"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        url = None
        for line in process.stdout:
            match = re.search(r"listening on (http://\S+) ", line)
            if match:
                url = match.group(1)
                break
        assert url is not None, "forge serve did not start"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
        stream = client.completions.create(model=NAME, prompt="HAMLET:", max_tokens=200, stream=True)
        next(iter(stream))  # the reply has started
        start = time.monotonic()
        process.send_signal(getattr(signal, signame))
        assert process.wait(20) == 0
        assert time.monotonic() - start < 15
        with pytest.raises(openai.APIError, match="the server is shutting down"):
            for _ in stream:  # the rest of the stream: an error event, at once, not a hang until a timeout
                pass
        assert time.monotonic() - start < 15
    finally:
        if process.poll() is None:
            process.kill()


def _http_process(server: CommandServer) -> int:
    """The pid of the HTTP process `forge serve` spawned (its child running multiprocessing's spawn_main)."""
    pid = server.process.pid
    deadline = time.monotonic() + 20  # it is spawned after the "listening on" line
    while time.monotonic() < deadline:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        found = [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
        if found:
            [child] = found
            return child
        time.sleep(0.05)
    raise AssertionError("forge serve spawned no HTTP process")


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"  # a zombie has ended
    except FileNotFoundError:
        return True


def test_when_the_http_process_dies_the_server_ends_with_one_line(folder) -> None:
    server = CommandServer(folder, max_batch=2)
    try:
        c = client(server)
        assert c.completions.create(model=NAME, prompt="HAMLET:", max_tokens=4).usage.completion_tokens == 4
        os.kill(_http_process(server), signal.SIGKILL)
        assert server.process.wait(20) == 1
        time.sleep(0.2)  # the output reader thread catches up
        last = [line for line in server.output if line.strip()][-1]
        assert last.startswith("forge serve: the HTTP process ended unexpectedly (exit code -9)"), last
    finally:
        if server.process.poll() is None:
            server.process.kill()


def test_when_the_models_process_dies_the_http_process_ends_too(folder) -> None:
    server = CommandServer(folder, max_batch=2)
    http = _http_process(server)
    try:
        server.process.kill()
        server.process.wait(10)
        deadline = time.monotonic() + 20
        while not _gone(http):
            assert time.monotonic() < deadline, "the HTTP process outlived the model's process"
            time.sleep(0.05)
    finally:
        if not _gone(http):
            os.kill(http, signal.SIGKILL)
