"""Direct preference optimisation (Rafailov et al., 2023) as a training objective of the engine.

For a pair (prompt x, chosen y_w, rejected y_l), with log pi(y | x) summed over the completion's tokens and
the frozen reference pi_ref (the model DPO starts from, its log-probabilities computed once before training,
`reference_logps`):

    chosen reward   r_w = beta * (log pi(y_w|x) - log pi_ref(y_w|x))
    rejected reward r_l = beta * (log pi(y_l|x) - log pi_ref(y_l|x))
    sigmoid loss        -log sigmoid(r_w - r_l)
    hinge loss          max(0, 1 - (r_w - r_l))                    (SLiC; as TRL: beta inside the margin)
    ipo loss            (d / |y| - 1 / (2 beta))^2 with the log-ratios averaged per completion token (as TRL)

The loss is a mean over pairs: the engine divides the summed per-pair losses by the global pair count
(`units`). The metrics are TRL's: rewards/chosen, rewards/rejected, rewards/margins (means) and
rewards/accuracies (share of pairs with r_w > r_l), plus logps/chosen and logps/rejected.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from forge_lm.trainer.loss import IGNORE_INDEX
from forge_lm.trainer.strategy import model_inputs

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")  # fmt: skip


def sequence_logps(
    token_losses: torch.Tensor, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities [pairs, 2] (chosen, rejected) of each sequence's learned tokens, and their
    token counts [pairs, 2], from the model's per-token losses [B, T]."""
    n_pairs = batch["ref_logps"].shape[0]
    learned = batch["labels"] != IGNORE_INDEX
    segments = torch.where(learned, batch["segments"], torch.full_like(batch["segments"], 2 * n_pairs))
    sums = torch.zeros(2 * n_pairs + 1, device=token_losses.device, dtype=torch.float32)
    sums = sums.index_add(0, segments.flatten(), -token_losses.flatten().float())
    counts = torch.zeros(2 * n_pairs + 1, device=token_losses.device, dtype=torch.float32)
    counts = counts.index_add(0, segments.flatten(), learned.flatten().float())
    return sums[:-1].view(n_pairs, 2), counts[:-1].view(n_pairs, 2)


def dpo_losses(
    logps: torch.Tensor, ref_logps: torch.Tensor, counts: torch.Tensor, beta: float, loss_type: str
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses [pairs] and the per-pair metric values (to be summed, then divided by pairs)."""
    ratios = logps - ref_logps.to(logps.dtype)  # [pairs, 2]: log pi / pi_ref of chosen, rejected
    delta = ratios[:, 0] - ratios[:, 1]
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        per_token = ratios / counts.clamp(min=1.0)
        losses = (per_token[:, 0] - per_token[:, 1] - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}")
    rewards = beta * ratios.detach()
    metrics = {
        "rewards/chosen": rewards[:, 0],
        "rewards/rejected": rewards[:, 1],
        "rewards/margins": rewards[:, 0] - rewards[:, 1],
        "rewards/accuracies": (rewards[:, 0] > rewards[:, 1]).float(),
        "logps/chosen": logps[:, 0].detach(),
        "logps/rejected": logps[:, 1].detach(),
    }
    return losses, metrics


class DPOObjective:
    """What the engine calls instead of the token loss when posttrain.objective=dpo."""

    def __init__(self, beta: float, loss_type: str, document_masking: bool = True) -> None:
        self.beta, self.loss_type, self.document_masking = beta, loss_type, document_masking

    @staticmethod
    def units(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The count the loss is averaged over: pairs."""
        return torch.tensor(batch["ref_logps"].shape[0], device=batch["ref_logps"].device)

    def loss_sum(
        self, model: Any, batch: dict[str, torch.Tensor], device: torch.device
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Summed per-pair losses of a micro-batch and the summed metrics."""
        token_losses = model(
            **model_inputs(batch, device, self.document_masking), labels=batch["labels"].to(device)
        )
        logps, counts = sequence_logps(token_losses, batch)
        losses, metrics = dpo_losses(logps, batch["ref_logps"], counts, self.beta, self.loss_type)
        return losses.sum(), {k: v.sum() for k, v in metrics.items()}


@torch.no_grad()
def reference_logps(model: Any, pairs: list, collate: Any, device: torch.device, batch_rows: int = 8) -> None:
    """Fill every pair's `ref_logps` with the (frozen) model's log-probabilities, in one pass, one pair per
    row (no packing, so nothing depends on what a pair was packed with)."""
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(pairs), batch_rows):
            chunk = pairs[start : start + batch_rows]
            batch = collate([[p] for p in chunk])
            batch = {k: v.to(device) for k, v in batch.items()}
            token_losses = model(**model_inputs(batch, device, True), labels=batch["labels"])
            logps, _ = sequence_logps(token_losses, batch)
            for p, row in zip(chunk, logps.double().cpu().tolist()):
                p.ref_logps = (row[0], row[1])
    finally:
        model.train(was_training)


def mean_metrics(sums: Iterable[dict[str, torch.Tensor]], pairs: float) -> dict[str, float]:
    total: dict[str, float] = {}
    for s in sums:
        for k, v in s.items():
            total[k] = total.get(k, 0.0) + float(v)
    return {k: v / pairs for k, v in total.items()}
