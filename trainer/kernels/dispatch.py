"""The one rule that decides, per call, whether a fused Triton kernel or the plain PyTorch reference runs.

    use_triton(*tensors) is True when
      - we are not being traced by torch.compile (Inductor fuses the reference itself, and the Triton
        kernels are plain autograd Functions it would have to graph-break around), and
      - every tensor is a plain torch.Tensor (or nn.Parameter): DTensors from FSDP / tensor parallelism,
        fake tensors and other subclasses always take the reference, which accepts them, and
      - FORGE_KERNELS (read at each call) says so:
          auto       (default) Triton when every tensor is on a CUDA device and `triton` imports
          triton     Triton for plain tensors on any device; CPU tensors need TRITON_INTERPRET=1 (the
                     interpreter, for tests and debugging); raises if triton is missing
          reference  never Triton (debugging, benchmarking the reference)

On a CPU run in the default mode nothing changes: the reference is exactly the model's math.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import nn

ENV = "FORGE_KERNELS"
MODES = ("auto", "triton", "reference")

# Exact types only: isinstance would also admit DTensor-like subclasses the kernels cannot read.
_PLAIN = (torch.Tensor, nn.Parameter)


def mode() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(MODES)}")
    return value


@functools.cache
def triton_available() -> bool:
    """Whether `triton` imports (cached; the import itself is deferred until a kernel is first needed)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install (e.g. no matching driver libraries) counts as absent
        return False
    return True


def _interpreting() -> bool:
    from triton import knobs

    return bool(knobs.runtime.interpret)


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the fused Triton kernel should run on these tensors (see the module docstring)."""
    if torch.compiler.is_compiling():
        return False
    chosen = mode()
    if chosen == "reference":
        return False
    if not all(type(t) in _PLAIN for t in tensors):
        return False
    if chosen == "auto":
        return all(t.is_cuda for t in tensors) and triton_available()
    # Forced: fail loudly rather than quietly benchmark or debug the wrong code path.
    if not triton_available():
        raise RuntimeError(f"{ENV}=triton but triton does not import")
    if not all(t.is_cuda for t in tensors) and not _interpreting():
        raise RuntimeError(f"{ENV}=triton on CPU tensors needs the Triton interpreter (TRITON_INTERPRET=1)")
    return True
