"""`forge plan`: published sizes, refusals with fixes, and bytes per rank equal to a real run."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest

from forge_lm.launch.config import compose
from forge_lm.launch.plan import GIB, estimate, main, rank_state, render
from tests.conftest import REPO
from tests.launch.state_bytes import MODEL

LLAMA3_8B = [
    "model=llama3_8b",
    "data.seq_len=8192",
    "trainer.global_batch_tokens=1048576",
    "trainer.micro_batch_size=1",
]
# Llama-3 70B: the 8B preset's knobs at the 70B's published shape
LLAMA3_70B = [
    *LLAMA3_8B,
    "model.d_model=8192",
    "model.n_layers=80",
    "model.n_heads=64",
    "model.ffn_dim=28672",
    "trainer.global_batch_tokens=4194304",
]


def run_plan(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


def test_llama3_8b_on_8_h100_with_fsdp(monkeypatch):
    monkeypatch.chdir(REPO)
    rc, out, err = run_plan(*LLAMA3_8B, "parallel.activation_checkpointing=full", "launch.gpus_per_node=8")
    assert rc == 0, out + err
    assert "pp=1 x dp_replicate=1 x dp_shard=8 x tp=1" in out and "FSDP2" in out
    assert "8,030,261,248 parameters" in out  # the published count of Meta-Llama-3-8B
    assert "micro-batch 1 x seq_len 8192 x accumulation 16 x data-parallel 8" in out
    for part in ("parameters", "gradients", "optimizer state", "activations", "buffers", "peak (estimate)"):
        assert part in out
    assert "fits" in out and "s/step" in out and "tokens/s" in out
    cfg, launch = compose([*LLAMA3_8B, "parallel.activation_checkpointing=full", "launch.gpus_per_node=8"])
    plan = estimate(cfg, launch)
    # 8.03e9 fp32 parameters sharded 8 ways: 4 bytes each for weights and gradients, 8 for AdamW
    assert plan.memory.params == pytest.approx(8_030_261_248 * 4 / 8, rel=1e-3)
    assert plan.memory.optimizer == pytest.approx(2 * plan.memory.params, rel=1e-3)
    # 6N + attention, N without the input embedding
    assert plan.flops_per_token == pytest.approx(6 * 7_504_924_672 + 12 * 32 * 128 * 8192 * 32, rel=1e-6)
    # step time = FLOPs per step / (GPUs * peak * MFU)
    assert plan.step_time_s == pytest.approx(plan.flops_per_token * 1048576 / (8 * 989e12 * 0.4), rel=1e-6)


def test_llama3_70b_on_64_nodes_with_tp8_pp4(monkeypatch):
    monkeypatch.chdir(REPO)
    args = [*LLAMA3_70B, "launch.nodes=64", "launch.gpus_per_node=8", "parallel.tp=8", "parallel.pp=4"]
    rc, out, err = run_plan(*args)
    assert rc == 0, out + err
    assert "pp=4 x dp_replicate=1 x dp_shard=16 x tp=8" in out and "512 ranks" in out
    assert "70,553,706,496 parameters" in out  # the published count of Meta-Llama-3-70B
    cfg, launch = compose(args)
    plan = estimate(cfg, launch)
    assert len(plan.worst.layers) == 20  # 80 layers over 4 stages
    # the first stage holds the 1F1B warm-up: pp = 4 micro-batches in flight
    assert plan.memory.params == pytest.approx(70.55e9 * 4 / 512, rel=0.05)


def test_impossible_layout_is_refused_with_fixes(monkeypatch):
    monkeypatch.chdir(REPO)
    rc, out, err = run_plan(*LLAMA3_70B, "launch.gpus_per_node=8", "trainer.micro_batch_size=2")
    assert rc == 1, out + err
    assert "DOES NOT FIT" in out and "refused:" in out
    fixes = out.split("changes that fit", 1)[1]
    assert "launch.nodes=" in fixes or "parallel.tp=" in fixes or "parallel.pp=" in fixes, fixes
    rc, out, err = run_plan(
        *LLAMA3_8B,
        "launch.gpus_per_node=8",
        "trainer.micro_batch_size=4",
        "trainer.global_batch_tokens=1048576",
    )
    assert (
        rc == 1 and "parallel.activation_checkpointing=full" in out and "trainer.micro_batch_size=" in out
    ), out


def test_layouts_the_trainer_rejects_are_refused(monkeypatch):
    monkeypatch.chdir(REPO)
    rc, out, err = run_plan(*LLAMA3_8B, "launch.gpus_per_node=8", "parallel.tp=3")
    assert rc == 2 and "dp_replicate*tp*pp = 3 does not divide 8" in err, err
    rc, out, err = run_plan(*LLAMA3_8B, "launch.gpus_per_node=6", "parallel.tp=6", "parallel.dp_shard=1")
    assert rc == 2 and "parallel.tp=6 must divide model.n_heads=32" in err, err
    rc, out, err = run_plan(*LLAMA3_8B, "launch.gpus_per_node=8", "parallel.dp_shard=4")
    assert rc == 2 and "make them equal" in err, err


def test_state_bytes_per_rank_equal_a_real_run(tmp_path):
    """Parameters, gradients and optimizer state of each rank, as the planner counts them and as two real
    processes hold them (FSDP2, tensor parallel, pipeline, replicated data parallel, MoE under tensor and
    expert parallel)."""
    layouts = [
        "parallel.dp_shard=2",
        "parallel.tp=2 parallel.dp_shard=1",
        "parallel.pp=2 parallel.dp_shard=1",
        "parallel.dp_replicate=2 parallel.dp_shard=1",
        "model=mixtral_tiny parallel.tp=2 parallel.dp_shard=1",  # experts split along their hidden size
        "model=mixtral_tiny parallel.ep=2 parallel.dp_shard=2",  # whole experts split over the ep ranks
    ]
    out = tmp_path / "bytes.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "tests.launch.state_bytes",
        str(out),
        *layouts,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        measured = json.loads((tmp_path / f"bytes.json.{rank}").read_text())
        for layout in layouts:
            cfg, _ = compose([*MODEL, *layout.split(), "launch.gpus_per_node=2", "launch.gpu=cpu"])
            st = rank_state(cfg, rank)
            planned = {"params": st.params, "grads": st.grads, "optimizer": st.optimizer}
            assert planned == measured[layout], (layout, rank, planned, measured[layout])


def test_cpu_plan_of_the_test_model(monkeypatch):
    monkeypatch.chdir(REPO)
    cfg, launch = compose([*MODEL, "parallel.dp_shard=2", "launch.gpus_per_node=2", "launch.gpu=cpu"])
    plan = estimate(cfg, launch)
    assert plan.fits and plan.step_time_s is None  # no peak FLOP/s for a CPU
    assert plan.memory.peak < GIB


def test_expert_parallelism_gathers_only_the_ranks_own_experts():
    """With ep=2 over dp_shard=4 a rank holds the same share of the experts' state as with FSDP alone (a quarter),
    but a block's all-gather brings only its ep group's half of the experts, not all of them."""
    base = [*MODEL, "model=mixtral_tiny", "launch.gpus_per_node=4", "launch.gpu=cpu", "parallel.dp_shard=4"]
    fsdp, _ = compose(base)
    ep, _ = compose([*base, "parallel.ep=2"])
    m = fsdp.model
    experts_per_layer = 3 * m.moe.num_experts * m.ffn_dim * m.d_model  # w1, w3, w2
    for rank in range(4):
        alone, split = rank_state(fsdp, rank), rank_state(ep, rank)
        assert split.experts == alone.experts > 0
        assert alone.block_unsharded - split.block_unsharded == experts_per_layer // 2
    assert "ep=2: experts split over 2 of the dp_shard ranks" in render(estimate(ep, compose(base)[1]))
