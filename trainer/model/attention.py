"""Causal self-attention: grouped-query heads, RoPE, and the families' variations on it.

Variations (all off by default, see ModelConfig): biases on q/k/v (Qwen2, GLM-4), RMSNorm on queries and
keys per head (Qwen3, Gemma 3) or over their full width (OLMo 2), a softmax scale other than
head_dim^-1/2 (Gemma 2/3), tanh soft-capping of the scores (Gemma 2), partial and interleaved RoPE (GLM-4).
Which keys a query sees (causal, same document, sliding window) is decided by the mask it is given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from forge_lm.trainer.model.config import ModelConfig
from forge_lm.trainer.model.layers import RMSNorm
from forge_lm.trainer.model.masks import Mask
from forge_lm.trainer.model.rope import apply_rope

if TYPE_CHECKING:
    from forge_lm.trainer.inference.cache import LayerCache


class Attention(nn.Module):
    """Multi-head (or grouped-query) causal attention.

    q, k, v and the output are four separate plain Linears (no fused qkv), so that tensor-parallel plans
    can shard them by name and HF checkpoints map one tensor to one tensor.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.scale = cfg.attn_scale
        self.softcap = cfg.attn_softcap
        self.rope_interleaved = cfg.rope_interleaved
        self.qk_norm = cfg.qk_norm
        q_width, kv_width = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, q_width, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.d_model, kv_width, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.d_model, kv_width, bias=cfg.qkv_bias)
        self.wo = nn.Linear(q_width, cfg.d_model, bias=False)
        if cfg.qk_norm != "none":
            per_head = cfg.qk_norm == "head"
            self.q_norm = RMSNorm(cfg.head_dim if per_head else q_width, cfg.norm_eps, cfg.norm_unit_offset)
            self.k_norm = RMSNorm(cfg.head_dim if per_head else kv_width, cfg.norm_eps, cfg.norm_unit_offset)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: Optional[Mask] = None,
        cache: Optional[LayerCache] = None,
    ) -> torch.Tensor:
        """x [B, T, d_model]; cos/sin [B, T, rotary_dim]; mask: see trainer/model/masks.py (None: causal).

        With a cache (generation), this step's keys and values are stored, and the queries attend over
        what the cache returns under the cache's mask (trainer/inference/cache.py).
        """
        B, T, _ = x.shape
        q, k, v = self.queries_keys(x, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)
        y = attend(q, k, v, mask, self.scale, self.softcap)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))

    def queries_keys(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [B, heads, T, head_dim] as attention sees them: projected, normalised, rotated."""
        B, T, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        if self.qk_norm == "full":  # OLMo 2: one norm over all heads together
            q, k = self.q_norm(q), self.k_norm(k)
        # The head count is read from the projection's width (-1), not from the config: under tensor
        # parallelism each rank holds only its share of the heads.
        q = q.view(B, T, -1, self.head_dim)
        k = k.view(B, T, -1, self.head_dim)
        v = v.view(B, T, -1, self.head_dim)
        if self.qk_norm == "head":  # Qwen3, Gemma 3: each head normalised on its own
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q = apply_rope(q, cos, sin, self.rope_interleaved)
        k = apply_rope(k, cos, sin, self.rope_interleaved)
        return q, k, v


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[Mask],
    scale: float,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """softmax(scale * q k^T [soft-capped], masked) v for q [B, Hq, T, D] and k, v [B, Hkv, T, D]."""
    # enable_gqa lets each k/v head serve its group of query heads without materialising repeated copies.
    # It is only asked for when the counts differ, so plain multi-head attention keeps every SDPA backend.
    gqa = q.shape[1] != k.shape[1]
    if isinstance(mask, BlockMask):
        score_mod = None
        if softcap is not None:

            def score_mod(score, b, h, q_idx, kv_idx):
                return softcap * torch.tanh(score / softcap)

        return _flex(q)(q, k, v, score_mod=score_mod, block_mask=mask, scale=scale, enable_gqa=gqa)
    if softcap is None and q.shape[-2] == 1 and q.device.type == "cpu" and mask is not None:
        return _one_token_attention(q, k, v, mask, scale)
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=gqa
        )
    return _softcapped_attention(q, k, v, mask, scale, softcap)


def _one_token_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """A decode step's attention on a CPU: one query token per row, written out. SDPA's CPU kernels are
    built for blocks of queries; here each k/v head's group of query heads is one small product, with no
    copies of k and v (batch-8 decode 1.83x -> 2.02x transformers' in `forge bench inference`)."""
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    scores = (q.view(B, Hkv, Hq // Hkv, D) @ k.transpose(-2, -1)) * scale  # [B, Hkv, group, keys]
    scores = scores.masked_fill(~mask, float("-inf"))  # mask [B, 1, 1, keys]
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return (weights @ v).view(B, Hq, 1, D)


def _softcapped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: float,
    softcap: float,
) -> torch.Tensor:
    """SDPA cannot soft-cap scores, so here they are formed explicitly (memory O(T^2) per head)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-2, -1)) * scale
    scores = softcap * torch.tanh(scores / softcap)
    if mask is None:
        T = q.shape[-2]
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


_compiled_flex = None


def _flex(q: torch.Tensor):
    """flex_attention, compiled on CUDA (uncompiled it materialises the full score matrix)."""
    global _compiled_flex
    if not q.is_cuda:
        return flex_attention  # CPU: the reference implementation (forward only), used by the tests
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex
