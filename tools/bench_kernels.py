"""Speed and memory of the fused Triton kernels against their references (plain and torch.compile'd).

    forge bench kernels                                  # on a CUDA GPU, Llama-1B-like shapes
    forge bench kernels --kernels cross_entropy --vocab 128256 --tokens 8192 --d-model 2048
    forge bench kernels --json bench.json                # also write the rows as JSON

For each kernel it times forward + backward (median ms, triton.testing.do_bench) and records the peak
memory that one forward + backward adds on top of its inputs, for: `triton` (the fused kernel),
`reference` (trainer/kernels/reference.py, the model's math in eager PyTorch) and `compiled` (the
reference through torch.compile, what a compiled block runs). The cross-entropy row is the one that matters
for memory: the fused version never holds the [tokens, vocab] logits.

The Triton kernels need a CUDA GPU. Without one the script says so and stops; `--cpu` times the reference
alone instead (pass small shapes), and with TRITON_INTERPRET=1 `--cpu --impls triton,reference` runs the
kernels in Triton's interpreter, which checks that the script works, not how fast anything is.
This is a benchmark script, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

from forge_lm.trainer.kernels import reference

KERNELS = ("rms_norm", "rope", "gated", "cross_entropy")
IMPLS = ("triton", "reference", "compiled")


def _triton_module(kernel: str):
    """The fused implementation, called directly (not through the dispatch) so nothing can fall back."""
    if kernel == "rms_norm":
        from forge_lm.trainer.kernels import triton_rms_norm as mod
    elif kernel == "rope":
        from forge_lm.trainer.kernels import triton_rope as mod
    elif kernel == "gated":
        from forge_lm.trainer.kernels import triton_gated as mod
    else:
        from forge_lm.trainer.kernels import triton_cross_entropy as mod
    return mod


def _problem(kernel: str, args, device: torch.device, dtype: torch.dtype):
    """(inputs that get gradients, impl module -> function of those inputs, description)."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype).requires_grad_()

    B, T, d = args.batch, args.seq, args.d_model
    if kernel == "rms_norm":
        x, w = randn(B, T, d), randn(d, scale=0.1)
        return (x, w), lambda m: lambda a, b: m.rms_norm(a, b, 1e-6, False), f"x [{B}, {T}, {d}]"
    if kernel == "rope":
        H, D = args.heads, args.head_dim
        x = randn(B, H, T, D)
        angles = torch.arange(T, dtype=torch.float32)[:, None] * torch.rand(D // 2, generator=gen)
        angles = torch.cat((angles, angles), -1).expand(B, T, D).to(device)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        return (x,), lambda m: lambda a: m.apply_rotary(a, cos, sin, False), f"q [{B}, {H}, {T}, {D}]"
    if kernel == "gated":
        gate, up = randn(B, T, args.ffn), randn(B, T, args.ffn)
        return (
            (gate, up),
            lambda m: lambda g, u: m.gated_activation(g, u, "silu"),
            f"gate/up [{B}, {T}, {args.ffn}]",
        )
    N, V = args.tokens, args.vocab
    h, w = randn(N, d), randn(V, d, scale=0.02)
    targets = torch.randint(0, V, (N,), generator=gen).to(device)
    return (
        (h, w),
        lambda m: lambda a, b: m.linear_cross_entropy(a, b, targets),
        f"hidden [{N}, {d}], weight [{V}, {d}]",
    )


def _fwd_bwd(fn: Callable, inputs: tuple[torch.Tensor, ...]) -> Callable[[], None]:
    out = fn(*inputs)
    upstream = torch.ones_like(out) if out.dim() == 1 else torch.randn_like(out)

    def step() -> None:
        torch.autograd.grad(fn(*inputs), inputs, upstream)

    return step


def _time_ms(step: Callable[[], None], device: torch.device, reps: int) -> float:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(step, warmup=max(reps // 4, 1), rep=reps, return_mode="median")
    step()  # warm-up
    times = []
    for _ in range(max(reps // 20, 3)):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _peak_mib(step: Callable[[], None], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated subset of {KERNELS}")
    p.add_argument("--impls", default=None, help=f"comma-separated subset of {IMPLS} (default: all on a GPU)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--ffn", type=int, default=8192)
    p.add_argument("--tokens", type=int, default=8192, help="rows of the linear + cross-entropy")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--reps", type=int, default=100, help="timing budget per measurement (ms on a GPU)")
    p.add_argument("--cpu", action="store_true", help="no GPU: time on the CPU (reference only by default)")
    p.add_argument("--json", help="write the result rows to this file")
    args = p.parse_args()

    if torch.cuda.is_available():
        device, impls = torch.device("cuda"), list(IMPLS)
    elif args.cpu:
        device, impls = torch.device("cpu"), ["reference"]
        print("no CUDA device: timing on the CPU (the Triton kernels need a GPU, or TRITON_INTERPRET=1)")
    else:
        sys.exit(
            "tools.bench_kernels needs a CUDA GPU: the Triton kernels only compile for one. "
            "Use --cpu (with small shapes) to time the references alone."
        )
    if args.impls:
        impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name} | torch {torch.__version__} | {args.dtype}")

    rows = []
    for kernel in [k.strip() for k in args.kernels.split(",") if k.strip()]:
        if kernel not in KERNELS:
            sys.exit(f"unknown kernel {kernel!r}: expected some of {KERNELS}")
        inputs, make, shape = _problem(kernel, args, device, dtype)
        print(f"\n{kernel}: {shape}")
        for impl in impls:
            if impl == "triton":
                fn = make(_triton_module(kernel))
            elif impl == "reference":
                fn = make(reference)
            elif impl == "compiled":
                fn = torch.compile(make(reference))
            else:
                sys.exit(f"unknown implementation {impl!r}: expected some of {IMPLS}")
            step = _fwd_bwd(fn, inputs)
            ms = _time_ms(step, device, args.reps)
            peak = _peak_mib(step, device)
            rows.append(dict(kernel=kernel, impl=impl, shape=shape, fwd_bwd_ms=ms, peak_mib=peak))
            mem = f" | peak {peak:9.1f} MiB" if peak is not None else ""
            print(f"  {impl:>9}: {ms:9.3f} ms fwd+bwd{mem}")
            del fn, step
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=name, dtype=args.dtype, rows=rows), f, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
