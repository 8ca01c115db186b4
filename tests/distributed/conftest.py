"""Real multi-process runs: `torchrun` launches of the trainer on CPU (gloo), compared step by step.

Every launch is a real `python -m torch.distributed.run ... -m forge_lm.trainer.train <overrides>`; the
per-step losses are read back from the run's metrics.jsonl.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from forge_lm.trainer.metrics import read_metrics
from tests.conftest import REPO

# A model deep enough for 8 pipeline stages, on 64-token sequences; 8 sequences per step, one per
# micro-batch, so every layout (dp up to 4, 8 pipeline micro-batches) sees the same global batch.
BASE_OVERRIDES = [
    "data=tiny",
    "data.seq_len=64",
    "model.d_model=64",
    "model.n_layers=8",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.max_seq_len=64",
    "model.tie_embeddings=false",
    "trainer.global_batch_tokens=512",
    "trainer.micro_batch_size=1",
    "trainer.max_steps=5",
    "trainer.log_every=1",
    "trainer.lr=3e-3",
    "trainer.warmup_steps=2",
    "trainer.precision=fp32",
    "trainer.device=cpu",
    "trainer.wandb.mode=disabled",
    "trainer.export_hf=false",
    "eval.max_batches=1",
    "eval.batch_size=8",
    "eval.max_new_tokens=4",
]


# Paragraphs of the CPython modules as documents (and only two Shakespeare scenes), packed best-fit: about a
# third of the rows then hold more than one document, so document masking changes what tokens attend to.
SHORT_DOCUMENTS = ["data.sources.0.max_documents=2", "data.sources.1.text_split=paragraph", "data.packing=best_fit"]


def rows_with_several_documents(output_root: Path) -> float:
    """The fraction of the prepared training rows under `output_root` that hold more than one document."""
    from forge_lm.data.loader import collate
    from forge_lm.data.shards import ShardDataset

    (manifest,) = (output_root / "prepared").glob("*/train/manifest.json")
    rows = ShardDataset(manifest.parent)
    document_ids = collate(rows.take(list(range(len(rows)))))["document_ids"]
    return (document_ids.max(dim=1).values > 0).float().mean().item()


def replace_overrides(base: list[str], *changes: str) -> list[str]:
    """`base` with the value of each `key=value` in `changes` replaced (or appended when new)."""
    out = dict(o.split("=", 1) for o in base)
    out.update(o.split("=", 1) for o in changes)
    return [f"{k}={v}" for k, v in out.items()]


def launch(nproc: int, output_root: Path, name: str, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the trainer under torchrun with `nproc` processes (or plainly, for 1)."""
    args = [*BASE_OVERRIDES, f"output_root={output_root}", f"name={name}", *overrides]
    if nproc == 1:
        cmd = [sys.executable, "-m", "forge_lm.trainer.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "forge_lm.trainer.train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def run_ok(nproc: int, output_root: Path, name: str, *overrides: str) -> dict[int, float]:
    """Launch, insist on success, and return {step: loss}."""
    out = launch(nproc, output_root, name, *overrides)
    assert out.returncode == 0, f"{name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return losses(output_root / name)


def losses(run_dir: Path, kind: str = "train") -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir, kind)}


def assert_same_losses(got: dict[int, float], want: dict[int, float], tol: float = 1e-4) -> None:
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    worst = max(abs(got[s] - want[s]) for s in want)
    assert worst <= tol, {s: (got[s], want[s]) for s in want}


@pytest.fixture(scope="session")
def dist_root(tmp_path_factory) -> Path:
    """One output root for the whole session: the tiny data's tokenizer and shards are built once."""
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="session")
def single_process_losses(dist_root) -> dict[str, dict[int, float]]:
    """The reference: the same global batch and seed in one plain process."""
    train = run_ok(1, dist_root, "reference")
    return {"train": train, "val": losses(dist_root / "reference", "val")}
