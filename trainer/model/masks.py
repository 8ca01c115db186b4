"""Who attends to whom: causal, within the same packed document, within a sliding window.

A packed row holds several documents back to back; `document_ids` [B, T] numbers them (any integers,
equal within a document, documents contiguous). Query q may attend to key k when

    k <= q                                   (causal)
    document_ids[q] == document_ids[k]       (same document; only when document_ids is given)
    q - k < window                           (sliding-window layers: the last `window` tokens, q itself included)

The same rule is built in two forms: a boolean [B, 1, T, T] mask for SDPA (any device, used on CPU), and
a FlexAttention BlockMask, which skips the masked-out blocks entirely (CUDA). `None` stands for plain
causal attention, which SDPA does fastest with is_causal=True.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

Mask = Union[torch.Tensor, BlockMask]


def positions_in_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """Each token's index within its own document, [B, T]: RoPE positions that restart at every document."""
    B, T = document_ids.shape
    index = torch.arange(T, device=document_ids.device).expand(B, T)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values  # start of own document
    return index - first


def sdpa_mask(
    T: int, device: torch.device, document_ids: Optional[torch.Tensor] = None, window: Optional[int] = None
) -> Optional[torch.Tensor]:
    """Boolean mask (True = attend), [T, T] or [B, 1, T, T] with documents; None for plain causal."""
    if document_ids is None and window is None:
        return None
    q = torch.arange(T, device=device)[:, None]
    k = torch.arange(T, device=device)[None, :]
    mask = k <= q
    if window is not None:
        mask = mask & (q - k < window)
    if document_ids is not None:
        same_doc = document_ids[:, :, None] == document_ids[:, None, :]  # [B, T, T]
        mask = (mask & same_doc)[:, None]
    return mask


def flex_block_mask(
    B: int,
    T: int,
    device: torch.device,
    document_ids: Optional[torch.Tensor] = None,
    window: Optional[int] = None,
) -> BlockMask:
    """The same rule as `sdpa_mask`, as a FlexAttention BlockMask (shared over heads, per row with documents)."""

    def mask_mod(b, h, q, k):
        allowed = k <= q
        if window is not None:
            allowed = allowed & (q - k < window)
        if document_ids is not None:
            allowed = allowed & (document_ids[b, q] == document_ids[b, k])
        return allowed

    return create_block_mask(mask_mod, B if document_ids is not None else None, None, T, T, device=device)
