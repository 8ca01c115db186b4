"""Chasing NaN and Inf: `trainer.debug.find_nonfinite=true` names the first module whose output (forward) or
input gradient (backward) holds a non-finite value, and the parameters of that module that already do.

Every module's outputs are checked as they are produced, which waits for the device once per module: a
debugging mode for the run that went wrong, off by default. Without it, a non-finite loss is only noticed
at the next log step (trainer/train.py), with no place named.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


class NonFiniteError(FloatingPointError):
    """Raised at the first non-finite module output or gradient; the message says where."""


def _tensors(value: Any) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _bad(value: Any) -> bool:
    return any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in _tensors(value))


def _suspects(module: nn.Module) -> str:
    bad = [name for name, p in module.named_parameters(recurse=False) if not bool(torch.isfinite(p).all())]
    return f"; its own non-finite parameters: {', '.join(bad)}" if bad else "; its own parameters are finite"


class NonFiniteHunter:
    """Hooks on every module of `parts` that raise NonFiniteError at the first non-finite value."""

    def __init__(self, parts: Iterable[nn.Module]) -> None:
        # Modules fed only integer inputs (the embedding) get their hook on the output gradient; torch warns.
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        self.step = 0
        self._handles = []
        for part in parts:
            for name, module in part.named_modules():
                label = f"{name or '(the model)'} ({type(module).__name__})"
                self._handles.append(module.register_forward_hook(self._forward_check(label, module)))
                self._handles.append(module.register_full_backward_hook(self._backward_check(label)))

    def _forward_check(self, label: str, module: nn.Module):
        def hook(_module, inputs, output) -> None:
            if _bad(output):
                where = "its inputs were already non-finite" if _bad(inputs) else "from finite inputs"
                raise NonFiniteError(
                    f"step {self.step}: the forward output of {label} is non-finite ({where}{_suspects(module)})."
                )

        return hook

    def _backward_check(self, label: str):
        def hook(_module, grad_input, grad_output) -> None:
            if _bad(grad_input):
                where = (
                    "its output gradient was already non-finite"
                    if _bad(grad_output)
                    else "from finite gradients"
                )
                raise NonFiniteError(
                    f"step {self.step}: the input gradient of {label} is non-finite ({where})."
                )

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
