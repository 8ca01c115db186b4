"""What the `forge serve` tests share: a tiny model saved as a Hugging Face folder with GPT-2's real
tokenizer, a real uvicorn server on a free loopback port, and reading /metrics with Prometheus' own parser."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from forge_lm.data.tokenizer import load_tokenizer
from forge_lm.trainer.hub import to_hf
from forge_lm.trainer.inference import load_model, tokenizer_location
from forge_lm.trainer.model import Decoder
from forge_lm.trainer.model.families import preset
from forge_lm.trainer.serve.app import Engine
from forge_lm.trainer.serve.config import ServeConfig
from forge_lm.trainer.serve.server import BackgroundServer
from tests.conftest import REPO

GPT2_DIR = REPO / "tests" / "assets" / "tokenizers" / "gpt2"
NAME = "tiny-llama"


def tiny_hf_folder(root: Path, max_seq_len: int = 256, seed: int = 0) -> Path:
    """A 2-layer Llama with random weights (init 0.3: varied greedy continuations) and GPT-2's tokenizer."""
    tokenizer = load_tokenizer(str(GPT2_DIR))
    cfg = preset(
        "llama3_tiny", vocab_size=tokenizer.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
        max_seq_len=max_seq_len, init_std=0.3,
    )  # fmt: skip
    return Path(to_hf(Decoder.build(cfg, seed=seed).eval(), root / "hf", tokenizer=tokenizer))


def engine(folder: Path, **options) -> Engine:
    """The serving engine over the folder, as `forge serve` builds it."""
    config = ServeConfig(model=str(folder), model_name=NAME, **options)
    model, tokenizer = load_model(folder)
    return Engine(config, model, tokenizer, tokenizer_location(folder), str(folder))


def serve(folder: Path, how: str = "in-process", **options) -> BackgroundServer | CommandServer:
    """A real uvicorn server on a free 127.0.0.1 port (stop() it). how: "in-process" (BackgroundServer: the
    model and HTTP on threads of this process) or "command" (`forge serve` itself: the model's process and
    its HTTP process, trainer/serve/bridge.py)."""
    if how == "command":
        return CommandServer(folder, **options)
    return BackgroundServer(engine(folder, **options)).start()


class CommandServer:
    """`python -m forge_lm.trainer.serve <folder> --port 0 ...` as a subprocess. `engine` is the same engine
    built in this process and never started: the tests read its prompter, tokenizer and model."""

    def __init__(self, folder: Path, **options) -> None:
        self.engine = engine(folder, **options)
        command = [sys.executable, "-m", "forge_lm.trainer.serve", str(folder), "--port", "0",
                   "--model-name", NAME, "--log-level", "warning"]  # fmt: skip
        for name, value in options.items():
            command += [f"--{name.replace('_', '-')}", str(value)]
        self.process = subprocess.Popen(
            command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.output: list[str] = []
        for line in self.process.stdout:
            self.output.append(line)
            match = re.search(r"listening on (http://\S+) ", line)
            if match:
                self.url = match.group(1)
                break
        else:
            raise RuntimeError("forge serve did not start:\n" + "".join(self.output))
        # Keep reading its output (a full pipe would block the server).
        threading.Thread(target=lambda: self.output.extend(self.process.stdout), daemon=True).start()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                raise
        assert self.process.returncode == 0, "".join(self.output)


def metrics(url: str, headers: dict | None = None) -> dict[tuple[str, tuple], float]:
    """GET /metrics parsed by prometheus_client: {(sample name, sorted labels): value}."""
    response = httpx.get(f"{url}/metrics", headers=headers, timeout=10)
    response.raise_for_status()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def metric(url: str, name: str, **labels: str) -> float:
    return metrics(url).get((name, tuple(sorted(labels.items()))), 0.0)
