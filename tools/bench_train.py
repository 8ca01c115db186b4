"""Training throughput: tokens/s and MFU of the framework's train step, side by side with a plain
`transformers` LlamaForCausalLM train step of the same model (same weights, batch and optimizer).

    forge bench train                          # CPU-sized defaults
    forge bench train --preset 1b --seq 4096 --batch 1 --compile --device cuda

Both steps run interleaved in one process (A, B, A, B, ...) so machine noise hits both alike; the
ratio is framework / transformers. MFU uses 6N + 12*L*H*Q*T FLOPs per token and the device's peak
bf16 FLOP/s (no MFU on a CPU). This is a benchmark script, not a test.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch

from forge_lm.trainer.config import TrainerConfig
from forge_lm.trainer.hub import to_hf
from forge_lm.trainer.loss import lm_loss
from forge_lm.trainer.metrics import device_name, peak_flops
from forge_lm.trainer.model import Decoder, ModelConfig
from forge_lm.trainer.optim import build_optimizer

PRESETS = {
    "tiny": dict(d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=8192),
    "125m": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, vocab_size=32000),
    "1b": dict(d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, vocab_size=128256),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="tiny")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile both models' blocks")
    p.add_argument("--no-hf", action="store_true", help="time only the framework (e.g. a model too big for two copies)")
    args = p.parse_args()

    device = torch.device(args.device)
    bf16 = device.type == "cuda"
    cfg = ModelConfig(max_seq_len=args.seq, tie_embeddings=False, **PRESETS[args.preset])
    ours = Decoder.build(cfg, device=device, seed=0)
    opt_cfg = TrainerConfig(lr=1e-4, weight_decay=0.1)
    steps = {"framework": _framework_step(ours, build_optimizer(ours, opt_cfg), bf16, args.compile)}
    if not args.no_hf:
        hf = _hf_copy(ours, device)
        steps["transformers"] = _hf_step(hf, build_optimizer(hf, opt_cfg), bf16, args.compile)

    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen).to(device)
    inputs, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    for fn in steps.values():
        for _ in range(args.warmup):
            fn(inputs, labels)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.steps):
        for name, fn in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            fn(inputs, labels)
            _sync(device)
            times[name].append(time.perf_counter() - t0)

    tokens = args.batch * args.seq
    flops = ours.flops_per_token(args.seq)
    peak = peak_flops(device_name(device))
    print(f"device: {device_name(device)} | {platform.processor() or platform.machine()} | torch {torch.__version__}")
    print(f"model: {args.preset} ({ours.num_params() / 1e6:.1f}M parameters), batch {args.batch} x seq {args.seq}, "
          f"{'bf16 autocast' if bf16 else 'fp32'}{', compiled' if args.compile else ''}")
    rates = {}
    for name, ts in times.items():
        median = statistics.median(ts)
        rates[name] = tokens / median
        mfu = f" | MFU {flops * rates[name] / peak:.1%}" if peak else ""
        print(f"{name:>13}: {rates[name]:>10,.0f} tokens/s | {median * 1e3:8.1f} ms/step (median of {len(ts)}){mfu}")
    if "transformers" in rates:
        print(f"ratio framework / transformers: {rates['framework'] / rates['transformers']:.2f}x")


def _framework_step(model, optimizer, bf16: bool, compile_blocks: bool):
    if compile_blocks:
        for i, block in enumerate(model.layers):
            model.layers[i] = torch.compile(block)

    def step(inputs, labels):
        with torch.autocast(inputs.device.type, torch.bfloat16, enabled=bf16):
            logits = model(inputs)
        lm_loss(logits, labels).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _hf_copy(model: Decoder, device: torch.device):
    """The same weights as a transformers model, through the framework's own HF export."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as folder:
        to_hf(model, folder)
        hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
    return hf.to(device).train()


def _hf_step(model, optimizer, bf16: bool, compile_blocks: bool):
    if compile_blocks:
        for i, block in enumerate(model.model.layers):
            model.model.layers[i] = torch.compile(block)

    def step(inputs, labels):
        with torch.autocast(inputs.device.type, torch.bfloat16, enabled=bf16):
            logits = model(input_ids=inputs).logits
        lm_loss(logits, labels).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
