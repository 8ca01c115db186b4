"""Causal self-attention with grouped-query heads and rotary position embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.model.config import ModelConfig
from trainer.model.layers import apply_rope


class Attention(nn.Module):
    """Multi-head (or grouped-query) causal attention.

    q, k, v and the output are four separate plain Linears (no fused qkv), so that tensor-parallel plans
    can shard them by name and HF checkpoints map one tensor to one tensor.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        # The head count is read from the projection's width (-1), not from the config: under tensor
        # parallelism each rank holds only its share of the heads.
        q = self.wq(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, Hq, T, D]
        k = self.wk(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        q, k = apply_rope(q, k, cos, sin)
        # enable_gqa lets SDPA share each k/v head across its group of query heads without materialising
        # repeated copies. It is only asked for when the counts differ, so plain multi-head attention keeps
        # every SDPA backend available.
        gqa = q.shape[1] != k.shape[1]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))
