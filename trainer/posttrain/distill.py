"""Knowledge distillation as a training objective of the engine: the student learns the teacher's next-token
distributions on the SFT examples, mixed with the ordinary next-token loss.

For every learned token t (the label mask of SFT: `posttrain.loss_on`), with temperature tau and
alpha = `posttrain.distill_alpha`:

    KL_t   = sum_v p_teacher(v) * (log p_teacher(v) - log p_student(v)),   p = softmax(logits / tau)
    loss_t = alpha * tau^2 * KL_t + (1 - alpha) * CE_t                    CE_t = the next-token loss

Forward KL(teacher || student), as Hinton et al. (2015): the student covers every token the teacher gives
mass to. tau^2 keeps the gradient's scale independent of the temperature (Hinton et al.'s factor). Both
distributions are over the tokenizer's vocabulary (the first `vocab_size` logits; the rows beyond are padding
no text ever produces). The loss is averaged like every token loss: the engine sums it and divides by the
global count of learned tokens (`units`).

The teacher is frozen (eval mode, no gradient) and wrapped by the same `parallelize` as the student, so under
FSDP2 it is sharded the same way. It must use the student's tokenizer: its vocabulary is compared with the
student's and a mismatch refused (`check_same_vocab`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from forge_lm.trainer.loss import IGNORE_INDEX
from forge_lm.trainer.model.config import ConfigError
from forge_lm.trainer.strategy import model_inputs

METRICS = ("distill/kl", "distill/ce", "distill/teacher_ce")


def distill_token_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    alpha: float,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per learned token: the mixed loss [n] and its parts {kl, ce, teacher_ce} [n] (the token order of
    `labels != IGNORE_INDEX`). Logits [B, T, >= vocab_size]; labels [B, T]."""
    learned = labels != IGNORE_INDEX
    targets = labels[learned]
    student = student_logits[learned][:, :vocab_size].float()
    with torch.no_grad():
        teacher = teacher_logits[learned][:, :vocab_size].float()
        teacher_logp = F.log_softmax(teacher / temperature, dim=-1)
        teacher_ce = F.cross_entropy(teacher, targets, reduction="none")
    student_logp = F.log_softmax(student / temperature, dim=-1)
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    ce = F.cross_entropy(student, targets, reduction="none")
    losses = alpha * temperature**2 * kl + (1 - alpha) * ce
    return losses, {"distill/kl": kl.detach(), "distill/ce": ce.detach(), "distill/teacher_ce": teacher_ce}


class DistillObjective:
    """What the engine calls instead of the token loss when posttrain.objective=distill."""

    def __init__(
        self,
        teacher: torch.nn.Module,
        vocab_size: int,
        alpha: float,
        temperature: float = 1.0,
        document_masking: bool = True,
    ) -> None:
        teacher.eval()
        teacher.requires_grad_(False)
        self.teacher, self.vocab_size = teacher, vocab_size
        self.alpha, self.temperature, self.document_masking = alpha, temperature, document_masking

    @staticmethod
    def units(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The count the loss is averaged over: learned tokens."""
        return (batch["labels"] != IGNORE_INDEX).sum()

    def loss_sum(
        self, model: Any, batch: dict[str, torch.Tensor], device: torch.device
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Summed per-token losses of a micro-batch and the summed metrics (KL, the student's and the teacher's
        next-token loss)."""
        inputs = model_inputs(batch, device, self.document_masking)
        with torch.no_grad():
            teacher_logits = self.teacher(**inputs)
        student_logits = model(**inputs)
        losses, parts = distill_token_losses(
            student_logits, teacher_logits, batch["labels"].to(device), self.vocab_size, self.alpha,
            self.temperature,
        )  # fmt: skip
        return losses.sum(), {k: v.sum() for k, v in parts.items()}


def check_same_vocab(student: Any, student_where: str, teacher: Any, teacher_where: str) -> None:
    """Refuse a teacher whose tokenizer maps any token to another id than the student's (its distributions
    would be over other tokens), naming both tokenizers and the first difference."""
    a = student.backend.get_vocab(with_added_tokens=True)
    b = teacher.backend.get_vocab(with_added_tokens=True)
    if a == b:
        return
    diff = next(
        (f"{tok!r} is {a.get(tok)} in the student's, {b.get(tok)} in the teacher's"
         for tok in sorted(set(a) | set(b), key=lambda t: min(a.get(t, 1 << 40), b.get(t, 1 << 40)))
         if a.get(tok) != b.get(tok)),
        "",
    )  # fmt: skip
    raise ConfigError(
        f"posttrain.teacher: the teacher's tokenizer {teacher_where} ({len(b):,} tokens, fingerprint "
        f"{teacher.fingerprint[:12]}) differs from the student's {student_where} ({len(a):,} tokens, fingerprint "
        f"{student.fingerprint[:12]}): {diff}; distil from a teacher trained with the same tokenizer."
    )
