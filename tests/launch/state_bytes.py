"""Run under torchrun: build the real Engine for several layouts and dump what each rank holds.

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.launch.state_bytes OUT.json \\
        "parallel.dp_shard=2" "parallel.tp=2 parallel.dp_shard=1" ...

For each layout (a space-separated list of overrides, added to MODEL): two real optimizer steps on random
tokens (the second with zero_grad disabled, so gradients stay), then the bytes of this rank's parameters,
gradients and optimizer state, counted from the local tensors (DTensor shards included). Rank r writes
OUT.json.r: {layout: {"params": .., "grads": .., "optimizer": ..}}.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

MODEL = [
    "model.d_model=64",
    "model.n_layers=4",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.max_seq_len=64",
    "model.vocab_size=1024",
    "model.tie_embeddings=false",
    "data.seq_len=64",
    "trainer.global_batch_tokens=512",
    "trainer.micro_batch_size=1",
    "trainer.precision=fp32",
    "trainer.device=cpu",
]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _bytes(tensors) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors)


def measure(overrides: list[str]) -> dict[str, int]:
    from forge_lm.trainer.engine import Engine
    from forge_lm.trainer.model import Decoder
    from forge_lm.trainer.parallel.mesh import init_parallel
    from tests.conftest import compose_config

    cfg = compose_config(*MODEL, *overrides)
    dims = init_parallel(cfg.parallel, "cpu")
    model = Decoder.build(cfg.model, device="cpu", seed=0)
    engine = Engine(cfg, dims, torch.device("cpu"), model)
    del model
    gen = torch.Generator().manual_seed(0)
    seq = cfg.data.seq_len

    def batch():
        ids = torch.randint(0, cfg.model.vocab_size, (cfg.trainer.micro_batch_size, seq + 1), generator=gen)
        pos = torch.arange(seq).expand(cfg.trainer.micro_batch_size, seq)
        return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "position_ids": pos}

    engine.train_step([batch() for _ in range(cfg.grad_accum_steps)])
    for opt in engine.optimizers:  # keep the gradients of the next step to count them
        opt.zero_grad = lambda set_to_none=True: None
    engine.train_step([batch() for _ in range(cfg.grad_accum_steps)])
    params = [p for part in engine.parts for p in part.parameters()]
    state = [
        v for opt in engine.optimizers for s in opt.state.values() for v in s.values() if torch.is_tensor(v)
    ]
    result = {
        "params": _bytes(params),
        "grads": _bytes(p.grad for p in params if p.grad is not None),
        "optimizer": _bytes(state),
    }
    del engine, params, state
    return result


def main() -> None:
    out, layouts = sys.argv[1], sys.argv[2:]
    results = {layout: measure(layout.split()) for layout in layouts}
    with open(f"{out}.{dist.get_rank()}", "w") as f:
        json.dump(results, f)
    from forge_lm.trainer.parallel.mesh import shutdown

    shutdown()


if __name__ == "__main__":
    main()
