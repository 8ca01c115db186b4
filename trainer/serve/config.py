"""What `forge serve` is told: the model, where to listen, how much to batch and queue."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ServeConfigError(ValueError):
    """A bad `forge serve` option: the message names the option and the fix."""


@dataclass
class ServeConfig:
    model: str
    """A run directory, a checkpoint directory or a Hugging Face folder (trainer/inference/load.py)."""
    host: str = "127.0.0.1"
    """Address to bind. Loopback by default: pass 0.0.0.0 to accept other machines (then set an api_key)."""
    port: int = 8000
    """TCP port (0: any free port, printed at start)."""
    device: str = "auto"
    """"cpu", "cuda", "cuda:1" ...; "auto": cuda when available, else cpu."""
    dtype: str = "auto"
    """float32, bfloat16 or float16 weights and cache; "auto": bfloat16 on CUDA, float32 on CPU."""
    max_batch: int = 16
    """Slots of the running batch: the most requests decoded at once."""
    max_context: Optional[int] = None
    """The most tokens (prompt + generation) one request may use; default the model's max_seq_len."""
    queue_size: int = 64
    """Requests that may wait for a slot; beyond it new requests are refused with 503 + Retry-After."""
    api_key: Optional[str] = None
    """When set, every /v1 and /metrics request needs `Authorization: Bearer <key>` (else 401)."""
    model_name: Optional[str] = None
    """The name clients ask for in `model` (default: the model folder's name)."""
    tokenizer: Optional[str] = None
    """A tokenizer directory or tokenizer.json instead of the one found beside the model."""
    chat_template: Optional[str] = None
    """A Jinja chat template file instead of the tokenizer's own (or the default, trainer/serve/chat.py)."""
    compile: Optional[bool] = None
    """torch.compile the decode step; default on CUDA only (CUDA graphs), off on CPU (compiling takes long)."""
    max_prefill_tokens: int = 2048
    """Prompt tokens prefilled between two decode steps (at least one request): bounds the pause a burst of
    new requests puts on the running streams."""
    threads: Optional[int] = None
    """CPU threads for the model's matrix products (torch.set_num_threads). Default on a CPU: one fewer than
    torch's own (one per core), at least one, so that the HTTP process and the clients on the same machine
    do not preempt the model's threads in the middle of a step (docs/serve.md); on a GPU, torch's own."""
    retry_after: int = 1
    """Seconds a refused client is told to wait (the Retry-After header of a 503)."""

    def __post_init__(self) -> None:
        def bad(field: str, value: object, fix: str) -> ServeConfigError:
            return ServeConfigError(f"--{field.replace('_', '-')}={value}: {fix}")

        if not Path(self.model).exists():
            raise ServeConfigError(
                f"model path {self.model} does not exist: give a run directory, a checkpoint or a Hugging Face "
                "folder."
            )
        if not 0 <= self.port <= 65535:
            raise bad("port", self.port, "choose a TCP port in 0..65535 (0: any free port).")
        if self.dtype not in ("auto", *DTYPES):
            raise bad("dtype", self.dtype, f"choose auto or one of {', '.join(DTYPES)}.")
        if self.max_batch < 1:
            raise bad("max_batch", self.max_batch, "at least 1 slot.")
        if self.max_context is not None and self.max_context < 2:
            raise bad("max_context", self.max_context, "at least 2 tokens (one prompt, one new).")
        if self.queue_size < 0:
            raise bad("queue_size", self.queue_size, "0 or more waiting requests.")
        if self.max_prefill_tokens < 1:
            raise bad("max_prefill_tokens", self.max_prefill_tokens, "at least 1 token.")
        if self.threads is not None and self.threads < 1:
            raise bad("threads", self.threads, "at least 1 thread.")
        if self.api_key is not None and not self.api_key.strip():
            raise bad("api_key", "''", "give a non-empty key, or leave it unset for no authentication.")
        if self.chat_template is not None and not Path(self.chat_template).is_file():
            raise bad("chat_template", self.chat_template, "no such file: give a Jinja template file.")
        try:
            self.torch_device()
        except RuntimeError as e:
            raise bad("device", self.device, f"not a torch device ({e}); e.g. cpu, cuda, cuda:1.") from e
        if self.torch_device().type == "cuda" and not torch.cuda.is_available():
            raise bad("device", self.device, "CUDA is not available on this machine: use --device cpu.")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32
        return DTYPES[self.dtype]

    def model_threads(self) -> Optional[int]:
        """The threads `forge serve` gives the model (None: leave torch's default)."""
        if self.threads is not None:
            return self.threads
        if self.torch_device().type == "cpu":
            return max(1, torch.get_num_threads() - 1)
        return None

    def served_name(self) -> str:
        return self.model_name or Path(os.path.abspath(self.model)).name
