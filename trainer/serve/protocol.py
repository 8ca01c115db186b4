"""The OpenAI API as this server speaks it: request models with their validation, errors, response bodies.

Requests are validated by pydantic; anything out of range becomes a 400 whose OpenAI-style body names the
field (`param`). Fields of the OpenAI API this server does not implement are refused when they would
change the result (n > 1, logprobs, penalties, tools ...) and ignored otherwise (user, metadata ...).
Beyond OpenAI's fields, `top_k` (as in vLLM) is accepted.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


class APIError(Exception):
    """Becomes an HTTP error whose body is OpenAI's: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: Optional[str] = None,
        code: Optional[str] = None,
        headers: Optional[dict[str, str]] = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    include_usage: bool = False
    """Send a last chunk (before [DONE]) with empty choices and the usage counts."""


class SamplingRequest(BaseModel):
    """The fields completions and chat completions share."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    """The served model's name (GET /v1/models); None: the served model."""
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    """0 is greedy; default 1 (as OpenAI)."""
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=-1)
    """Keep the k most likely tokens (-1, 0 or None: all); an extension, as in vLLM."""
    seed: Optional[int] = None
    """Seeds the request's own sampler: the same seed gives the same tokens, whatever else runs."""
    stop: Optional[Union[str, list[str]]] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    # Refused unless left at their no-op values (see unsupported()).
    n: Optional[int] = 1
    best_of: Optional[int] = None
    presence_penalty: Optional[float] = 0.0
    frequency_penalty: Optional[float] = 0.0
    logit_bias: Optional[dict[str, float]] = None
    logprobs: Optional[Union[bool, int]] = None
    top_logprobs: Optional[int] = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: Optional[Union[str, list[str]]]) -> Optional[Union[str, list[str]]]:
        stops = [value] if isinstance(value, str) else value or []
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return value

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def unsupported(self) -> Optional[tuple[str, str]]:
        """(field, why) for an OpenAI option this server cannot honour, else None."""
        if self.n not in (None, 1):
            return (
                "n",
                f"n={self.n}: this server returns one choice per request; send n=1 (or several requests).",
            )
        if self.best_of not in (None, 1):
            return "best_of", f"best_of={self.best_of} is not supported; leave it unset."
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                return name, f"{name}={getattr(self, name)} is not supported by this server; leave it at 0."
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported by this server; leave it unset."
        if self.logprobs not in (None, False, 0) or self.top_logprobs:
            return "logprobs", "logprobs are not supported by this server; leave logprobs unset."
        return None


class CompletionRequest(SamplingRequest):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    """A string or token ids; a list of one of them is accepted too (one prompt per request)."""
    max_tokens: Optional[int] = Field(16, ge=1)
    """OpenAI's default for completions: 16."""
    echo: Optional[bool] = False
    suffix: Optional[str] = None

    def unsupported(self) -> Optional[tuple[str, str]]:
        if self.echo:
            return "echo", "echo=true is not supported by this server; leave it unset."
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported by this server; leave it unset."
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list)):
            if len(self.prompt) != 1:
                return "prompt", (
                    f"a batch of {len(self.prompt)} prompts: send one prompt per request (the server batches "
                    "concurrent requests itself)."
                )
        return super().unsupported()


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # a template may read more (name, tool_calls ...)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    """The newer name of max_tokens; either may be given."""
    tools: Optional[list[dict[str, Any]]] = None

    def unsupported(self) -> Optional[tuple[str, str]]:
        if self.tools:
            return "tools", "tools (function calling) are not supported by this server; leave them unset."
        return super().unsupported()

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---- response bodies ------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    id: str, model: str, text: str, finish_reason: Optional[str], use: Optional[dict], chunk: bool = False
) -> dict[str, Any]:
    """A text completion, or one chunk of a streamed one (then `use` is None except in the usage chunk)."""
    body: dict[str, Any] = {
        "id": id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        "system_fingerprint": None,
    }
    if not chunk or use is not None:
        body["usage"] = use
    return body


def chat_body(id: str, model: str, text: str, finish_reason: Optional[str], use: dict) -> dict[str, Any]:
    return {
        "id": id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": use,
        "system_fingerprint": None,
    }


def chat_chunk(id: str, model: str, delta: dict[str, str], finish_reason: Optional[str]) -> dict[str, Any]:
    return {
        "id": id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        "system_fingerprint": None,
    }


def usage_chunk(id: str, model: str, object: str, use: dict) -> dict[str, Any]:
    return {
        "id": id,
        "object": object,
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": use,
    }
