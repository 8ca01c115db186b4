"""Every family preset against its reference class in transformers, in both directions.

HF -> ours: the transformers class is built offline from its own config object, randomly initialised,
saved with save_pretrained and imported with from_hf. Ours -> HF: a tiny preset is exported with to_hf and
loaded by AutoModelForCausalLM. Each time: max |logit difference| <= 1e-4 in fp32, and 20 greedy tokens
(transformers' generate with its KV cache vs our full recompute) identical. The tiny configs are chosen so
that every knob matters: sliding windows shorter than the sequence, small soft-caps, RoPE scaling whose
thresholds fall inside the head's frequencies, decoupled head sizes, several experts.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from forge_lm.trainer.hub import from_hf, to_hf
from forge_lm.trainer.hub.convert import model_config_to_hf
from forge_lm.trainer.hub.families import HF_FAMILIES
from forge_lm.trainer.model import Decoder
from forge_lm.trainer.model.families import (
    FAMILY_KNOBS,
    RELEASED,
    preset,
    preset_names,
    preset_values,
    preset_yaml,
)

REPO = Path(__file__).resolve().parents[2]
VOCAB = 256
FAMILIES = list(FAMILY_KNOBS)

# The transformers side, from its own config classes (never downloaded). initializer_range is large so
# that every mismatch shows in the logits; pad_token_id None because some defaults exceed a tiny vocabulary.
_SIZE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2, pad_token_id=None,
    bos_token_id=None, eos_token_id=None,
)  # fmt: skip
HF_REFERENCES = {
    "llama3": ("LlamaConfig", dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "qwen2": ("Qwen2Config", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=32)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(
        head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=8)),
    "gemma": ("GemmaConfig", dict(head_dim=32, num_key_value_heads=1)),
    "gemma2": ("Gemma2Config", dict(
        head_dim=16, query_pre_attn_scalar=32, sliding_window=8, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0)),
    "gemma3": ("Gemma3TextConfig", dict(
        num_hidden_layers=6, head_dim=16, query_pre_attn_scalar=24, sliding_window=8, rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
    "glm4": ("Glm4Config", dict(head_dim=16, partial_rotary_factor=0.5, attention_bias=True)),
    "olmo2": ("Olmo2Config", dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
}  # fmt: skip


def tiny_overrides(family: str) -> dict:
    """Our side: the family's tiny preset, shrunk, with every family knob made to matter."""
    o: dict = dict(
        vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128, init_std=0.1
    )
    knobs = FAMILY_KNOBS[family]
    if knobs.get("sliding_window"):
        o["sliding_window"] = 8
    if knobs.get("full_attention_every") == 6:
        o["n_layers"] = 6  # five local layers, then a global one
    if knobs.get("attn_softcap"):
        o.update(attn_softcap=5.0, final_softcap=3.0)
    if "moe" in knobs:
        o.update(moe=dict(num_experts=4, top_k=2), ffn_dim=48)
    if family == "llama3":
        o["rope_scaling"] = dict(kind="llama3", factor=8.0, original_max_seq_len=64)
    if family == "mixtral":
        o["sliding_window"] = 8  # Mistral-style: every layer slides
    if family in ("qwen3", "gemma3"):
        o["head_dim"] = 32  # decoupled from d_model / n_heads
    return o


def perturb_vectors(model: torch.nn.Module, seed: int = 0) -> None:
    """Initialisations leave norm gains at 1 (or 0) and biases at 0; perturb them so their mapping is tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def greedy(model: Decoder, prompt: torch.Tensor, n: int = 20) -> list[int]:
    ids, out = prompt, []
    for _ in range(n):
        nxt = model(ids)[0, -1].argmax().item()
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def hf_greedy(hf: torch.nn.Module, prompt: torch.Tensor, n: int = 20) -> list[int]:
    out = hf.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n, do_sample=False
    )
    return out[0, prompt.shape[1] :].tolist()


def assert_same_behaviour(ours: Decoder, hf: torch.nn.Module) -> None:
    # 24 tokens: longer than the sliding windows (8), so the windows matter.
    x = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = hf(x).logits, ours(x)
        assert expected.abs().max() > 1.0  # not two near-zero tensors
        assert (got - expected).abs().max().item() <= 1e-4
        prompt = x[:1, :8]
        assert greedy(ours, prompt) == hf_greedy(hf, prompt)


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_model_imports_with_identical_logits(tmp_path, family: str) -> None:
    config_class, extra = HF_REFERENCES[family]
    hf_config = getattr(transformers, config_class)(**{**_SIZE, **extra})
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(hf_config).float().eval()
    perturb_vectors(hf)
    hf.save_pretrained(tmp_path / "hf")

    ours = from_hf(tmp_path / "hf").eval()
    assert ours.cfg.family == FAMILY_KNOBS[family]["family"]
    assert type(hf).__name__ == HF_FAMILIES[ours.cfg.family].architecture
    # The family's structural knobs were recognised (not just tensors that happen to fit).
    for knob, value in FAMILY_KNOBS[family].items():
        if isinstance(value, (bool, str)) and knob != "tie_embeddings":
            assert getattr(ours.cfg, knob) == value, knob
    assert_same_behaviour(ours, hf)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_in_transformers_with_identical_logits(tmp_path, family: str) -> None:
    ours = Decoder.build(preset(f"{family}_tiny", **tiny_overrides(family)), seed=0).eval()
    perturb_vectors(ours)
    out = to_hf(ours, tmp_path / "export")
    config = json.loads(Path(out, "config.json").read_text())
    assert config["architectures"] == [HF_FAMILIES[ours.cfg.family].architecture]

    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(hf).__name__ == config["architectures"][0]
    assert_same_behaviour(ours, hf)
    # And back: the folder imports as the same configuration and weights.
    back = from_hf(out)
    assert back.cfg == ours.cfg
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ours.state_dict().values()))


@pytest.mark.parametrize(
    "family, change",
    [
        ("gemma2", dict(attn_softcap=None)),
        ("gemma3", dict(rope_local_theta=20000.0)),
        ("glm4", dict(rope_interleaved=False)),
        ("llama3", dict(rope_scaling=dict(kind="none"))),
        ("mixtral", dict(sliding_window=None)),
    ],
)
def test_comparison_is_sensitive_to_each_knob(tmp_path, family: str, change: dict) -> None:
    """Control: the same weights under one changed knob must not match, or the tests above prove little."""
    ours = Decoder.build(preset(f"{family}_tiny", **tiny_overrides(family)), seed=0).eval()
    hf = AutoModelForCausalLM.from_pretrained(to_hf(ours, tmp_path / "export"), local_files_only=True).eval()
    other = Decoder(preset(f"{family}_tiny", **{**tiny_overrides(family), **change})).eval()
    other.load_state_dict(ours.state_dict())
    x = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (other(x) - hf(x).logits).abs().max().item() > 1e-3


# ---- the presets themselves -------------------------------------------------------------------------------------

# Parameter counts of the released checkpoints (as reported for their safetensors): the shapes are right.
RELEASED_PARAMS = {
    "llama3_8b": 8_030_261_248,
    "llama3.1_8b": 8_030_261_248,
    "llama3.2_1b": 1_235_814_400,
    "qwen2.5_0.5b": 494_032_768,
    "qwen2.5_7b": 7_615_616_512,
    "qwen3_0.6b": 596_049_920,
    "qwen3_8b": 8_190_735_360,
    "qwen3_30b_a3b": 30_532_122_624,
    "mixtral_8x7b": 46_702_792_704,
    "gemma_2b": 2_506_172_416,
    "gemma_7b": 8_537_680_896,
    "gemma2_2b": 2_614_341_888,
    "gemma2_9b": 9_241_705_984,
    "gemma3_1b_pt": 999_885_952,
}


@pytest.mark.parametrize("name", list(RELEASED_PARAMS))
def test_released_presets_have_the_published_parameter_counts(name: str) -> None:
    with torch.device("meta"):
        model = Decoder(preset(name))
    assert model.num_params() == RELEASED_PARAMS[name]


def test_every_preset_is_valid_exportable_and_its_yaml_is_current() -> None:
    names = preset_names()
    assert len(names) == len(set(names)) == 3 * len(FAMILY_KNOBS) + len(RELEASED)
    for name in names:
        cfg = preset(name)
        if cfg.vocab_size is None:
            cfg.vocab_size = 1024
        model_config_to_hf(cfg, None, None, "bfloat16")  # every preset is expressible in its HF class
        path = REPO / "configs" / "model" / f"{name}.yaml"
        assert path.read_text() == preset_yaml(name), (
            f"{path} is stale: run python -m forge_lm.trainer.model.families --write-configs configs/model"
        )
    assert preset("qwen3") == preset("qwen3_1b")
    with pytest.raises(KeyError, match="unknown preset 'qwen4'"):
        preset_values("qwen4")


@pytest.mark.parametrize("name", ["llama_tiny", "qwen3_tiny", "gemma3_1b_pt", "llama3.1_8b", "qwen2.5_0.5b"])
def test_hydra_selects_a_preset_by_name(name: str) -> None:
    from tests.conftest import compose_config

    cfg = compose_config(f"model={name}", "data.seq_len=256", "model.n_layers=3")
    expected = preset(name, n_layers=3) if name != "llama_tiny" else cfg.model
    assert dataclasses.asdict(cfg.model) == dataclasses.asdict(expected)
    assert cfg.model.n_layers == 3
