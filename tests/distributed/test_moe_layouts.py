"""Mixture-of-experts models train under pipeline and tensor parallelism exactly like one process: same global
batch and seed, fp32, 5 steps; the loss, both auxiliary losses and the worst layer's expert load agree within
1e-4 at every step.

Pipeline stages pass the router statistics along with the activations, so the last stage computes the
auxiliary losses over all layers (trainer/parallel/pipeline.py); under tensor parallelism the router is
replicated and each expert's hidden size split; under expert parallelism each rank holds whole experts and tokens
travel to them and back by all-to-all, the dense parameters FSDP-sharded over all data-parallel ranks and the
experts over the rest (trainer/parallel/moe_parallel.py).
"""

from __future__ import annotations

import pytest

from forge_lm.trainer.metrics import read_metrics
from tests.distributed.conftest import SHORT_DOCUMENTS, launch, rows_with_several_documents

FAMILIES = ["qwen3_moe_tiny", "mixtral_tiny"]
# Neither preset weighs the router z-loss; a small weight sends its gradient through every layout too.
MOE = ["model.moe.router_z_coef=0.001"]
LAYOUTS = {
    "pp2_1F1B": (2, ["parallel.pp=2", "parallel.dp_shard=1", "parallel.pp_schedule=1F1B"]),
    "pp2_Interleaved1F1B": (2, ["parallel.pp=2", "parallel.dp_shard=1", "parallel.pp_schedule=Interleaved1F1B"]),
    "tp_sp_2": (2, ["parallel.tp=2", "parallel.dp_shard=1"]),
    "tp_no_sp_2": (2, ["parallel.tp=2", "parallel.dp_shard=1", "parallel.sequence_parallel=false",
                       "parallel.loss_parallel=false"]),
    "fsdp_x_tp_4": (4, ["parallel.tp=2", "parallel.dp_shard=2"]),
    "pp_x_tp_4": (4, ["parallel.pp=2", "parallel.tp=2", "parallel.dp_shard=1"]),
    "ep2": (2, ["parallel.ep=2", "parallel.dp_shard=2"]),
    "ep2_x_fsdp2_4": (4, ["parallel.ep=2", "parallel.dp_shard=4"]),
    "ep2_x_pp2_4": (4, ["parallel.ep=2", "parallel.dp_shard=2", "parallel.pp=2", "parallel.pp_schedule=1F1B"]),
    "ep2_x_tp2_4": (4, ["parallel.ep=2", "parallel.dp_shard=2", "parallel.tp=2"]),
}  # fmt: skip
# One per kind; the rest are slow.
DEFAULT = {("qwen3_moe_tiny", "pp2_1F1B"), ("mixtral_tiny", "tp_sp_2"), ("qwen3_moe_tiny", "ep2")}
METRICS = ("loss", "moe_load_balance", "moe_router_z", "moe_load_max_over_mean")


def moe_metrics(nproc: int, root, name: str, *overrides: str) -> dict[int, dict[str, float]]:
    out = launch(nproc, root, name, *overrides)
    assert out.returncode == 0, f"{name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return {r["step"]: {k: r[k] for k in METRICS} for r in read_metrics(root / name, "train")}


def assert_same_metrics(got, want, tol: float = 1e-4) -> None:
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5], (sorted(got), sorted(want))
    worst = {k: max(abs(got[s][k] - want[s][k]) for s in want) for k in METRICS}
    assert max(worst.values()) <= tol, (worst, got, want)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    return tmp_path_factory.mktemp("moe"), {}


def _single(references, family: str, *overrides: str):
    root, single = references
    key = (family, *overrides)
    if key not in single:
        single[key] = moe_metrics(1, root, f"{family}_single_{len(single)}", f"model={family}", *MOE, *overrides)
    return single[key]


@pytest.mark.parametrize(
    "family,layout",
    [
        pytest.param(f, layout, marks=[] if (f, layout) in DEFAULT else [pytest.mark.slow])
        for f in FAMILIES
        for layout in LAYOUTS
    ],
)
def test_moe_families_match_one_process(family, layout, references):
    nproc, overrides = LAYOUTS[layout]
    got = moe_metrics(nproc, references[0], f"{family}_{layout}", f"model={family}", *MOE, *overrides)
    assert_same_metrics(got, _single(references, family))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["pp2_1F1B", "tp_sp_2", "ep2"])
def test_bias_balancing_matches_one_process(layout, references):
    """balance=bias moves the routing biases by each step's expert load: a forward counted once too often (the
    pipeline schedule's shape probe on its first step) or a load not summed over the right ranks would show."""
    bias = ["model.moe.balance=bias", "model.moe.bias_update_rate=0.05"]
    nproc, overrides = LAYOUTS[layout]
    got = moe_metrics(nproc, references[0], f"bias_{layout}", "model=mixtral_tiny", *MOE, *bias, *overrides)
    assert_same_metrics(got, _single(references, "mixtral_tiny", *bias))


@pytest.mark.slow
def test_masked_documents_and_router_statistics_cross_interleaved_stages(tmp_path):
    """Packed documents with document masking, two stages per rank: document ids and router statistics travel
    together through four stages."""
    masked = ["model=mixtral_tiny", *MOE, *SHORT_DOCUMENTS, "data.document_masking=true"]
    want = moe_metrics(1, tmp_path, "masked_single", *masked)
    assert rows_with_several_documents(tmp_path) > 0.2, "too few packed rows for masking to matter"
    got = moe_metrics(2, tmp_path, "masked_pp2", *masked, *LAYOUTS["pp2_Interleaved1F1B"][1])
    assert_same_metrics(got, want)


@pytest.mark.slow
def test_expert_parallel_checkpoint_resumes_without_ep_and_under_tp_then_exports(references):
    """A checkpoint saved with ep=2 x fsdp=2 (experts split over ep, sharded over the rest) holds every expert
    under its own name and shape: it resumes in one process (ep=1) and under tp=2 with the losses of the
    uninterrupted run, and the tp=2 run's export loads in transformers with our logits."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from forge_lm.trainer.inference import load_model

    root, moe = references[0], ["model=mixtral_tiny", *MOE]
    want = _single(references, "mixtral_tiny")
    first = moe_metrics(4, root, "ep2_x_fsdp2_saved", *moe, *LAYOUTS["ep2_x_fsdp2_4"][1], "trainer.exit_at_step=3")
    assert sorted(first) == [1, 2, 3]
    shutil.copytree(root / "ep2_x_fsdp2_saved", root / "ep2_x_fsdp2_saved_to_tp")
    # Same run directories, new layouts: each resumes from step 3 and continues the same run.
    assert_same_metrics(moe_metrics(1, root, "ep2_x_fsdp2_saved", *moe), want)
    to_tp = moe_metrics(2, root, "ep2_x_fsdp2_saved_to_tp", *moe, *LAYOUTS["tp_sp_2"][1], "trainer.export_hf=true")
    assert_same_metrics(to_tp, want)

    ours, tokenizer = load_model(root / "ep2_x_fsdp2_saved_to_tp")
    hf = AutoModelForCausalLM.from_pretrained(root / "ep2_x_fsdp2_saved_to_tp" / "hf", local_files_only=True).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    ids = torch.tensor([tokenizer.encode("ROMEO: What light through yonder window breaks?")])
    with torch.no_grad():
        expected, got = hf(ids).logits, ours.eval()(ids)
    assert expected.abs().max() > 0.1 and (got - expected).abs().max().item() <= 1e-4  # not two near-zero tensors
