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
