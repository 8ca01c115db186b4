"""The Hydra config tree composes onto the typed schema, and bad values fail at start with the fix."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException

from forge_lm.trainer.config import ConfigError
from tests.conftest import REPO, compose_config


def test_quickstart_composes_with_derived_values():
    cfg = compose_config("experiment=quickstart")
    assert cfg.name == "quickstart"
    assert cfg.run_dir == "runs/quickstart"
    assert cfg.model.n_kv_heads == 2
    assert cfg.model.ffn_dim == 704  # 8/3 * 256 rounded up to 64
    assert cfg.data.sources[0].name == "shakespeare"
    assert cfg.data.sources[1].paths[0].endswith("*.py")
    assert cfg.grad_accum_steps == 1  # 4096 tokens = 16 sequences x 256


def test_derived_fields_follow_overrides():
    # ffn_dim and n_kv_heads are derived from the final values, not frozen from the defaults.
    cfg = compose_config("model=llama_125m")
    assert cfg.model.ffn_dim == 2048
    cfg = compose_config("model.d_model=512", "model.n_heads=8", "model.n_kv_heads=null")
    assert cfg.model.n_kv_heads == 8 and cfg.model.ffn_dim == 1408


def test_heads_not_dividing_hidden_size_names_field_and_fix():
    with pytest.raises(
        ConfigError, match=r"model.n_heads=5 does not divide model.d_model=256: choose n_heads"
    ):
        compose_config("model.n_heads=5")


def test_kv_heads_must_divide_heads():
    with pytest.raises(ConfigError, match=r"model.n_kv_heads=3 does not divide model.n_heads=4"):
        compose_config("model.n_kv_heads=3")


def test_batch_tokens_not_divisible_by_seq_len_names_field_and_fix():
    with pytest.raises(
        ConfigError, match=r"trainer.global_batch_tokens=1000 is not a multiple of data.seq_len=256: use e.g."
    ):
        compose_config("trainer.global_batch_tokens=1000")


def test_batch_tokens_not_divisible_by_micro_batch():
    with pytest.raises(ConfigError, match=r"micro_batch_size .* set it to a multiple of 3072"):
        compose_config("trainer.global_batch_tokens=8192", "trainer.micro_batch_size=12")


def test_unknown_field_is_refused_during_composition():
    with pytest.raises(ConfigCompositionException) as e:
        compose_config("model.n_layer=2")
    assert "n_layer" in str(e.value) or "n_layer" in str(e.value.__cause__)


def test_unknown_field_in_an_added_key_is_refused():
    with pytest.raises(ConfigError, match=r"unknown config field\(s\): trainer.learning_rate"):
        compose_config("+trainer.learning_rate=1e-3")


def test_bad_enum_value():
    with pytest.raises(ConfigError, match=r"trainer.schedule='linear': use 'cosine' or 'wsd'"):
        compose_config("trainer.schedule=linear")


def test_wrong_type_is_refused():
    with pytest.raises(ConfigCompositionException):
        compose_config("trainer.max_steps=many")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "forge_lm.trainer.train", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_cli_prints_resolved_config_and_reports_errors_cleanly(tmp_path):
    out = _cli("experiment=quickstart", "trainer.max_steps=50", "model.n_layers=2", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    assert "max_steps: 50" in out.stdout and "n_layers: 2" in out.stdout
    assert "global_batch_tokens: 4096" in out.stdout

    bad = _cli(
        "experiment=quickstart", "model.n_heads=5", "trainer.wandb.mode=disabled", f"output_root={tmp_path}"
    )
    assert bad.returncode == 2
    assert "config error: model.n_heads=5 does not divide model.d_model=256" in bad.stderr
    assert "Traceback" not in bad.stderr


# ---- parallel layouts: refused before any process group exists -------------------------------------------


def test_dp_shard_fills_the_world_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    cfg = compose_config("parallel.tp=2", "trainer.global_batch_tokens=16384")
    assert cfg.parallel.dp_shard == 4 and cfg.parallel.dp_size == 4


def test_dp_shard_cannot_fill_an_indivisible_world(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(ConfigError, match=r"parallel.dp_shard=-1 cannot fill 6 processes: dp_replicate\*tp\*pp = 4"):
        compose_config("parallel.tp=2", "parallel.pp=2")


def test_layout_must_match_processes_started():
    from forge_lm.trainer.parallel.mesh import check_layout

    cfg = compose_config("parallel.dp_shard=2", "parallel.tp=2")
    with pytest.raises(ConfigError, match=r"= 4 does not match the 1 process\(es\) started"):
        check_layout(cfg.parallel, 1)


def test_tp_must_divide_heads_and_kv_heads():
    with pytest.raises(ConfigError, match=r"parallel.tp=4 must divide model.n_heads=4 and model.n_kv_heads=2"):
        compose_config("parallel.tp=4", "parallel.dp_shard=1")


def test_tp_must_divide_each_experts_hidden_size_and_the_kv_heads():
    """Refused while composing the config (before any process group), naming the field and values that work."""
    moe = ["model=mixtral_tiny", "model.n_heads=8", "model.n_kv_heads=4", "model.ffn_dim=90", "parallel.dp_shard=1"]
    with pytest.raises(ConfigError, match=r"parallel.tp=4 must divide model.ffn_dim=90 \(each expert's hidden size.*"
                       r"choose parallel.tp among \[1, 2\]"):  # fmt: skip
        compose_config(*moe, "parallel.tp=4")
    with pytest.raises(ConfigError, match=r"parallel.tp=8 must divide .* model.n_kv_heads=4.* among \[1, 2\]"):
        compose_config(*moe, "parallel.tp=8")
    cfg = compose_config(*moe, "parallel.tp=2")  # MoE under tensor parallelism: the router replicated
    assert cfg.parallel.tp == 2 and cfg.model.moe.num_experts == 8


def test_ep_must_divide_the_experts_and_the_sharded_data_parallel_size(monkeypatch):
    """Expert parallelism borrows its ranks from dp_shard and gives each whole experts: refused while composing
    the config (before any process group), naming the field and values that work."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"parallel.ep=3 must divide parallel.dp_shard=4 .* among \[1, 2, 4\]"):
        compose_config("model=mixtral_tiny", "parallel.ep=3", "parallel.dp_shard=4")
    with pytest.raises(ConfigError, match=r"parallel.ep=4 must divide model.moe.num_experts=6 .* among \[1, 2\]"):
        compose_config("model=mixtral_tiny", "model.moe.num_experts=6", "parallel.ep=4", "parallel.dp_shard=4")
    with pytest.raises(ConfigError, match=r"parallel.ep=2 splits the experts .* model.moe.num_experts=0"):
        compose_config("parallel.ep=2", "parallel.dp_shard=4")
    with pytest.raises(ConfigError, match=r"parallel.ep=2 borrows its ranks from parallel.dp_shard .* set parallel.dp_replicate=1"):
        compose_config("model=mixtral_tiny", "parallel.ep=2", "parallel.dp_shard=2", "parallel.dp_replicate=2")
    cfg = compose_config("model=qwen3_moe_tiny", "parallel.ep=2", "parallel.dp_shard=-1")  # the rest: 4
    assert (cfg.parallel.ep, cfg.parallel.dp_shard) == (2, 4)


def test_cli_refuses_a_bad_expert_layout_before_starting(tmp_path):
    bad = _cli("model=mixtral_tiny", "model.moe.num_experts=6", "parallel.ep=4", "parallel.dp_shard=4",
               "trainer.wandb.mode=disabled", f"output_root={tmp_path}")  # fmt: skip
    assert bad.returncode == 2
    assert "config error: parallel.ep=4 must divide model.moe.num_experts=6" in bad.stderr
    assert "choose parallel.ep among [1, 2]" in bad.stderr and "Traceback" not in bad.stderr


def test_moe_and_document_masking_are_accepted_under_pipeline_parallelism():
    cfg = compose_config("model=qwen3_moe_tiny", "model.tie_embeddings=false", "parallel.pp=2", "parallel.dp_shard=1",
                         "data.document_masking=true")  # fmt: skip
    assert cfg.parallel.pp == 2 and cfg.model.is_moe and cfg.data.document_masking


def test_pp_stages_cannot_exceed_layers():
    with pytest.raises(ConfigError, match=r"parallel.pp=4 with schedule Interleaved1F1B needs 8 stages .* model.n_layers=4"):
        compose_config("parallel.pp=4", "parallel.dp_shard=1", "parallel.pp_schedule=Interleaved1F1B",
                       "model.tie_embeddings=false")


def test_pp_refuses_tied_embeddings_and_too_few_microbatches():
    with pytest.raises(ConfigError, match=r"tie_embeddings=true cannot be split across pipeline stages"):
        compose_config("parallel.pp=2", "parallel.dp_shard=1")
    with pytest.raises(ConfigError, match=r"DualPipeV needs at least 4 micro-batches per step"):
        compose_config("parallel.pp=2", "parallel.dp_shard=1", "parallel.pp_schedule=DualPipeV",
                       "model.tie_embeddings=false", "trainer.global_batch_tokens=8192",
                       "trainer.micro_batch_size=16")


def test_unknown_schedule_and_deepspeed_with_tp():
    with pytest.raises(ConfigError, match=r"parallel.pp_schedule='Zigzag': use one of GPipe, 1F1B"):
        compose_config("parallel.pp_schedule=Zigzag")
    with pytest.raises(ConfigError, match=r"trainer.backend=deepspeed runs ZeRO data parallelism only"):
        compose_config("trainer.backend=deepspeed", "parallel.tp=2", "parallel.dp_shard=1")
