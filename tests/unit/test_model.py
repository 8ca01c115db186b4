"""The decoder: numerical equivalence with HF Llama, initialisation, positions, causality, accounting."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network, even by accident

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from forge_lm.trainer.hub.convert import from_hf_state_dict, hf_config_to_model_config
from forge_lm.trainer.model import ConfigError, Decoder, ModelConfig

VOCAB = 300


def tiny_cfg(**overrides) -> ModelConfig:
    kw = dict(
        vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128, init_std=0.1
    )
    kw.update(overrides)
    return ModelConfig(**kw)


def hf_llama(n_kv_heads: int, tie: bool, rope_theta: float = 500000.0) -> LlamaForCausalLM:
    """A randomly initialised HF Llama; a large init range so that any mismatch shows in the logits."""
    torch.manual_seed(0)
    hc = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        tie_word_embeddings=tie,
        initializer_range=0.2,
    )
    model = LlamaForCausalLM(hc).float().eval()
    # HF initialises norm gains to 1; perturb them so the norm mapping is actually tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def ours_from_hf(hf: LlamaForCausalLM) -> Decoder:
    cfg = hf_config_to_model_config(hf.config.to_dict())
    model = Decoder.build(cfg, seed=123)  # different weights until loaded
    model.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg), strict=True)
    return model.eval()


@pytest.mark.parametrize(
    "n_kv_heads, tie", [(2, False), (4, False), (2, True)], ids=["gqa", "mha", "gqa-tied"]
)
def test_logits_match_hf_llama(n_kv_heads: int, tie: bool) -> None:
    hf = hf_llama(n_kv_heads, tie)
    ours = ours_from_hf(hf)
    assert ours.cfg.n_kv_heads == n_kv_heads and ours.cfg.tie_embeddings == tie
    assert ours.cfg.rope_theta == 500000.0
    if tie:
        assert ours.output.weight is ours.tok_embeddings.weight

    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (2, 24), generator=g)
    with torch.no_grad():
        expected = hf(x).logits
        got = ours(x)
        assert expected.abs().max() > 1.0  # the comparison is not between two near-zero tensors
        assert (got - expected).abs().max().item() <= 1e-5

        # Explicit, non-default positions (e.g. a continuation starting at 40) go through RoPE identically.
        pos = torch.arange(40, 64).expand(2, 24)
        expected = hf(x, position_ids=pos).logits
        assert (ours(x, position_ids=pos) - expected).abs().max().item() <= 1e-5


def test_logit_comparison_is_sensitive_to_rope() -> None:
    """Control: a different RoPE base must break the match, otherwise the test above proves little."""
    ours = ours_from_hf(hf_llama(2, False, rope_theta=10000.0))
    hf = hf_llama(2, False, rope_theta=500000.0)  # same seed, same weights, other base
    x = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() > 1e-3


def test_gradients_reach_every_parameter() -> None:
    model = Decoder.build(tiny_cfg(), seed=0)
    x = torch.randint(0, VOCAB, (2, 16))
    logits = model(x[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("tie", [False, True])
def test_meta_build_is_deterministic_for_a_seed(tie: bool) -> None:
    cfg = tiny_cfg(tie_embeddings=tie)
    a, b, c = Decoder.build(cfg, seed=7), Decoder.build(cfg, seed=7), Decoder.build(cfg, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["layers.0.attention.wq.weight"], sc["layers.0.attention.wq.weight"])
    assert all(not t.is_meta for t in sa.values())
    # to_empty unties weights; build must restore the tie (or keep them apart when untied).
    assert (a.output.weight is a.tok_embeddings.weight) == tie
    # The RoPE buffer is recomputed (to_empty leaves garbage) and kept in float32.
    fresh = Decoder(cfg)
    assert a.inv_freq.dtype == torch.float32 and torch.equal(a.inv_freq, fresh.inv_freq)
    # Residual output projections start smaller than the rest (std / sqrt(2 * n_layers) = 0.05 vs 0.1).
    big = Decoder.build(tiny_cfg(d_model=128, ffn_dim=512), seed=0)
    wq_std = big.layers[0].attention.wq.weight.std().item()
    wo_std = big.layers[0].attention.wo.weight.std().item()
    assert abs(wq_std - 0.1) < 0.01 and abs(wo_std - 0.05) < 0.005
    assert torch.equal(big.norm.weight, torch.ones(128))


def test_default_position_ids_equal_explicit_arange() -> None:
    model = Decoder.build(tiny_cfg(), seed=0).eval()
    x = torch.randint(0, VOCAB, (3, 20))
    with torch.no_grad():
        assert torch.equal(model(x), model(x, position_ids=torch.arange(20).expand(3, 20)))
        assert not torch.allclose(model(x), model(x, position_ids=torch.arange(5, 25).expand(3, 20)))


def test_causality() -> None:
    model = Decoder.build(tiny_cfg(), seed=0).eval()
    x = torch.randint(0, VOCAB, (2, 16))
    y = x.clone()
    y[:, 10] = (x[:, 10] + 1) % VOCAB
    with torch.no_grad():
        lx, ly = model(x), model(y)
    assert torch.equal(lx[:, :10], ly[:, :10])  # the past cannot see the future
    assert not torch.allclose(lx[:, 10:], ly[:, 10:])


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(d_model=64, n_heads=5), "n_heads"),
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
        (dict(d_model=60, n_heads=4, n_kv_heads=4), "d_model / model.n_heads"),
        (dict(n_layers=0), "n_layers"),
    ],
)
def test_config_errors_name_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        tiny_cfg(**overrides)


def test_building_without_vocab_size_is_refused() -> None:
    with pytest.raises(ConfigError, match="vocab_size"):
        Decoder(tiny_cfg(vocab_size=None))


def test_param_count_and_flops_per_token() -> None:
    cfg = tiny_cfg(ffn_dim=160)
    d, hd, L, V = cfg.d_model, cfg.head_dim, cfg.n_layers, VOCAB
    attn = d * cfg.n_heads * hd + 2 * d * cfg.n_kv_heads * hd + cfg.n_heads * hd * d
    per_layer = attn + 3 * d * cfg.ffn_dim + 2 * d
    body = L * per_layer + d  # + final norm

    untied = Decoder(cfg)
    assert untied.num_params() == body + 2 * V * d
    assert untied.num_params(exclude_embeddings=True) == body + V * d
    T = 128
    expected = 6 * (body + V * d) + 12 * L * cfg.n_heads * hd * T
    assert untied.flops_per_token(T) == expected

    tied = Decoder(tiny_cfg(ffn_dim=160, tie_embeddings=True))
    assert tied.num_params() == body + V * d
    # Tying saves memory, not compute: the output matmul is still done.
    assert tied.flops_per_token(T) == expected


# ---- the family knobs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(family="gpt2"), r"model\.family='gpt2'"),
        (dict(qk_norm="layer"), r"model\.qk_norm='layer'"),
        (dict(activation="relu"), r"model\.activation='relu'"),
        (dict(moe=dict(num_experts=4, top_k=5)), r"model\.moe\.top_k=5"),
        (dict(rope_scaling=dict(kind="yarn")), r"model\.rope_scaling\.kind='yarn'"),
        (dict(rotary_fraction=0.3), r"model\.rotary_fraction=0\.3"),
        (dict(pre_norm=False, post_norm=False), r"model\.pre_norm=false and model\.post_norm=false"),
        (dict(sliding_window=0), r"model\.sliding_window=0"),
        (dict(head_dim=7), r"model\.head_dim=7 is odd"),
        (dict(init_scheme="xavier"), r"model\.init_scheme='xavier'"),
    ],
)
def test_family_knob_errors_name_the_field_and_value(overrides: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        tiny_cfg(**overrides)


def test_config_rebuilds_from_its_recorded_dict() -> None:
    """Checkpoints record dataclasses.asdict(cfg); nested configs come back as dicts and are rebuilt."""
    import dataclasses

    cfg = tiny_cfg(
        moe=dict(num_experts=4, top_k=1), rope_scaling=dict(kind="linear", factor=2.0), head_dim=32
    )
    again = ModelConfig(**dataclasses.asdict(cfg))
    assert again == cfg and again.moe.top_k == 1 and again.rope_scaling.factor == 2.0


def test_decoupled_head_dim_and_window_in_param_count_and_flops() -> None:
    cfg = tiny_cfg(head_dim=32, ffn_dim=160, sliding_window=16, full_attention_every=2, qkv_bias=True)
    d, L, V, q, kv = cfg.d_model, cfg.n_layers, VOCAB, cfg.n_heads * 32, cfg.n_kv_heads * 32
    attn = d * q + 2 * d * kv + q * d + q + 2 * kv  # + q/k/v biases
    body = L * (attn + 3 * d * cfg.ffn_dim + 2 * d) + d
    model = Decoder(cfg)
    assert model.num_params() == body + 2 * V * d
    T = 128  # layer 0 slides (span 16), layer 1 is global (span 128)
    assert model.flops_per_token(T) == 6 * (body + V * d) + 12 * cfg.n_heads * 32 * (16 + 128)


@pytest.mark.parametrize("scheme", ["depth_scaled", "normal", "truncated_normal"])
def test_initialisation_schemes(scheme: str) -> None:
    cfg = tiny_cfg(
        d_model=128, ffn_dim=512, init_scheme=scheme, qkv_bias=True, norm_unit_offset=True, qk_norm="head"
    )
    model = Decoder.build(cfg, seed=0)
    attn = model.layers[0].attention
    wq, wo = attn.wq.weight, attn.wo.weight
    assert abs(wq.std().item() - 0.1) < 0.012
    expected_wo = 0.05 if scheme == "depth_scaled" else 0.1  # 0.1 / sqrt(2 * n_layers)
    assert abs(wo.std().item() - expected_wo) < 0.012
    if scheme == "truncated_normal":
        assert wq.abs().max().item() <= 0.3 + 1e-6
    else:
        assert wq.abs().max().item() > 0.3  # 16k samples of a normal reach beyond 3 sigma
    assert torch.equal(attn.wq.bias, torch.zeros_like(attn.wq.bias))
    # (1 + w) norms start at w = 0: the same function as a gain of 1.
    assert torch.equal(model.norm.weight, torch.zeros(128)) and torch.equal(
        attn.q_norm.weight, torch.zeros(32)
    )


def test_meta_build_initialises_experts_and_every_parameter() -> None:
    cfg = tiny_cfg(moe=dict(num_experts=4, top_k=2), qk_norm="full", post_norm=True)
    a, b = Decoder.build(cfg, seed=3), Decoder.build(cfg, seed=3)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
        assert torch.isfinite(p).all() and not p.is_meta, name
    experts = a.layers[0].feed_forward.experts
    assert experts.w1.shape == (4, cfg.ffn_dim, 64) and abs(experts.w1.std().item() - 0.1) < 0.01
    assert abs(experts.w2.std().item() - 0.05) < 0.005  # a residual output projection: depth-scaled
