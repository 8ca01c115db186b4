"""A training step that does not log leaves its numbers on the device: the framework's own code calls no
`Tensor.item` / `tolist` / `__bool__` / `__float__` / `__int__` (each a wait for the GPU) during it.

Counted on the CPU by wrapping those methods and attributing each call to the code that made it: only calls
made from the forge_lm packages count (PyTorch's own bookkeeping on CPU scalars, e.g. the optimizer's step
counter, is not a device sync and is not ours to change).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from forge_lm.trainer.engine import Engine
from forge_lm.trainer.model import Decoder
from forge_lm.trainer.parallel.mesh import init_parallel
from tests.conftest import REPO, compose_config

OURS = tuple(str(REPO / d) for d in ("trainer", "data", "launch", "tools", "forge_lm"))
SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__")
MODEL = [
    "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=64",
    "model.vocab_size=512", "data.seq_len=64", "trainer.global_batch_tokens=256", "trainer.micro_batch_size=2",
    "trainer.precision=fp32", "trainer.device=cpu", "trainer.grad_clip=1.0",
]  # fmt: skip


class SyncCounter:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self._saved = {}

    def __enter__(self) -> SyncCounter:
        for name in SYNCS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original
            setattr(torch.Tensor, name, self._counting(name, original))
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)

    def _counting(self, name, original):
        def wrapper(tensor, *args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(OURS):
                where = f"{Path(caller.f_code.co_filename).relative_to(REPO)}:{caller.f_lineno}"
                self.calls.append(f"Tensor.{name} at {where}")
            return original(tensor, *args, **kwargs)

        return wrapper


def _batches(cfg, gen):
    seq, mb = cfg.data.seq_len, cfg.trainer.micro_batch_size
    out = []
    for _ in range(cfg.grad_accum_steps):
        ids = torch.randint(0, cfg.model.vocab_size, (mb, seq + 1), generator=gen)
        labels = ids[:, 1:].clone()
        labels[0, : seq // 4] = -100  # padding: token counting must not read them back either
        out.append({"input_ids": ids[:, :-1], "labels": labels, "position_ids": torch.arange(seq).expand(mb, seq)})
    return out


# The MoE experts' eager padded path (CPU, or fp32 on CUDA) reads the largest expert group to size its
# buffer: one documented sync per MoE layer. The CUDA bf16 path (torch._grouped_mm) has none.
PADDED_MOE = "trainer/model/moe.py"


@pytest.mark.parametrize("family", ["llama3_tiny", "qwen3_moe_tiny"])
def test_a_non_logging_step_makes_no_host_sync(family):
    cfg = compose_config(f"model={family}", *MODEL)
    model = Decoder.build(cfg.model, device="cpu", seed=0)
    engine = Engine(cfg, init_parallel(cfg.parallel, "cpu"), torch.device("cpu"), model)
    gen = torch.Generator().manual_seed(0)
    engine.train_step(_batches(cfg, gen))  # the first step builds optimizer state
    batches = _batches(cfg, gen)
    with SyncCounter() as counter:
        out = engine.train_step(batches)
    ours = [c for c in counter.calls if not (family.startswith("qwen3_moe") and PADDED_MOE in c)]
    assert ours == [], "host syncs in a training step:\n" + "\n".join(ours)
    if family.startswith("qwen3_moe"):
        assert len(counter.calls) == cfg.model.n_layers * cfg.grad_accum_steps  # one per layer and forward
        assert {k for k in out if k.startswith("moe_")}, "the MoE statistics are returned too"
    assert all(isinstance(v, torch.Tensor) for k, v in out.items() if k != "lr")
    seq, mb = cfg.data.seq_len, cfg.trainer.micro_batch_size
    assert out["tokens"].item() == cfg.grad_accum_steps * (mb * seq - seq // 4)
    assert torch.isfinite(out["loss"])
