"""`forge serve <run dir | checkpoint | HF folder>`: the OpenAI-compatible server and its chat page.

    forge serve runs/quickstart                                    # http://127.0.0.1:8000, chat page at /
    forge serve runs/quickstart/hf --port 9000 --max-batch 32 --api-key secret
    forge serve my_hf_folder --device cuda --dtype bfloat16 --host 0.0.0.0

Also `python -m forge_lm.trainer.serve ...`. The API key may come from the environment (FORGE_API_KEY)
instead of the command line, where other users of the machine could read it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Optional

from forge_lm.trainer.serve.config import DTYPES, ServeConfig, ServeConfigError


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[ServeConfig, str]:
    """The configuration, and uvicorn's log level."""
    p = argparse.ArgumentParser(
        prog="forge serve",
        description="Serve a model over the OpenAI API (completions, chat completions, streaming) with "
        "continuous batching, Prometheus /metrics and a chat page at /.",
    )
    p.add_argument("model", help="a run directory, a checkpoint directory or a Hugging Face folder")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: any free port)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="weights and cache (default: bf16 on CUDA, fp32 on CPU)",
    )
    p.add_argument("--max-batch", type=int, default=16, help="slots: requests decoded at once (default 16)")
    p.add_argument(
        "--max-context", type=int, default=None, help="prompt + reply tokens (default: the model's)"
    )
    p.add_argument(
        "--queue-size", type=int, default=64, help="requests that may wait for a slot (default 64)"
    )
    p.add_argument(
        "--api-key", default=os.environ.get("FORGE_API_KEY"), help="require Authorization: Bearer KEY"
    )
    p.add_argument("--model-name", default=None, help="the name clients use (default: the folder's name)")
    p.add_argument(
        "--tokenizer", default=None, help="a tokenizer dir or tokenizer.json instead of the model's"
    )
    p.add_argument(
        "--chat-template", default=None, help="a Jinja chat template file instead of the tokenizer's"
    )
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None,
        help="torch.compile the decode step (default: on CUDA only)",
    )  # fmt: skip
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for the model (default on a CPU: one fewer than the cores, at least 1)",
    )
    p.add_argument("--max-prefill-tokens", type=int, default=2048, help="prompt tokens prefilled per step")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    return ServeConfig(
        model=args.model, host=args.host, port=args.port, device=args.device, dtype=args.dtype,
        max_batch=args.max_batch, max_context=args.max_context, queue_size=args.queue_size,
        api_key=args.api_key, model_name=args.model_name, tokenizer=args.tokenizer,
        chat_template=args.chat_template, compile=args.compile, max_prefill_tokens=args.max_prefill_tokens,
        threads=args.threads,
    ), args.log_level  # fmt: skip


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        config, log_level = parse_args(argv)
    except ServeConfigError as e:
        print(f"forge serve: {e}", file=sys.stderr)
        return 2
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        print(
            f"forge serve needs {e.name}, which is not installed: pip install 'forge-lm[serve]'",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(
        level=getattr(logging, log_level.upper()), format="%(levelname)s %(name)s: %(message)s"
    )

    import torch

    threads = config.model_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    from forge_lm.data.report import DataError
    from forge_lm.trainer.checkpoint import CheckpointError
    from forge_lm.trainer.inference import load_model, tokenizer_location
    from forge_lm.trainer.serve.app import Engine
    from forge_lm.trainer.serve.chat import TemplateError
    from forge_lm.trainer.serve.server import bind, serve_forever, url_of

    try:
        model, tokenizer = load_model(
            config.model, config.torch_device(), config.torch_dtype(), tokenizer_path=config.tokenizer
        )
        if tokenizer is None:
            raise ValueError(
                f"{config.model}: no tokenizer found beside the model (nor recorded by its run): pass --tokenizer."
            )
        tokenizer_dir = config.tokenizer or tokenizer_location(config.model)
        if tokenizer_dir is not None and os.path.isfile(tokenizer_dir):
            tokenizer_dir = os.path.dirname(tokenizer_dir)
        model_dir = config.model if os.path.isfile(os.path.join(config.model, "config.json")) else None
        engine = Engine(config, model, tokenizer, tokenizer_dir, model_dir)
    except (FileNotFoundError, CheckpointError, DataError, TemplateError, ValueError) as e:
        print(f"forge serve: {e}", file=sys.stderr)
        return 2
    try:
        sock = bind(config.host, config.port)
    except OSError as e:
        print(
            f"forge serve: cannot listen on {config.host}:{config.port} ({e.strerror}): choose another --port "
            "(0: any free one) or stop what uses it.",
            file=sys.stderr,
        )
        return 2
    url = url_of(sock)
    params = sum(p.numel() for p in model.parameters())
    device = config.torch_device()
    where = f"{device}, {torch.get_num_threads()} threads" if device.type == "cpu" else str(device)
    print(
        f"forge serve: {engine.name} ({params / 1e6:.1f}M parameters, {config.torch_dtype()} on "
        f"{where}), {config.max_batch} slots, context {engine.max_context} tokens, queue "
        f"{config.queue_size}; chat template: {engine.prompter.template_origin}",
        flush=True,
    )
    print(f"forge serve: listening on {url} (OpenAI API at {url}/v1, chat page at {url}/)", flush=True)
    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        print("forge serve: warning: listening beyond this machine without --api-key", file=sys.stderr)
    problem = serve_forever(engine, sock, log_level)
    if problem is not None:
        print(f"forge serve: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
