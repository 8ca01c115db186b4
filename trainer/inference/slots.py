"""Continuous batching: a cache of independent rows ("slots") and the decode step over them.

The Generator (engine.py) runs one fixed batch from start to end: its prompts are left-padded to a common
length and all rows advance together. A server's batch changes between steps instead: a request joins
when a row is free and leaves when it finishes, so here every row keeps its own sequence from cache slot 0
and its own position:

    row r holds the tokens at positions 0 .. pos[r]-1 in cache slots 0 .. pos[r]-1;
    a decode step writes row r's new token at slot pos[r] and lets it attend to slots 0 .. pos[r] of row r.

There is no padding, so a row's RoPE positions, keys and mask are exactly the ones it has alone. A new
sequence is prefilled by itself into its row (the same batch-of-one forward the Generator runs for a lone
prompt, writing through views of that row), then joins the decode steps.

Shapes. A decode step covers rows 0 .. R-1 and key slots 0 .. K-1: R is the next power of two above the
highest busy row (a new sequence takes the lowest free row, so busy rows stay at the front) and K the next
multiple of KEY_ROUNDING above the longest busy row (the whole cache when the step is compiled). Shapes
therefore come from a small fixed set and do not change when requests join or leave within it; a compiled
step specialises once per R (log2(slots) + 1 graphs). Free rows inside R are fed a dummy token that lands
in their own slot 0, which a later prefill overwrites. Masked keys add exact zeros to the attention, so K
does not change a row's numbers; R can change the last bits of the matrix products (BLAS picks its kernels
by shape), which in fp32 leaves greedy tokens as they are (tests/e2e/test_serve.py checks it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from forge_lm.trainer.inference.cache import KVCache
from forge_lm.trainer.inference.compiled import compile_decode_step, mark_static
from forge_lm.trainer.inference.split_matvec import split_matvecs
from forge_lm.trainer.model import Decoder
from forge_lm.trainer.model.config import ModelConfig

KEY_ROUNDING = 64


class SlotLayerCache:
    """One layer's keys and values for every row: [slots, n_kv_heads, length, head_dim]."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, window: Optional[int], owner: SlotCache) -> None:
        self.k, self.v = k, v
        self.window = window  # ring size of a sliding-window layer, None for a full layer
        self.owner = owner

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one new key/value per row (k, v: [R, n_kv_heads, 1, head_dim]) at each row's own slot;
        return the keys and values the step attends over."""
        owner = self.owner
        R = owner.rows
        slot = owner.pos[:R]
        if self.window is not None:
            slot = slot % self.k.shape[2]
        rows = owner.row_ids[:R]
        self.k[rows, :, slot] = k[:, :, 0].to(self.k.dtype)
        self.v[rows, :, slot] = v[:, :, 0].to(self.v.dtype)
        if self.window is not None:
            return self.k[:R], self.v[:R]
        return self.k[:R, :, : owner.keys], self.v[:R, :, : owner.keys]


class SlotCache:
    """Keys and values of every layer for `slots` independent rows of up to `max_len` tokens each."""

    def __init__(
        self, cfg: ModelConfig, slots: int, max_len: int, device: torch.device | str, dtype: torch.dtype
    ) -> None:
        self.cfg, self.slots, self.max_len = cfg, slots, max_len
        self.window = cfg.sliding_window
        self.layers: list[SlotLayerCache] = []
        for i in range(cfg.n_layers):
            sliding = cfg.is_sliding(i) and cfg.sliding_window is not None
            length = min(cfg.sliding_window, max_len) if sliding else max_len
            shape = (slots, cfg.n_kv_heads, length, cfg.head_dim)
            k = torch.zeros(shape, device=device, dtype=dtype)
            v = torch.zeros(shape, device=device, dtype=dtype)
            self.layers.append(SlotLayerCache(k, v, length if sliding else None, self))
        self.pos = torch.zeros(slots, dtype=torch.long, device=device)
        """[slots] the slot each row's next decode token is written at (= the tokens it holds)."""
        self.row_ids = torch.arange(slots, device=device)
        self.rows = slots
        """Rows 0 .. rows-1 take part in the current decode step."""
        self.keys = max_len
        """Full-attention layers attend over key slots 0 .. keys-1 in the current decode step."""

    def nbytes(self) -> int:
        return sum(c.k.numel() * c.k.element_size() * 2 for c in self.layers)

    def row_view(self, row: int) -> KVCache:
        """A batch-of-one KVCache whose tensors are views of `row`: a prefill through it fills that row."""
        storage = [(c.k[row : row + 1], c.v[row : row + 1]) for c in self.layers]
        view = KVCache(self.cfg, 1, self.max_len, self.pos.device, self.layers[0].k.dtype, storage=storage)
        view.reset(torch.zeros(1, dtype=torch.long, device=self.pos.device))
        return view

    # ---- what the model needs for a decode step with this cache (one token per row) --------------------------

    def positions(self, T: int) -> torch.Tensor:
        """RoPE positions [rows, 1]: each row's own."""
        assert T == 1, "a SlotCache forward is a decode step of one token per row; prefill via row_view"
        return self.pos[: self.rows, None]

    def mask(self, kind: str, T: int) -> torch.Tensor:
        """Boolean mask [rows, 1, 1, keys] (True = attend): row r sees its own slots 0 .. pos[r]."""
        q = self.pos[: self.rows, None]  # [R, 1]
        if kind == "sliding" and self.window is not None:
            ring = min(self.window, self.max_len)
            j = torch.arange(ring, device=q.device)[None, :]
            k = q - (q - j) % ring  # the latest slot <= q stored at ring index j
            allowed = (k >= 0) & (q - k < self.window)
        else:
            k = torch.arange(self.keys, device=q.device)[None, :]
            allowed = k <= q
        return allowed[:, None, None, :]


class SlotDecoder:
    """Prefill a sequence into a row, and decode one token for every busy row in one step.

    slots: rows of the batch (the most sequences decoded at once). max_len: the most tokens one row holds
    (prompt + generation; default the model's max_seq_len). compile: torch.compile the decode step
    (default: on CUDA only, captured as CUDA graphs there; on CPU compiling costs tens of seconds).
    """

    def __init__(
        self,
        model: Decoder,
        slots: int = 8,
        max_len: Optional[int] = None,
        compile: Optional[bool] = None,
    ) -> None:
        self.model = model.eval()
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.slots = slots
        self.max_len = max_len or model.cfg.max_seq_len
        if self.max_len > model.cfg.max_seq_len:
            raise ValueError(
                f"max_len={self.max_len} is longer than the model's context of {model.cfg.max_seq_len} tokens "
                "(model.max_seq_len): choose at most that."
            )
        self.cache = SlotCache(model.cfg, slots, self.max_len, self.device, self.dtype)
        self.compile = self.device.type == "cuda" if compile is None else compile
        self._step = self._decode_step
        if self.compile:
            # One graph per row bucket: raise dynamo's recompile limit to hold them all.
            buckets = slots.bit_length() + 1
            limit = max(torch._dynamo.config.recompile_limit, buckets + 2)
            torch._dynamo.config.recompile_limit = limit
            self._step = compile_decode_step(self._decode_step, self.device)
            mark_static([t for layer in self.cache.layers for t in (layer.k, layer.v)] + [self.cache.pos])

    @torch.no_grad()
    def prefill(self, row: int, prompt: Sequence[int]) -> torch.Tensor:
        """Fill `row` with `prompt` (token ids); return the next-token logits [vocab] (fp32).

        The row then holds len(prompt) tokens: its next decode step is at position len(prompt).
        """
        if not 0 < len(prompt) <= self.max_len:
            raise ValueError(f"a prompt of {len(prompt)} tokens does not fit a row of {self.max_len}.")
        view = self.cache.row_view(row)
        ids = torch.tensor([list(prompt)], dtype=torch.long, device=self.device)
        view.prefilling = True
        return self.model(ids, cache=view)[0, -1].float()

    @torch.no_grad()
    def decode(self, tokens: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """One step for rows 0 .. len(tokens)-1: row r's token `tokens[r]` at position `positions[r]`.

        Returns the next-token logits [len(tokens), vocab] (fp32). Rows that hold no sequence are passed
        as token 0 at position 0 (their logits are meaningless).
        """
        n = len(tokens)
        rows = min(self.slots, 1 << (n - 1).bit_length())
        keys = self.max_len
        if not self.compile:
            longest = max(positions) + 1
            keys = min(self.max_len, -(-longest // KEY_ROUNDING) * KEY_ROUNDING)
        padded_tokens = list(tokens) + [0] * (rows - n)
        padded_pos = list(positions) + [0] * (rows - n)
        cache = self.cache
        cache.pos[:rows].copy_(torch.tensor(padded_pos, dtype=torch.long))
        cache.rows, cache.keys = rows, keys
        ids = torch.tensor(padded_tokens, dtype=torch.long, device=self.device)[:, None]
        return self._step(ids)[:n]

    def _decode_step(self, ids: torch.Tensor) -> torch.Tensor:
        with split_matvecs(self.device):  # on a CPU, every core streams weights (split_matvec.py)
            return self.model(ids, cache=self.cache)[:, -1].float()
