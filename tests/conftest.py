"""Fixtures shared by every test directory."""

from __future__ import annotations

import os

# Tests never touch the network: transformers, datasets and the hub stay offline; wandb is off.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "configs"


def compose_config(*overrides: str):
    """Compose the Hydra config tree with overrides, as `forge train` would, and validate it."""
    from forge_lm.trainer.config_store import compose, to_config

    return to_config(compose(overrides))


@pytest.fixture(scope="session")
def shared_output_root(tmp_path_factory) -> Path:
    """One output root per test session, so the tokenizer and shards of the tiny data are built once."""
    return tmp_path_factory.mktemp("runs")


def tiny_overrides(output_root: Path, run_name: str, *extra: str) -> list[str]:
    """A tiny model on the `tiny` data slice: trains a few steps in seconds on a CPU."""
    return [
        "data=tiny",
        f"output_root={output_root}",
        f"name={run_name}",
        "model.d_model=64",
        "model.n_layers=2",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        "model.max_seq_len=128",
        "trainer.global_batch_tokens=1024",
        "trainer.micro_batch_size=4",
        "trainer.lr=3e-3",
        "trainer.warmup_steps=2",
        "trainer.log_every=1",
        "trainer.precision=fp32",
        "trainer.device=cpu",
        "trainer.wandb.mode=disabled",
        "eval.max_batches=2",
        "eval.batch_size=4",
        "eval.max_new_tokens=8",
        *extra,
    ]


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `gpu` need a CUDA device: without one they are skipped, saying so (CPU CI, this machine);
    `python -m forge_lm.tools.gpu_check` runs them where a GPU is."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run by python -m forge_lm.tools.gpu_check)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
