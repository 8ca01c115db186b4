"""Check the planner against a real run: `forge memcheck <overrides> [launch.gpu=h100]`.

Builds the real Engine for the config (alone, or under torchrun for a multi-rank layout), trains a few steps
on random tokens, and prints, per rank, the planner's peak estimate for that rank next to the peak memory
the run actually allocated (torch.cuda.max_memory_allocated on a GPU; on a CPU there is no allocator peak,
so only the parameter / gradient / optimizer bytes are compared). Example on one GPU:

    forge memcheck model=llama3_1b data.seq_len=2048 trainer.global_batch_tokens=8192 \\
        trainer.micro_batch_size=2 parallel.activation_checkpointing=none launch.gpu=h100

Exit status 0 when every rank's estimate is within `--tolerance` (default 0.15) of the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Optional


def _state_bytes(engine) -> dict[str, int]:
    import torch
    from torch.distributed.tensor import DTensor

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    def nbytes(ts):
        return sum(local(t).numel() * local(t).element_size() for t in ts)

    params = [p for part in engine.parts for p in part.parameters()]
    state = [v for o in engine.optimizers for s in o.state.values() for v in s.values() if torch.is_tensor(v)]
    return {"params": nbytes(params), "optimizer": nbytes(state)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="forge memcheck", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=3, help="training steps to run (the peak is the max over them)"
    )
    parser.add_argument(
        "--tolerance", type=float, default=0.15, help="allowed relative error of the peak estimate"
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    import torch

    from forge_lm.launch.config import compose
    from forge_lm.launch.plan import estimate, rank_state
    from forge_lm.trainer.config import ConfigError
    from forge_lm.trainer.engine import Engine
    from forge_lm.trainer.model import Decoder
    from forge_lm.trainer.parallel.mesh import init_parallel, shutdown, world_from_env

    world, rank, local_rank = world_from_env()
    overrides = [o for o in args.overrides if not o.startswith(("launch.nodes=", "launch.gpus_per_node="))]
    try:
        cfg, launch = compose([*overrides, "launch.nodes=1", f"launch.gpus_per_node={world}"])
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = 32000
    on_gpu = torch.cuda.is_available() and cfg.trainer.device != "cpu"
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    plan = estimate(cfg, launch)
    planned = rank_state(cfg, rank)
    dims = init_parallel(cfg.parallel, device.type)
    model = Decoder.build(cfg.model, device=device, seed=0)
    engine = Engine(cfg, dims, device, model)
    del model
    gen = torch.Generator().manual_seed(rank)
    mbs, seq = cfg.trainer.micro_batch_size, cfg.data.seq_len

    def batch():
        ids = torch.randint(0, cfg.model.vocab_size, (mbs, seq + 1), generator=gen)
        return {
            "input_ids": ids[:, :-1],
            "labels": ids[:, 1:],
            "position_ids": torch.arange(seq).expand(mbs, seq),
        }

    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.steps):
        engine.train_step([batch() for _ in range(cfg.grad_accum_steps)])
    measured = _state_bytes(engine)
    record = {
        "rank": rank,
        "planned_params": planned.params,
        "measured_params": measured["params"],
        "planned_optimizer": planned.optimizer,
        "measured_optimizer": measured["optimizer"],
    }
    ok = (
        record["planned_params"] == record["measured_params"]
        and record["planned_optimizer"] == record["measured_optimizer"]
    )
    if on_gpu:
        peak = torch.cuda.max_memory_allocated(device)
        # the plan's peak is for its worst rank; compare this rank with its own estimate where they differ
        record.update(planned_peak=plan.memory.peak, measured_peak=peak, error=plan.memory.peak / peak - 1)
        ok = ok and abs(record["error"]) <= args.tolerance
    print(json.dumps(record), flush=True)
    del engine
    if world > 1:
        shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
