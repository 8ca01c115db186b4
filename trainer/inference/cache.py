"""A static, preallocated key/value cache for batched generation.

Layout. Prompts of different lengths are left-padded to a common length, so that every row writes its
next token into the same cache slot: slot s of row b holds the token at position s - pad[b]. One prefill
fills slots 0 .. T-1, then each decode step writes one slot for all rows at once. Shapes never change
during generation, which is what lets the decode step be compiled once (and captured as a CUDA graph).

Full-attention layers keep every slot: [B, n_kv_heads, max_len, head_dim]. Sliding-window layers keep only
the last `window` slots in a ring buffer ([B, n_kv_heads, min(window, max_len), head_dim]): slot s lives at
ring index s % window, so Gemma 2/3 with their 5-in-6 local layers need a fraction of the memory. Keys and
values are stored per kv head (grouped-query attention shares them across query heads), after RoPE.

Which cached keys a query may see is expressed as a boolean mask (True = attend), built once per forward for
each kind of layer:
    full:     pad[b] <= key slot <= query slot
    sliding:  the same, and query slot - key slot < window
Padding queries (slots < pad[b], prefill only) attend to themselves alone, so their rows stay finite: a
fully masked row would be NaN, and 0 * NaN in the attention's weighted sum would poison real rows.
"""

from __future__ import annotations

from typing import Optional

import torch

from forge_lm.trainer.model.config import ModelConfig


class LayerCache:
    """One layer's keys and values, and how to write into them."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, window: Optional[int], owner: KVCache) -> None:
        self.k, self.v = k, v
        self.window = window  # ring size for sliding layers, None for full layers
        self.owner = owner

    @property
    def ring(self) -> bool:
        return self.window is not None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's k, v [B, n_kv_heads, T, head_dim]; return what the queries attend over.

        Prefill attends over its own fresh keys (all T of them, even where a ring keeps fewer); a decode
        step attends over the whole cache.
        """
        if self.owner.prefilling:
            T = k.shape[2]
            if self.ring:
                keep = min(T, self.k.shape[2])  # only the last `window` slots survive in the ring
                slots = torch.arange(T - keep, T, device=k.device) % self.k.shape[2]
                self.k.index_copy_(2, slots, k[:, :, T - keep :].to(self.k.dtype))
                self.v.index_copy_(2, slots, v[:, :, T - keep :].to(self.v.dtype))
            else:
                self.k[:, :, :T] = k
                self.v[:, :, :T] = v
            return k, v
        slot = self.owner.slot.view(1)
        if self.ring:
            slot = slot % self.k.shape[2]
        self.k.index_copy_(2, slot, k.to(self.k.dtype))
        self.v.index_copy_(2, slot, v.to(self.v.dtype))
        return self.k, self.v


class KVCache:
    """Keys and values of every layer for `batch_size` rows of up to `max_len` slots."""

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
        storage: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None,
    ) -> None:
        """storage: each layer's (k, v) to write into instead of fresh zeros, e.g. views of one row of a
        larger cache (trainer/inference/slots.py prefills a row of its batch this way)."""
        self.batch_size, self.max_len = batch_size, max_len
        self.window = cfg.sliding_window
        self.layers: list[LayerCache] = []
        for i in range(cfg.n_layers):
            sliding = cfg.is_sliding(i) and cfg.sliding_window is not None
            length = min(cfg.sliding_window, max_len) if sliding else max_len
            shape = (batch_size, cfg.n_kv_heads, length, cfg.head_dim)
            if storage is not None:
                k, v = storage[i]
                assert k.shape == shape and v.shape == shape, (k.shape, shape)
            else:
                k = torch.zeros(shape, device=device, dtype=dtype)
                v = torch.zeros(shape, device=device, dtype=dtype)
            self.layers.append(LayerCache(k, v, length if sliding else None, self))
        self.pad = torch.zeros(batch_size, dtype=torch.long, device=device)
        """[B] left padding of each row: its first real token sits in slot pad[b]."""
        self.slot = torch.zeros((), dtype=torch.long, device=device)
        """The slot the next decode step writes (a tensor, so a compiled step does not specialise on it)."""
        self.prefilling = False
        self.padded = False

    def reset(self, pad: torch.Tensor) -> None:
        """Start a new batch whose rows are left-padded by `pad` [B]. Old contents need no clearing: every
        slot a query may see is written before it is read."""
        self.pad.copy_(pad)
        self.slot.zero_()
        self.padded = bool(pad.any())  # decided once per batch, on the host

    def nbytes(self) -> int:
        return sum(c.k.numel() * c.k.element_size() * 2 for c in self.layers)

    # ---- what the model needs for a forward with this cache --------------------------------------------------

    def positions(self, T: int) -> torch.Tensor:
        """RoPE positions [B, T] of the slots this forward covers (0 for padding)."""
        if self.prefilling:
            slots = torch.arange(T, device=self.pad.device)[None, :]
        else:
            slots = self.slot.view(1, 1)
        return (slots - self.pad[:, None]).clamp(min=0)

    def mask(self, kind: str, T: int) -> Optional[torch.Tensor]:
        """Boolean attention mask [B, 1, T, keys] for layers of `kind` ("full" or "sliding").

        None (plain causal, SDPA's fastest path) for a prefill without padding that no window cuts.
        """
        pad = self.pad[:, None, None]  # [B, 1, 1]
        window = self.window if kind == "sliding" else None
        if self.prefilling and not self.padded and (window is None or T <= window):
            return None
        if self.prefilling:
            q = torch.arange(T, device=pad.device)[:, None]
            k = torch.arange(T, device=pad.device)[None, :]
            allowed = (k <= q) & (k >= pad)
            if window is not None:
                allowed = allowed & (q - k < window)
            return (allowed | (k == q))[:, None]
        q = self.slot
        if kind == "sliding" and window is not None:
            ring = min(window, self.max_len)
            j = torch.arange(ring, device=pad.device)
            k = q - (q - j) % ring  # the latest slot <= q stored at ring index j
            allowed = (k >= 0) & (k >= pad) & (q - k < window)
        else:
            k = torch.arange(self.max_len, device=pad.device)
            allowed = (k <= q) & (k >= pad)
        return allowed[:, None]  # [B, 1, 1, keys]
