"""Chasing NaN and Inf: `trainer.debug.find_nonfinite=true` names the first module whose output (forward) or
input gradient (backward) holds a non-finite value, and the parameters of that module that already do.

Every module's outputs are checked as they are produced, which waits for the device once per module: a
debugging mode for the run that went wrong, off by default. Without it, a non-finite loss is only noticed
at the next log step (trainer/train.py), with no place named.
"""

from __future__ import annotations

import math
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


# ---- layer statistics at chosen steps ------------------------------------------------------------------


def parameter_group(name: str) -> str:
    """The group a parameter's statistics are reported under: its block (`layers.3`) or its top-level
    module (`embed`, `norm`, `output`)."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "layers" and len(parts) > 1 else parts[0]


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor made whole (tensor/sequence-parallel activations, sharded norms); plain tensors as they are."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def attention_logit_max(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """The largest pre-softmax score scale * q.k over causal (query, key) pairs, for q [B, Hq, T, D] and
    k [B, Hkv, T, D]; computed a block of queries at a time so the scores never exceed ~256 MB."""
    B, Hq, T, _ = q.shape
    k = k.repeat_interleave(Hq // k.shape[1], dim=1).float()
    q = q.float()
    chunk = max(1, (1 << 26) // max(1, B * Hq * T))
    best = torch.full((), float("-inf"), device=q.device)
    keys = torch.arange(T, device=q.device)
    for start in range(0, T, chunk):
        queries = torch.arange(start, min(start + chunk, T), device=q.device)
        scores = (q[:, :, queries] @ k.transpose(-2, -1)) * scale
        scores = scores.masked_fill(keys[None, :] > queries[:, None], float("-inf"))
        best = torch.maximum(best, scores.max())
    return best


class LayerStats:
    """Per-layer statistics of chosen training steps (`trainer.debug.layer_stats_steps` / `_every`):

    - `act_rms/<block>`, `act_max/<block>`: RMS and largest magnitude of each block's output (over all of the
      step's micro-batches);
    - `attn_logit_max/<block>`: the largest pre-softmax attention score over causal pairs;
    - `grad_rms/<group>`: RMS of the gradient of each parameter group (a block, the embedding, the final
      norm, the output head) before clipping, over the whole model;
    - `update_rms/<group>`: RMS of what the optimizer step changed in that group's parameters.

    The engine calls `watch` before the forward, `before_update` after the backward and `after_update`
    after the optimizer step, on every rank together; they wait for the device, which is why this runs
    only at the chosen steps. Every statistic is global, whatever the layout: sharded gradients and updates
    are reduced, activation RMS pools the sums of squares of all ranks, maxima are taken over all of them.
    """

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self._handles: list = []
        self._acts: dict[str, list[torch.Tensor]] = {}
        self._logits: dict[str, torch.Tensor] = {}
        self._stats: dict[str, torch.Tensor] = {}
        self._before: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def due(self, step: int) -> bool:
        every = self.cfg.layer_stats_every
        return step in self.cfg.layer_stats_steps or (every > 0 and step % every == 0)

    def watch(self, parts: Iterable[nn.Module]) -> None:
        self._acts, self._logits, self._stats = {}, {}, {}
        for part in parts:
            for name, module in part.named_modules():
                if parameter_group(name) == name and name.startswith("layers."):
                    self._handles.append(module.register_forward_hook(self._record_output(name)))
                    attention = getattr(module, "attention", None)
                    if attention is not None and hasattr(attention, "queries_keys"):
                        hook = self._record_logits(name, attention)
                        self._handles.append(attention.register_forward_pre_hook(hook, with_kwargs=True))

    def _record_output(self, name: str):
        def hook(_module, _inputs, output) -> None:
            with torch.no_grad():
                h = _full(output[0] if isinstance(output, tuple) else output).detach().float()
                sums = torch.stack([h.pow(2).sum(), torch.tensor(float(h.numel()), device=h.device)])
                peak = h.abs().max()
            acc = self._acts.get(name)
            self._acts[name] = [sums, peak] if acc is None else [acc[0] + sums, torch.maximum(acc[1], peak)]

        return hook

    def _record_logits(self, name: str, attention: nn.Module):
        def hook(_module, args, kwargs) -> None:
            if kwargs.get("cache") is not None:
                return
            with torch.no_grad():
                q, k, _ = attention.queries_keys(*args[:3])
                value = attention_logit_max(_full(q), _full(k), attention.scale)
            old = self._logits.get(name)
            self._logits[name] = value if old is None else torch.maximum(old, value)

        return hook

    def before_update(self, parts: Iterable[nn.Module]) -> None:
        """After the backward: the gradients' sums of squares per group, and a copy of the parameters."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        grads: dict[str, list[torch.Tensor]] = {}
        self._before = {}
        with torch.no_grad():
            for part in parts:
                for name, p in part.named_parameters():
                    group = parameter_group(name)
                    if p.grad is not None:
                        grads.setdefault(group, []).append(_full(p.grad.float().pow(2).sum()).reshape(1))
                    self._before[name] = (group, p.detach().clone())
        numel = self._numel(parts)
        for group, sums in grads.items():
            self._stats[f"grad_rms/{group}"] = (torch.cat(sums).sum() / numel[group]).sqrt()

    def after_update(self, parts: Iterable[nn.Module]) -> dict[str, float]:
        """After the optimizer step: the update RMS per group; then everything as floats, on every rank."""
        from forge_lm.trainer.parallel import collectives

        sums: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for part in parts:
                for name, p in part.named_parameters():
                    group, old = self._before[name]
                    change = _full((p.detach().float() - old.float()).pow(2).sum()).reshape(1)
                    sums[group] = change if group not in sums else sums[group] + change
        self._before = {}
        numel = self._numel(parts)
        stats = dict(self._stats)
        stats.update({f"update_rms/{g}": (s.sum() / numel[g]).sqrt() for g, s in sums.items()})
        stats.update({f"attn_logit_max/{name}": value for name, value in self._logits.items()})
        mine = {key: float(value) for key, value in stats.items()}
        sums = {name: (float(sq_and_n[0]), float(sq_and_n[1])) for name, (sq_and_n, _) in self._acts.items()}
        mine.update({f"act_max/{name}": float(peak) for name, (_, peak) in self._acts.items()})
        # Pipeline stages each hold their own blocks, tensor-parallel ranks their own heads, data-parallel
        # ranks their own micro-batches: maxima are the largest anywhere, activation RMS pools every rank's
        # sum of squares (tensor-parallel ranks see the same values, which pooling leaves unchanged), and
        # gradient and update RMS are already global, equal on every rank that has them.
        seen: dict[str, list[float]] = {}
        pooled: dict[str, list[float]] = {}
        for record, rank_sums in collectives.all_gather_object((mine, sums)):
            for key, value in record.items():
                seen.setdefault(key, []).append(value)
            for name, (sq, n) in rank_sums.items():
                acc = pooled.setdefault(name, [0.0, 0.0])
                acc[0], acc[1] = acc[0] + sq, acc[1] + n
        merged = {k: max(v) if "_max/" in k else v[0] for k, v in seen.items()}
        merged.update({f"act_rms/{name}": math.sqrt(sq / n) for name, (sq, n) in pooled.items()})
        return dict(sorted(merged.items(), key=lambda kv: _natural(kv[0])))

    @staticmethod
    def _numel(parts: Iterable[nn.Module]) -> dict[str, int]:
        """Elements per group over the whole model (a DTensor's numel is its global size)."""
        numel: dict[str, int] = {}
        for part in parts:
            for name, p in part.named_parameters():
                group = parameter_group(name)
                numel[group] = numel.get(group, 0) + p.numel()
        return numel


def _natural(key: str) -> tuple:
    """Sort `layers.10` after `layers.9`."""
    return tuple(int(t) if t.isdigit() else t for t in key.replace("/", ".").split("."))
