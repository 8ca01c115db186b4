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


def build_optimizer(model: nn.Module, cfg: TrainerConfig, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over `model`'s parameters.

    fused=True (the default, the torch backend) is the one implementation that can skip a step on the
    device: it honours `optimizer.found_inf` (a 0-dim float tensor on the parameters' device, 1.0 = leave
    parameters, moments and step counts as they are), which is how `trainer.spike` drops an update without
    the host reading anything (trainer/spike.py). It exists on CPU and CUDA alike, so results do not depend
    on the device's choice of implementation. One fused call cannot mix plain tensors with DTensors (tensor
    parallelism without sequence parallelism leaves norms plain), so each group is split by kind of tensor
    and mesh (FSDP x TP puts norms and projections on different meshes), keeping its hyperparameters: the
    split changes nothing but the number of groups (Engine.load adapts a saved schedule to it).

    fused=False: the multi-tensor path (foreach), for optimizers driven by someone else (DeepSpeed wraps it).
    """
    groups = param_groups(model, cfg.weight_decay)
    if fused:
        groups = [part for group in groups for part in _split_by_mesh(group)]
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        **implementation(fused),
    )


def implementation(fused: bool) -> dict[str, bool]:
    """The AdamW implementation flags; `pin_implementation` puts them back after a checkpoint load."""
    return {"fused": True} if fused else {"foreach": True}


def pin_implementation(optimizer: torch.optim.Optimizer, fused: bool) -> None:
    """Loading an optimizer state dict also loads the implementation flags it was saved with (a checkpoint
    from before trainer.spike holds foreach=True): set them back to what this run was built with, and keep
    the fused kernel's step counts on the parameters' device, where it needs them."""
    for group in optimizer.param_groups:
        group.update({"fused": None, "foreach": None, **implementation(fused)})
        if not fused:
            continue
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if isinstance(step, torch.Tensor) and step.device != p.device:
                optimizer.state[p]["step"] = step.to(device=p.device, dtype=torch.float32)


def _split_by_mesh(group: dict) -> list[dict]:
    """`group` as one group per kind of tensor (plain, or a DTensor of one mesh), in first-seen order."""
    from torch.distributed.tensor import DTensor

    by_mesh: dict[object, list[torch.Tensor]] = {}
    for p in group["params"]:
        by_mesh.setdefault(p.device_mesh if isinstance(p, DTensor) else None, []).append(p)
    if len(by_mesh) <= 1:
        return [group]
    return [{**group, "params": params} for params in by_mesh.values()]
