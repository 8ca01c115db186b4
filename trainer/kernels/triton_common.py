"""Small pieces shared by the Triton kernels (imported only once a Triton path is taken)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def tanh(x):
    """tanh from exp, the same code on every backend (the interpreter included).

    exp(-2|x|) never overflows; the sign is put back afterwards. Absolute error is a few float32 ulps,
    which is all GeGLU (1 + tanh) and soft-capping (cap * tanh) can see.
    """
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


def rows_2d(x: torch.Tensor) -> torch.Tensor:
    """x viewed as [rows, last dim] with unit stride along the last dim (a copy only when needed)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 or x2.shape[-1] == 1 else x2.contiguous()


def num_programs(device: torch.device, work: int, per_sm: int = 4) -> int:
    """How many persistent programs to launch for `work` items: a few per SM, never more than the work."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter runs programs one after another; a few are enough to exercise the split
        sms = 1
    return max(1, min(work, per_sm * sms))


def warps_for(block: int) -> int:
    """Warps for a program that holds `block` elements of a row: enough threads, without idle ones."""
    return min(max(block // 256, 1), 16)
