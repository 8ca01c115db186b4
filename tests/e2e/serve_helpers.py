"""What the `forge serve` tests share: a tiny model saved as a Hugging Face folder with GPT-2's real
tokenizer, a real uvicorn server on a free loopback port, and reading /metrics with Prometheus' own parser."""

from __future__ import annotations

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


def serve(folder: Path, **options) -> BackgroundServer:
    """A real uvicorn server on a free 127.0.0.1 port, on a background thread (stop() it)."""
    return BackgroundServer(engine(folder, **options)).start()


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
