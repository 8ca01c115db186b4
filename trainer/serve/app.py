"""The HTTP side: a FastAPI app in front of the scheduler, speaking the OpenAI API.

    GET  /                     the chat page (static/index.html, no external resources)
    GET  /health               200 {"status": "ok"} while the generation loop runs, else 503
    GET  /metrics              Prometheus text (metrics.py)
    GET  /v1/models            the one served model
    POST /v1/completions       prompt -> text
    POST /v1/chat/completions  messages -> the assistant's reply (chat.py renders them)

`stream: true` answers with server-sent events, one OpenAI chunk per piece of text, ending with
`data: [DONE]`. Every error is OpenAI's body {"error": {"message", "type", "param", "code"}}: 400 for a
bad request (naming the field), 401 for a missing or wrong API key, 404 for an unknown model, 503 with
Retry-After when the queue is full, 500 if generation itself failed. A client that goes away, streaming
or not, has its request cancelled: its slot is free before the next decode step.

The handlers run on uvicorn's event loop; events come back into one asyncio.Queue per request. The model
runs on the scheduler's thread in this process (BackgroundServer; events via `loop.call_soon_threadsafe`),
or, under `forge serve`, in a process of its own (bridge.py; events read from a pipe on the loop).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from forge_lm.data.tokenizer import Tokenizer
from forge_lm.trainer.inference.sampling import SamplingParams
from forge_lm.trainer.inference.slots import SlotDecoder
from forge_lm.trainer.model import Decoder
from forge_lm.trainer.serve import protocol as api
from forge_lm.trainer.serve.chat import Prompter, TemplateError
from forge_lm.trainer.serve.config import ServeConfig
from forge_lm.trainer.serve.metrics import ServeMetrics
from forge_lm.trainer.serve.scheduler import Event, GenerationRequest, QueueFull, Scheduler

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions")
DISCONNECT_POLL_S = 0.25


class Engine:
    """What the handlers share: the model behind its scheduler, the prompter, the metrics, the limits.

    Engine(config, model, ...) builds the scheduler over the model in this process. `forge serve` runs the
    model in its own process instead (bridge.py): its HTTP process builds the same Engine with
    `Engine.front_end`, around a RemoteScheduler that reaches the model's process through a pipe.
    """

    def __init__(
        self,
        config: ServeConfig,
        model: Decoder,
        tokenizer: Tokenizer,
        tokenizer_dir: Optional[str] = None,
        model_dir: Optional[str] = None,
    ) -> None:
        max_context = config.max_context or model.cfg.max_seq_len
        if max_context > model.cfg.max_seq_len:
            raise ValueError(
                f"--max-context={max_context} is longer than the model's context of "
                f"{model.cfg.max_seq_len} tokens: choose at most that."
            )
        metrics = ServeMetrics(config.max_batch)
        decoder = SlotDecoder(model, slots=config.max_batch, max_len=max_context, compile=config.compile)
        scheduler = Scheduler(
            decoder, tokenizer, metrics, queue_size=config.queue_size,
            max_prefill_tokens=config.max_prefill_tokens,
        )  # fmt: skip
        self.front = {
            "config": config, "tokenizer": tokenizer, "tokenizer_dir": tokenizer_dir, "model_dir": model_dir,
            "max_context": max_context, "vocab_size": model.cfg.vocab_size,
        }  # fmt: skip
        """What an HTTP process needs to build its own Engine with `front_end` (all picklable)."""
        self._setup(scheduler=scheduler, metrics=metrics, **self.front)

    @classmethod
    def front_end(cls, **front: Any) -> Engine:
        """The HTTP process's Engine: `front` (see above) plus the scheduler and metrics it reaches."""
        engine = cls.__new__(cls)
        engine._setup(**front)
        return engine

    def _setup(
        self,
        config: ServeConfig,
        tokenizer: Tokenizer,
        tokenizer_dir: Optional[str],
        model_dir: Optional[str],
        max_context: int,
        vocab_size: int,
        scheduler: Any,
        metrics: Any,
    ) -> None:
        self.config = config
        self.name = config.served_name()
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.vocab_size = vocab_size
        self.prompter = Prompter(tokenizer, tokenizer_dir, config.chat_template, model_dir)
        self.scheduler = scheduler
        """A Scheduler, or bridge.RemoteScheduler in `forge serve`'s HTTP process."""
        self.metrics = metrics
        """ServeMetrics, or bridge.RemoteMetrics in `forge serve`'s HTTP process."""

    # ---- from a request body to a GenerationRequest ----------------------------------------------------------

    def check_model(self, body: api.SamplingRequest) -> None:
        if body.model is not None and body.model != self.name:
            raise api.APIError(
                404,
                f"The model `{body.model}` does not exist: this server serves `{self.name}` (GET /v1/models).",
                param="model",
                code="model_not_found",
            )
        problem = body.unsupported()
        if problem is not None:
            raise api.APIError(400, problem[1], param=problem[0], code="unsupported")

    def completion_prompt(self, body: api.CompletionRequest) -> list[int]:
        prompt: Any = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a list of one prompt (unsupported() refused longer ones)
        if isinstance(prompt, str):
            return self.prompter.encode_prompt(prompt)
        if not prompt:
            raise api.APIError(
                400, "prompt is an empty list of token ids: give at least one.", param="prompt"
            )
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise api.APIError(
                400, f"prompt has token id {bad[0]}, outside the model's vocabulary of {self.vocab_size}.",
                param="prompt",
            )  # fmt: skip
        return list(prompt)

    def chat_prompt(self, body: api.ChatCompletionRequest) -> list[int]:
        messages = [{**m.model_dump(exclude_none=True), "content": m.text()} for m in body.messages]
        try:
            return self.prompter.chat_ids(messages)
        except TemplateError as e:
            raise api.APIError(400, str(e), param="messages") from e

    def generation(
        self, body: api.SamplingRequest, prompt_ids: list[int], max_tokens: Optional[int], prompt_param: str
    ) -> GenerationRequest:
        n = len(prompt_ids)
        if n >= self.max_context:
            raise api.APIError(
                400,
                f"This model's maximum context length is {self.max_context} tokens; the {prompt_param} has {n} "
                "tokens, which leaves no room for a reply. Shorten it.",
                param=prompt_param,
                code="context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = self.max_context - n
        elif n + max_tokens > self.max_context:
            raise api.APIError(
                400,
                f"This model's maximum context length is {self.max_context} tokens; the {prompt_param} has {n} "
                f"tokens and max_tokens={max_tokens} asks for {n + max_tokens} in all. Ask for at most "
                f"{self.max_context - n} new tokens or shorten the {prompt_param}.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        temperature = 1.0 if body.temperature is None else body.temperature
        sampling = SamplingParams(
            temperature=temperature,
            top_k=body.top_k if body.top_k and body.top_k > 0 else None,
            top_p=body.top_p,
            seed=body.seed if body.seed is not None else random.getrandbits(63),
        )
        return GenerationRequest(
            prompt_ids, max_tokens, emit=_no_sink, sampling=sampling, stop=body.stop_strings(),
            eos_ids=self.prompter.eos_ids,
        )  # fmt: skip

    # ---- running it --------------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> asyncio.Queue[Event]:
        """Queue the request, its events to arrive in the returned asyncio.Queue; 503 when full."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        # A RemoteScheduler delivers on this loop already; the in-process one from its own thread.
        request.emit = events.put_nowait if getattr(self.scheduler, "emits_on_loop", False) else emit
        try:
            self.scheduler.submit(request)
        except QueueFull as e:
            retry = str(self.config.retry_after)
            raise api.APIError(
                503, f"The server is overloaded ({e}); retry after {retry} s.", type="server_error",
                code="overloaded", headers={"Retry-After": retry},
            ) from e  # fmt: skip
        return events


def _no_sink(event: Event) -> None:  # replaced by Engine.submit
    raise RuntimeError("request not submitted")


# ---- the app ----------------------------------------------------------------------------------------------------


def create_app(engine: Engine) -> FastAPI:
    """The app. It starts the scheduler with itself and stops it with itself: an in-process Scheduler runs
    its loop on a thread of its own; a RemoteScheduler reads its pipe on the app's event loop."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.scheduler.start()
        try:
            yield
        finally:
            engine.scheduler.stop()

    app = FastAPI(title="forge serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Gatekeeper, api_key=engine.config.api_key, metrics=engine.metrics)
    page = (STATIC / "index.html").read_text(encoding="utf-8")

    @app.exception_handler(api.APIError)
    async def _api_error(request: Request, e: api.APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_error(e.errors())
        return JSONResponse(api.error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {e.detail}"
        if e.status_code == 404:
            message += f" (the endpoints are {', '.join(ENDPOINTS)}, /health, /metrics and the chat page /)"
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(api.error_body(message, kind), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        logger.exception("unexpected error in %s", request.url.path)
        return JSONResponse(api.error_body(f"internal error: {e}", "server_error"), status_code=500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.scheduler.alive:
            return JSONResponse({"status": "ok"})
        reason = engine.scheduler.failure or "the generation loop is not running"
        return JSONResponse({"status": "error", "reason": str(reason)}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(
            await engine.metrics.render_async(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": engine.name, "object": "model", "created": 0, "owned_by": "forge-lm",
                 "max_model_len": engine.max_context}
            ],
        }  # fmt: skip

    @app.post("/v1/completions")
    async def completions(body: api.CompletionRequest, request: Request) -> Response:
        engine.check_model(body)
        prompt_ids = engine.completion_prompt(body)
        generation = engine.generation(body, prompt_ids, body.max_tokens, "prompt")
        return await respond(engine, request, body, generation, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: api.ChatCompletionRequest, request: Request) -> Response:
        engine.check_model(body)
        prompt_ids = engine.chat_prompt(body)
        generation = engine.generation(body, prompt_ids, body.requested_max_tokens(), "messages")
        return await respond(engine, request, body, generation, chat=True)

    return app


async def respond(
    engine: Engine, request: Request, body: api.SamplingRequest, generation: GenerationRequest, chat: bool
) -> Response:
    events = engine.submit(generation)
    rid = api.new_id("chatcmpl" if chat else "cmpl")
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            stream_events(engine, generation, events, rid, chat, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            # Runs also when the client disconnects before the stream starts.
            background=BackgroundTask(engine.scheduler.cancel, generation),
        )
    text, final = [], None
    try:
        while final is None:
            try:
                event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return Response(status_code=499)  # nobody reads it; the request is cancelled below
                continue
            text.append(event.text)
            if event.finish_reason is not None:
                final = event
    finally:
        engine.scheduler.cancel(generation)
    if final.finish_reason == "error":
        raise api.APIError(500, f"generation failed: {final.error}", type="server_error")
    use = api.usage(final.prompt_tokens, final.completion_tokens)
    if chat:
        return JSONResponse(api.chat_body(rid, engine.name, "".join(text), final.finish_reason, use))
    return JSONResponse(api.completion_body(rid, engine.name, "".join(text), final.finish_reason, use))


async def stream_events(
    engine: Engine,
    generation: GenerationRequest,
    events: asyncio.Queue[Event],
    rid: str,
    chat: bool,
    include_usage: bool,
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format; the request is cancelled if the stream is cut."""
    name = engine.name

    def chunk(text: Optional[str], finish_reason: Optional[str] = None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            body = api.chat_chunk(rid, name, delta, finish_reason)
        else:
            body = api.completion_body(rid, name, text or "", finish_reason, None, chunk=True)
        return sse(body)

    try:
        if chat:
            yield chunk(None, role=True)
        while True:
            event = await events.get()
            if event.finish_reason == "error":
                yield sse(api.error_body(f"generation failed: {event.error}", "server_error"))
                break
            if event.text:
                yield chunk(event.text)
            if event.finish_reason is not None:
                yield chunk(None, event.finish_reason)
                if include_usage:
                    object = "chat.completion.chunk" if chat else "text_completion"
                    use = api.usage(event.prompt_tokens, event.completion_tokens)
                    yield sse(api.usage_chunk(rid, name, object, use))
                break
        yield "data: [DONE]\n\n"
    finally:
        engine.scheduler.cancel(generation)


def sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def describe_validation_error(errors: Any) -> tuple[str, Optional[str]]:
    """pydantic's first complaint as (one-line message, the field it concerns)."""
    if not errors:
        return "invalid request", None
    error = errors[0]
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    if error.get("type") == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "")
        return f"The body is not valid JSON ({detail}): send a JSON object.", None
    param = ".".join(loc) or None
    where = f"{param}: " if param else "body: "
    message = error.get("msg", "invalid value")
    if "input" in error and error.get("type") != "missing" and param is not None:
        message += f" (got {_short(error['input'])})"
    return where + message, param


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---- authentication and request counting -----------------------------------------------------------------------


class Gatekeeper:
    """ASGI middleware: checks the API key before anything else reads the request (so a bad key gets 401
    even with a malformed body), and counts API requests by endpoint and status code."""

    def __init__(self, app: Any, api_key: Optional[str], metrics: ServeMetrics) -> None:
        self.app, self.api_key, self.metrics = app, api_key, metrics

    def _authorized(self, scope: dict) -> bool:
        headers = dict(scope.get("headers") or [])
        value = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = value.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip(), self.api_key or "")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path: str = scope["path"]
        counted = path.startswith("/v1/")
        endpoint = path if path in ENDPOINTS else "other"
        if self.api_key and (counted or path == "/metrics") and not self._authorized(scope):
            body = api.error_body(
                "Incorrect or missing API key: send the header `Authorization: Bearer <key>` with the key the "
                "server was started with (--api-key).",
                "invalid_request_error",
                code="invalid_api_key",
            )
            response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            if counted:
                self.metrics.requests.inc(endpoint=endpoint, code="401")
            return
        status: dict[str, Union[int, str]] = {"code": 500}

        async def send_and_note(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            if counted:
                self.metrics.requests.inc(endpoint=endpoint, code=str(status["code"]))
