"""`trainer.debug.find_nonfinite`: the first module whose output or gradient goes NaN/Inf is named."""

from __future__ import annotations

import pytest
import torch

from forge_lm.trainer.debug import NonFiniteError, NonFiniteHunter
from forge_lm.trainer.engine import Engine
from forge_lm.trainer.model import Decoder
from forge_lm.trainer.parallel.mesh import init_parallel
from tests.conftest import compose_config

MODEL = [
    "model.d_model=64", "model.n_layers=3", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=32",
    "model.vocab_size=256", "data.seq_len=32", "trainer.global_batch_tokens=64", "trainer.micro_batch_size=2",
    "trainer.precision=fp32", "trainer.device=cpu",
]  # fmt: skip


def _batch(cfg) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, cfg.model.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "position_ids": torch.arange(32).expand(2, 32)}


def test_an_inf_planted_in_a_weight_is_traced_to_its_module():
    cfg = compose_config(*MODEL, "trainer.debug.find_nonfinite=true")
    engine = Engine(cfg, init_parallel(cfg.parallel, "cpu"), torch.device("cpu"), Decoder.build(cfg.model, seed=0))
    engine.train_step([_batch(cfg)])  # a healthy step passes
    with torch.no_grad():
        engine.parts[0].layers[1].feed_forward.w2.weight[3, 5] = float("inf")
    with pytest.raises(NonFiniteError) as caught:
        engine.train_step([_batch(cfg)])
    message = str(caught.value)
    assert message.startswith("step 2: the forward output of layers.1.feed_forward.w2 (Linear) is non-finite")
    assert "from finite inputs" in message and "its own non-finite parameters: weight" in message


def test_a_gradient_that_goes_nan_in_backward_is_traced():
    cfg = compose_config(*MODEL)
    model = Decoder.build(cfg.model, seed=0)
    hunter = NonFiniteHunter([model])
    # Finite forward (adds sqrt(0) = 0), NaN backward (d sqrt(x)/dx at 0 is inf, times 0): after feed_forward.
    model.layers[1].feed_forward.register_forward_hook(lambda m, i, out: out + torch.sqrt(out * 0))
    batch = _batch(cfg)
    loss = model(batch["input_ids"], labels=batch["labels"]).sum()
    with pytest.raises(NonFiniteError, match=r"the input gradient of layers\.1\.feed_forward\.w2 \(Linear\)"):
        loss.backward()
    hunter.remove()  # without the hunter the same step runs through, with NaN gradients nobody names
    model.zero_grad()
    model(batch["input_ids"], labels=batch["labels"]).sum().backward()
    assert not torch.isfinite(model.layers[1].feed_forward.w2.weight.grad).all()


# ---- layer statistics ---------------------------------------------------------------------------------


def _hf_reference(model: Decoder, batch: dict[str, torch.Tensor], tmp_path):
    """Block outputs and largest causal attention logits of the same weights, computed by transformers."""
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from forge_lm.trainer.hub import to_hf

    to_hf(model, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").float()
    logit_max = {}

    def capture(i):
        def hook(attn, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            B, T, _ = x.shape
            q = attn.q_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            scores = (q @ k.transpose(-1, -2)) * attn.scaling
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            logit_max[f"layers.{i}"] = scores.masked_fill(~causal, float("-inf")).max().item()

        return hook

    for i, layer in enumerate(hf.model.layers):
        layer.self_attn.register_forward_pre_hook(capture(i), with_kwargs=True)
    with torch.no_grad():
        hidden = hf(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states
    # hidden[i + 1] is block i's output, except the last, which transformers gives after the final norm.
    return {f"layers.{i}": hidden[i + 1] for i in range(len(hf.model.layers) - 1)}, logit_max


def test_layer_statistics_equal_an_independent_computation(tmp_path):
    cfg = compose_config(*MODEL, "model.tie_embeddings=false", "trainer.debug.layer_stats_steps=[1]")
    model = Decoder.build(cfg.model, seed=0)
    batch = _batch(cfg)
    outputs, logit_max = _hf_reference(model, batch, tmp_path)

    # Gradients of the mean token loss, and the parameters before the step, from a plain copy of the model.
    reference = Decoder.build(cfg.model, seed=0)
    loss = reference(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"])
    (loss.sum() / batch["labels"].numel()).backward()
    before = {n: p.detach().clone() for n, p in reference.named_parameters()}

    engine = Engine(cfg, init_parallel(cfg.parallel, "cpu"), torch.device("cpu"), model)
    engine.train_step([batch])
    stats = engine.last_layer_stats
    assert stats is not None

    def rms_over(prefix, tensors):
        chosen = [t for n, t in tensors.items() if n.startswith(prefix)]
        return (sum(t.pow(2).sum() for t in chosen) / sum(t.numel() for t in chosen)).sqrt().item()

    for name, h in outputs.items():
        assert stats[f"act_rms/{name}"] == pytest.approx(h.pow(2).mean().sqrt().item(), rel=1e-5)
        assert stats[f"act_max/{name}"] == pytest.approx(h.abs().max().item(), rel=1e-5)
    for name, value in logit_max.items():
        assert stats[f"attn_logit_max/{name}"] == pytest.approx(value, rel=1e-4)
    grads = {n: p.grad for n, p in reference.named_parameters()}
    after = dict(engine.parts[0].named_parameters())
    changes = {n: after[n].detach() - before[n] for n in before}
    for group in ("tok_embeddings", "layers.0", "layers.2", "norm", "output"):
        prefix = group + "."  # layers.0. and not layers.0 (which would also take layers.0x)
        assert stats[f"grad_rms/{group}"] == pytest.approx(rms_over(prefix, grads), rel=1e-5), group
        assert stats[f"update_rms/{group}"] == pytest.approx(rms_over(prefix, changes), rel=1e-4), group
    # Only at the chosen steps: the next step records nothing.
    engine.last_layer_stats = None
    engine.train_step([batch])
    assert engine.last_layer_stats is None


def test_layer_statistics_are_refused_under_deepspeed():
    from forge_lm.trainer.config import ConfigError

    with pytest.raises(ConfigError, match="layer_stats_steps/layer_stats_every need trainer.backend=torch"):
        compose_config(*MODEL, "trainer.backend=deepspeed", "trainer.debug.layer_stats_every=10")
    with pytest.raises(ConfigError, match=r"hold steps >= 1, e.g."):
        compose_config(*MODEL, "trainer.debug.layer_stats_steps=[0]")
