"""AdamW with decoupled weight decay on matrices only."""

from __future__ import annotations

import torch
from torch import nn

from forge_lm.trainer.config import TrainerConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into a decayed group (weight matrices) and a non-decayed one.

    Norm gains and biases are 1-D; decaying them pulls scales towards zero for no benefit.
    Embeddings are excluded too: decay would shrink rare tokens' rows that get few gradient updates.
    A tied output projection shares the embedding tensor, so it is seen once, as an embedding.
    """
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim < 2 or id(p) in embedding_params:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainerConfig, foreach: bool = True) -> torch.optim.AdamW:
    """AdamW over `model`'s parameters.

    foreach=True (the multi-tensor path) keeps CPU and GPU on the same code path, so results do not
    depend on which implementation torch picks for the device. It cannot mix plain tensors with
    DTensors in one group (tensor parallelism without sequence parallelism leaves norms plain):
    pass foreach=False there.
    """
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        foreach=foreach,
    )
