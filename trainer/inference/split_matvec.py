"""Decode steps on a CPU: every core streams weights, not one.

A decode step multiplies a few rows of activations (one per sequence) by every weight matrix of the
model, so on a CPU it is bound by reading the weights from memory. The BLAS runs such a skinny product
(M rows, M <= MAX_ROWS) on a single thread, and one core's stream leaves most of the memory bandwidth
unused. Inside `split_matvecs()`, each such `F.linear` is cut into `parts` blocks of output rows (one
per thread, up to MAX_PARTS) computed as one batched product, which the BLAS spreads over the threads:

    with split_matvecs(device):
        logits = model(tokens, cache=cache)

Each output element is the same dot product as before, over the same inputs, so greedy tokens stay the
same (fp32); only the BLAS kernel that computes it changes, as when the batch size changes. Measured in
`forge bench inference` (docs/BENCHMARKS.md). The mode is traced by torch.compile like the rest of the
step; prefill (many rows) and GPUs are left alone.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

MAX_ROWS = 16
"""Products with more rows than this (prefill) are compute-bound and threaded by the BLAS already."""
MAX_PARTS = 8


class _SplitMatVecs(TorchFunctionMode):
    def __init__(self, parts: int) -> None:
        super().__init__()
        self.parts = parts

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            split = self._split(*args, **kwargs)
            if split is not None:
                return split
        return func(*args, **kwargs)

    def _split(self, x: torch.Tensor, weight: torch.Tensor, bias: Any = None) -> Any:
        n, k = weight.shape
        rows = x.numel() // k
        if bias is not None or rows > MAX_ROWS or n % self.parts or not weight.is_contiguous():
            return None
        p = self.parts
        flat = x.reshape(rows, k).expand(p, rows, k)
        blocks = torch.bmm(flat, weight.view(p, n // p, k).transpose(1, 2))  # [p, rows, n/p]
        return blocks.transpose(0, 1).reshape(*x.shape[:-1], n)


def split_matvecs(device: torch.device) -> contextlib.AbstractContextManager:
    """The context a decode step runs in: the split on a CPU with more than one thread, else nothing."""
    parts = min(torch.get_num_threads(), MAX_PARTS)
    if device.type != "cpu" or parts < 2:
        return contextlib.nullcontext()
    return _SplitMatVecs(parts)
