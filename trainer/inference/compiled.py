"""How a decode step is compiled, for the Generator (engine.py) and the server's SlotDecoder (slots.py).

A decode step is small and runs once per generated token, so its cost is mostly per-call overhead:
- on CUDA, CUDA graphs (mode="reduce-overhead") replay the whole step as one launch; the cache tensors the
  step writes in place are marked static so the graph reads and writes them where they are;
- on a CPU, Inductor's C++ wrapper (cpp_wrapper) calls the generated kernels from C++ instead of from a
  Python function, which takes about a sixth off a quickstart-size step (tools/bench_inference.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def compile_decode_step(step: Callable, device: torch.device) -> Callable:
    """`step` compiled once per input shape (dynamic=False) the way `device` runs it fastest."""
    if device.type == "cuda":
        return torch.compile(step, dynamic=False, mode="reduce-overhead")
    return torch.compile(step, dynamic=False, options={"cpp_wrapper": True})


def mark_static(tensors: Iterable[torch.Tensor]) -> None:
    """CUDA graphs replay fixed addresses: tell the compiler that these tensors, which a compiled step updates
    in place (the KV cache), never move, so they are not treated as copies of fresh inputs."""
    for tensor in tensors:
        if tensor.device.type == "cuda":
            torch._dynamo.mark_static_address(tensor)
