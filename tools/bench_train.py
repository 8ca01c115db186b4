"""Training throughput of the real step, `Engine.train_step`, side by side with a plain `transformers` step.

    forge bench train                                   # CPU-sized defaults: the ~7M model
    forge bench train --preset 100m --steps 6           # ~100M parameters
    forge bench train --preset 1b --seq 4096 --batch 1 --device cuda --no-hf
    torchrun --nproc-per-node 8 -m forge_lm.tools.bench_train --preset 1b --layout parallel.dp_shard=8 --no-hf
    forge bench train --overhead --steps 40              # what the default instrumentation costs a step
    torchrun --nproc-per-node 2 -m forge_lm.tools.bench_train --model mixtral_tiny --layout parallel.ep=2 \
        parallel.dp_shard=2 --no-hf                      # MoE: expert-parallel dispatch time beside the step

The framework side is the engine the trainer runs (`forge_lm.trainer.engine.Engine`, built from the same
config tree, with the chosen layout's code path: `--layout` takes `parallel.*` overrides), once eager and
once with `parallel.compile=true`. The reference is `LlamaForCausalLM` loaded from the framework's own export
of the same weights, stepped with the same optimizer, clipping and batch, eager. All steps run interleaved
in one process (A, B, C, A, B, C, ...) so machine noise hits them alike; ratios are tokens/s over the eager
transformers step's. MFU uses 6N + attention FLOPs per token and the device's peak bf16 FLOP/s (none on a
CPU). This is a benchmark script, not a test.

`--overhead` instead times the same eager engine with and without the default instrumentation: the step-time
breakdown (trainer/timing.py) and, every `--log-every` steps, reading it and writing the train record to
metrics.jsonl and TensorBoard, as the training loop does. Blocks of `--log-every` steps alternate between
the two; the overhead is the median over block pairs of (instrumented / bare - 1).

With `--model` a mixture-of-experts preset and `parallel.ep` > 1 in the layout, each framework line is followed
by the step's expert-parallel dispatch time (trainer/parallel/moe_parallel.py: the all-to-all exchanges and the
grouped matmuls over the rank's own experts, forward and backward; median per step, rank 0's).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch

from forge_lm.trainer.config import TrainerConfig
from forge_lm.trainer.config_store import compose, to_config
from forge_lm.trainer.engine import Engine
from forge_lm.trainer.hub import to_hf
from forge_lm.trainer.loss import lm_loss
from forge_lm.trainer.metrics import device_name, peak_flops
from forge_lm.trainer.model import Decoder
from forge_lm.trainer.optim import build_optimizer
from forge_lm.trainer.parallel.mesh import init_parallel, shutdown
from forge_lm.trainer.parallel.moe_parallel import dispatch_timer

PRESETS = {  # Llama-3-style shapes
    "tiny": dict(d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=8192),  # ~7M parameters
    "100m": dict(d_model=768, n_layers=10, n_heads=12, n_kv_heads=4, vocab_size=16384),  # ~100M
    "1b": dict(d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, vocab_size=128256),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="tiny")
    p.add_argument("--model", default="llama3_tiny", help="the family preset (configs/model), e.g. mixtral_tiny")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="sequences per step on each data-parallel rank")
    p.add_argument("--steps", type=int, default=10, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layout", nargs="*", default=[], help="parallel.* overrides (under torchrun)")
    p.add_argument("--no-compile", action="store_true", help="skip the parallel.compile=true engine")
    p.add_argument("--no-hf", action="store_true", help="skip transformers (e.g. a model too big for copies)")
    p.add_argument("--overhead", action="store_true", help="time the default instrumentation instead")
    p.add_argument("--log-every", type=int, default=10, help="--overhead: steps between two log records")
    args = p.parse_args()

    device = torch.device(args.device)
    bf16 = device.type == "cuda"
    shape = [f"model.{k}={v}" for k, v in PRESETS[args.preset].items()]
    base = [
        f"model={args.model}", *shape, f"model.max_seq_len={args.seq}", "model.tie_embeddings=false",
        f"data.seq_len={args.seq}", f"trainer.micro_batch_size={args.batch}", "trainer.lr=1e-4",
        f"trainer.precision={'bf16' if bf16 else 'fp32'}", f"trainer.device={device.type}", *args.layout,
    ]  # fmt: skip
    # A multiple of every data-parallel size the layout can have (it divides the world size), to learn it.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = to_config(compose([*base, f"trainer.global_batch_tokens={args.batch * args.seq * world}"]))
    dp = cfg.parallel.dp_size
    if dp != world:  # one micro-batch per rank and step
        cfg = to_config(compose([*base, f"trainer.global_batch_tokens={args.batch * args.seq * dp}"]))
    dims = init_parallel(cfg.parallel, device.type)
    if device.type == "cuda":
        device = torch.device("cuda", dims.local_rank)

    if args.overhead:
        _overhead(cfg, dims, device, args)
        shutdown()
        return

    steps, model_info = {}, None
    variants = [("framework eager", False)] + ([] if args.no_compile else [("framework compiled", True)])
    for name, compiled in variants:
        cfg.parallel.compile = compiled
        model = Decoder.build(cfg.model, device=device, seed=0)
        model_info = model_info or (model.num_params(), model.flops_per_token(args.seq))
        if name == "framework eager" and not args.no_hf and dims.world_size == 1:
            steps["transformers eager"] = _hf_step(_hf_copy(model, device), cfg.trainer, bf16)
        engine = Engine(cfg, dims, device, model)
        steps[name] = _engine_step(engine)

    gen = torch.Generator().manual_seed(dims.dp_rank)
    ids = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq + 1), generator=gen)
    batch = {
        "input_ids": ids[:, :-1].contiguous(),
        "labels": ids[:, 1:].contiguous(),
        "position_ids": torch.arange(args.seq).expand(args.batch, args.seq),
    }
    for fn in steps.values():
        for _ in range(args.warmup):
            fn(batch)
    times: dict[str, list[float]] = {k: [] for k in steps}
    dispatch: dict[str, dict[str, list[float]]] = {k: {} for k in steps}
    for _ in range(args.steps):
        for name, fn in steps.items():
            _sync(device)
            dispatch_timer.take()
            t0 = time.perf_counter()
            fn(batch)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            for what, seconds in dispatch_timer.take().items():
                dispatch[name].setdefault(what, []).append(seconds)

    if dims.is_main:
        n_params, flops = model_info
        tokens = args.batch * args.seq * dp
        peak = peak_flops(device_name(device))
        print(
            f"device: {device_name(device)} | {platform.processor() or platform.machine()} | torch {torch.__version__}"
        )
        print(
            f"model: {args.preset} ({n_params / 1e6:.1f}M parameters), batch {args.batch} x seq {args.seq} per rank, "
            f"{dims.world_size} rank(s) {' '.join(args.layout) or ''}, {'bf16' if bf16 else 'fp32'}"
        )
        rates = {}
        for name, ts in times.items():
            median = statistics.median(ts)
            rates[name] = tokens / median
            mfu = f" | MFU {flops * rates[name] / (peak * dims.world_size):.1%}" if peak else ""
            print(
                f"{name:>19}: {rates[name]:>10,.0f} tokens/s | {median * 1e3:8.1f} ms/step (median of {len(ts)}){mfu}"
            )
            if dispatch[name]:
                parts = [f"{what} {statistics.median(v) * 1e3:.1f} ms" for what, v in sorted(dispatch[name].items())]
                print(f"{'':>19}  MoE dispatch per step: {', '.join(parts)} (expert parallelism, rank 0)")
        if "transformers eager" in rates:
            for name in (n for n in rates if n.startswith("framework")):
                print(f"ratio {name} / transformers eager: {rates[name] / rates['transformers eager']:.2f}x")
    shutdown()


def _batch(cfg, args, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq + 1), generator=gen)
    return {
        "input_ids": ids[:, :-1].contiguous(),
        "labels": ids[:, 1:].contiguous(),
        "position_ids": torch.arange(args.seq).expand(args.batch, args.seq),
    }


def _overhead(cfg, dims, device: torch.device, args) -> None:
    """Instrumented vs bare blocks of `log_every` steps of one eager engine, alternating."""
    from forge_lm.trainer.config import WandbConfig
    from forge_lm.trainer.metrics import MetricsLogger
    from forge_lm.trainer.timing import breakdown_record

    engine = Engine(cfg, dims, device, Decoder.build(cfg.model, device=device, seed=0))
    batch = _batch(cfg, args, dims.dp_rank)
    with tempfile.TemporaryDirectory() as run_dir:
        metrics = MetricsLogger(run_dir, WandbConfig(mode="disabled"), "overhead", {}, tensorboard=True)

        def block(instrumented: bool) -> float:
            engine.clock.enabled = instrumented
            _sync(device)
            t0 = time.perf_counter()
            for i in range(args.log_every):
                out = engine.train_step([batch])
                if instrumented and i == args.log_every - 1:
                    record = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in out.items()}
                    record.update(breakdown_record(engine.clock.read(), args.log_every))
                    metrics.log(engine.steps_done, record, "train")
            if not instrumented:
                float(out["loss"])  # the bare loop reads its loss once per block too
            _sync(device)
            return time.perf_counter() - t0

        for _ in range(args.warmup):
            block(True), block(False)
        ratios, bare, instr = [], [], []
        for i in range(args.steps):
            first = i % 2 == 0  # alternate which goes first, so drift hits both alike
            a, b = (block(True), block(False)) if first else tuple(reversed((block(False), block(True))))
            instr.append(a), bare.append(b), ratios.append(a / b)
        metrics.close()
    if dims.is_main:
        print(
            f"device: {device_name(device)} | {platform.processor() or platform.machine()} | torch {torch.__version__}"
        )
        print(
            f"model: {args.preset}, batch {args.batch} x seq {args.seq}, blocks of {args.log_every} steps, "
            f"{args.steps} pairs"
        )
        print(f"bare:         {statistics.median(bare) / args.log_every * 1e3:8.2f} ms/step (median block)")
        print(f"instrumented: {statistics.median(instr) / args.log_every * 1e3:8.2f} ms/step (median block)")
        q = statistics.quantiles(ratios, n=4)
        print(
            f"overhead of the breakdown + metrics.jsonl + TensorBoard: {100 * (statistics.median(ratios) - 1):+.2f}% "
            f"(median of per-pair ratios; quartiles {100 * (q[0] - 1):+.2f}% .. {100 * (q[2] - 1):+.2f}%)"
        )


def _engine_step(engine: Engine):
    def step(batch):
        engine.train_step([batch])

    return step


def _hf_copy(model: Decoder, device: torch.device):
    """The same weights as a transformers model, through the framework's own HF export."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as folder:
        to_hf(model, folder)
        hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
    return hf.to(device).train()


def _hf_step(model, trainer_cfg: TrainerConfig, bf16: bool):
    optimizer = build_optimizer(model, trainer_cfg)

    def step(batch):
        inputs, labels = batch["input_ids"].to(model.device), batch["labels"].to(model.device)
        with torch.autocast(inputs.device.type, torch.bfloat16, enabled=bf16):
            logits = model(input_ids=inputs).logits
        lm_loss(logits, labels).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), trainer_cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
