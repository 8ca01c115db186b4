"""Mixture of experts: grouped dispatch equals the per-expert computation, and the auxiliary losses are
transformers' load-balancing loss (and the router z-loss), differentiable, exposed after a forward."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch.utils.checkpoint import checkpoint
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from forge_lm.trainer.hub.convert import from_hf_state_dict, hf_config_to_model_config
from forge_lm.trainer.model import Decoder
from forge_lm.trainer.model.families import preset
from forge_lm.trainer.model.moe import GroupedExperts

VOCAB = 256


def test_grouped_dispatch_equals_a_loop_over_experts() -> None:
    torch.manual_seed(0)
    E, k, d, hidden, N = 5, 2, 16, 24, 40
    experts = GroupedExperts(E, d, hidden)
    for w in (experts.w1, experts.w2, experts.w3):
        torch.nn.init.normal_(w, std=0.3)
    x = torch.randn(N, d, requires_grad=True)
    chosen = torch.randint(0, E - 1, (N, k))  # expert E-1 gets no token at all
    chosen[:, 1] = (chosen[:, 0] + 1) % (E - 1)  # two distinct experts per token
    weights = torch.rand(N, k)

    y = experts(x, chosen, weights)
    grads = torch.autograd.grad(y.pow(2).sum(), [x, experts.w1, experts.w2, experts.w3])

    expected = torch.zeros(N, d)
    for t in range(N):
        for j in range(k):
            e = chosen[t, j]
            h = torch.nn.functional.silu(experts.w1[e] @ x[t]) * (experts.w3[e] @ x[t])
            expected = expected + torch.nn.functional.one_hot(torch.tensor(t), N)[:, None] * weights[t, j] * (
                experts.w2[e] @ h
            )
    expected_grads = torch.autograd.grad(expected.pow(2).sum(), [x, experts.w1, experts.w2, experts.w3])
    assert (y - expected).abs().max().item() <= 1e-5
    for g, eg in zip(grads, expected_grads):
        assert torch.allclose(g, eg, rtol=1e-5, atol=1e-4)
    assert grads[1][E - 1].abs().sum() == 0  # the idle expert gets no gradient


HF_MOE = [
    (Qwen3MoeConfig, Qwen3MoeForCausalLM, dict(head_dim=16, num_experts=4, num_experts_per_tok=2,
                                               moe_intermediate_size=32, norm_topk_prob=False)),
    (MixtralConfig, MixtralForCausalLM, dict(num_local_experts=4, num_experts_per_tok=2)),
]  # fmt: skip


@pytest.mark.parametrize("config_class, model_class, extra", HF_MOE, ids=["qwen3_moe", "mixtral"])
def test_load_balancing_loss_is_transformers_aux_loss(config_class, model_class, extra) -> None:
    hf_config = config_class(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.2, pad_token_id=None, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = model_class(hf_config).eval()
    cfg = hf_config_to_model_config(hf_config.to_dict())
    ours = Decoder(cfg).eval()
    # hf.state_dict() is transformers 5's in-memory layout (fused experts); from_hf_state_dict reads it too.
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg))
    x = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = hf(x, output_router_logits=True)
        logits = ours(x)
    assert (logits - out.logits).abs().max().item() <= 1e-4
    losses = ours.aux_losses()
    assert abs(losses["moe_load_balance"].item() - out.aux_loss.item()) <= 1e-5
    assert losses["moe_load_balance"].item() >= cfg.moe.top_k * 0.99  # top_k when perfectly balanced


def test_aux_loss_is_weighted_differentiable_and_zero_for_dense_models() -> None:
    cfg = preset("qwen3_moe_tiny", vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, ffn_dim=48,
                 moe=dict(num_experts=4, top_k=2, load_balance_coef=0.01, router_z_coef=0.001))  # fmt: skip
    model = Decoder.build(cfg, seed=0)
    x = torch.randint(0, VOCAB, (2, 16))
    model(x)
    losses = model.aux_losses()
    assert set(losses) == {"moe_load_balance", "moe_router_z"}
    total = model.aux_loss()
    assert torch.allclose(total, 0.01 * losses["moe_load_balance"] + 0.001 * losses["moe_router_z"])
    total.backward()
    router = model.layers[0].feed_forward.router.weight
    assert router.grad is not None and router.grad.abs().sum() > 0

    dense = Decoder.build(preset("qwen3_tiny", vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4), seed=0)
    dense(x)
    assert dense.aux_losses() == {} and dense.aux_loss().item() == 0.0


def test_aux_loss_survives_activation_checkpointing() -> None:
    """The router statistics are recorded during the first forward; recomputation in backward must not
    change the gradients of the auxiliary loss."""
    cfg = preset("mixtral_tiny", vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, ffn_dim=48,
                 moe=dict(num_experts=4, top_k=2))  # fmt: skip
    x = torch.randint(0, VOCAB, (2, 16))
    grads = []
    for use_checkpoint in (False, True):
        model = Decoder.build(cfg, seed=0)
        h = model.embed(x)
        inputs = model.attention_inputs(torch.arange(16).expand(2, 16), None, h.dtype)
        for layer in model.layers:
            h = checkpoint(layer, h, inputs, use_reentrant=False) if use_checkpoint else layer(h, inputs)
        loss = model.head(h).logsumexp(-1).mean() + model.aux_loss()
        loss.backward()
        grads.append(model.layers[0].feed_forward.router.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_active_parameters_and_flops_count_top_k_experts() -> None:
    cfg = preset("mixtral_tiny", vocab_size=VOCAB, moe=dict(num_experts=8, top_k=2))
    with torch.device("meta"):
        model = Decoder(cfg)
    expert = 3 * cfg.d_model * cfg.ffn_dim  # one expert's w1, w2, w3
    assert model.num_params() - model.num_active_params() == cfg.n_layers * 6 * expert
    dense = model.num_active_params(exclude_embeddings=True)
    assert (
        model.flops_per_token(64)
        == 6 * dense + 12 * cfg.n_heads * cfg.head_dim * min(64, cfg.sliding_window or 64) * cfg.n_layers
    )


def test_routing_biases_choose_the_experts_and_move_towards_balance() -> None:
    """balance='bias': experts are chosen by probability + bias and mixed by probability; after a step each
    bias moves by the rate towards the mean load of its layer, and the worst max/mean load is reported."""
    from forge_lm.trainer.model.moe import MoE, update_expert_biases

    cfg = preset("qwen3_moe_tiny", vocab_size=VOCAB, moe=dict(num_experts=4, top_k=2, balance="bias"))
    model = Decoder.build(cfg, seed=0)
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    with torch.no_grad():
        layers[0].expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))  # expert 3 is always chosen
    model.train()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids)
    first = layers[0].stats
    assert first.expert_counts[3] == 32  # every token chose it
    counts = [m.step_counts.clone() for m in layers]
    load = update_expert_biases(model, rate=0.1)
    for layer, c in zip(layers, counts):
        assert layer.step_counts is None
        assert c.sum() == 2 * 32  # top-2 slots of 32 tokens
    assert torch.allclose(
        layers[0].expert_bias,
        torch.tensor([0.0, 0.0, 0.0, 10.0]) + 0.1 * torch.sign(counts[0].mean() - counts[0]),
    )
    assert load == pytest.approx(max(float(c.max() / c.mean()) for c in counts))


def test_routing_bias_mixes_by_probability() -> None:
    from forge_lm.trainer.model.moe import MoE

    cfg = preset("qwen3_moe_tiny", vocab_size=VOCAB, moe=dict(num_experts=4, top_k=2, balance="bias"))
    layer = next(m for m in Decoder.build(cfg, seed=0).modules() if isinstance(m, MoE))
    with torch.no_grad():
        layer.expert_bias.copy_(torch.tensor([5.0, 5.0, 0.0, 0.0]))  # experts 0 and 1 for every token
    x = torch.randn(6, cfg.d_model, generator=torch.Generator().manual_seed(1))
    probs = torch.softmax(layer.router(x), dim=-1)
    weights = probs[:, :2] / probs[:, :2].sum(-1, keepdim=True)  # renormalised, as Qwen3-MoE does
    chosen = torch.tensor([[0, 1]]).expand(6, 2)
    want = layer.experts(x, chosen, weights)
    assert torch.allclose(layer(x), want, atol=1e-6)
