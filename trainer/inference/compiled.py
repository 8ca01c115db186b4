"""How a decode step is compiled, for the Generator (engine.py) and the server's SlotDecoder (slots.py).

A decode step is small and runs once per generated token, so its cost is mostly per-call overhead:
- on CUDA, CUDA graphs (mode="reduce-overhead") replay the whole step as one launch; the cache tensors the
  step writes in place are marked static so the graph reads and writes them where they are;
- on a CPU, Inductor's C++ wrapper (cpp_wrapper) calls the generated kernels from C++ instead of from a
  Python function, which takes about a sixth off a quickstart-size step (tools/bench_inference.py), and
  the step keeps no guards on the model's modules: checking them before every call cost more than a
  tenth of a step once the step itself got fast (split_matvec.py). The model a Generator or SlotDecoder
  decodes with is fixed at construction; its weights may change in place (they are read at every call),
  but swapping its submodules after the first step is not seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def compile_decode_step(step: Callable, device: torch.device) -> Callable:
    """`step` compiled once per input shape (dynamic=False) the way `device` runs it fastest."""
    if device.type == "cuda":
        return torch.compile(step, dynamic=False, mode="reduce-overhead")
    return torch.compile(
        step, dynamic=False,
        options={"cpp_wrapper": True, "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe},
    )  # fmt: skip


def mark_static(tensors: Iterable[torch.Tensor]) -> None:
    """CUDA graphs replay fixed addresses: tell the compiler that these tensors, which a compiled step updates
    in place (the KV cache), never move, so they are not treated as copies of fresh inputs."""
    for tensor in tensors:
        if tensor.device.type == "cuda":
            torch._dynamo.mark_static_address(tensor)
