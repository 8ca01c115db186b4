"""Configuration of post-training (`posttrain.*`): what the objective is and where the weights come from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

OBJECTIVES = ("lm", "sft", "dpo", "distill")
LOSS_ON = ("assistant", "completion", "all")
DPO_LOSSES = ("sigmoid", "ipo", "hinge")
TRUNCATIONS = ("keep_start", "skip")


from forge_lm.trainer.model.config import ConfigError as PosttrainConfigError  # noqa: E402 (the run's one error type)


@dataclass
class PosttrainConfig:
    """Supervised fine-tuning on chats (SFT) and direct preference optimisation (DPO) with the same engine."""

    objective: str = "lm"
    """'lm': pre-training on packed text (the data pipeline's shards). 'sft': next-token loss on conversations
    (`messages`) or prompt/completion records, only on the tokens `loss_on` names. 'dpo': the preference loss
    of Rafailov et al. on chosen/rejected pairs against a frozen reference (the `init_from` model).
    'distill': forward KL(teacher || student) on the SFT examples' learned tokens, mixed with the next-token
    loss (`distill_alpha`), from the frozen `teacher`."""
    init_from: Optional[str] = None
    """The weights to start from: a run directory (its newest complete checkpoint), a checkpoint directory or
    a Hugging Face folder. Only the weights: optimizer and schedule start fresh, in this run's run_dir.
    Required for sft and dpo (a run that already has checkpoints resumes from them instead)."""
    chat_template: Optional[str] = None
    """Jinja chat template (the text, or a file holding it). None: the tokenizer's own (its
    tokenizer_config.json), else ChatML with <|im_start|>/<|im_end|> added as special tokens (docs/posttrain.md)."""
    loss_on: str = "assistant"
    """Tokens in the SFT loss: 'assistant' (every assistant turn, end-of-turn token included), 'completion'
    (prompt/completion records: the completion only; conversations: the last assistant turn only), 'all'."""
    messages_field: str = "messages"
    """Record field holding a conversation: a list of {role, content} with roles system/user/assistant."""
    prompt_field: str = "prompt"
    """Record field of a prompt (a list of messages, or a string taken as one user message)."""
    completion_field: str = "completion"
    """Record field of a completion (a list of messages, or a string taken as one assistant message)."""
    chosen_field: str = "chosen"
    """DPO: the preferred completion (with `prompt_field`)."""
    rejected_field: str = "rejected"
    """DPO: the other completion."""
    pairs_from_chats: bool = True
    """DPO on records without chosen/rejected: make pairs from conversations. Each assistant turn after the
    first exchange is a prompt (the chat so far) with chosen = the real turn and rejected = the assistant turn at
    the same position of another conversation (a fixed, seeded derangement; docs/posttrain.md)."""
    pair_context_messages: int = 3
    """Pairs from chats: the prompt is this many messages before the turn (the chat's end, where it fits)."""
    max_pairs_per_chat: int = 2
    """Pairs made from one conversation at most (its last assistant turns)."""
    truncation: str = "keep_start"
    """An example longer than data.seq_len + 1 tokens: 'keep_start' cuts its end (a DPO pair whose chosen or
    rejected sequence is cut is skipped instead: its log-probabilities would compare unlike things), 'skip'
    leaves it out. Both are counted and logged."""
    beta: float = 0.1
    """DPO: the inverse temperature of the implicit reward beta * log(pi / pi_ref)."""
    dpo_loss: str = "sigmoid"
    """DPO loss: 'sigmoid' (Rafailov et al.), 'ipo' (Azar et al., length-normalised log-ratios as TRL) or
    'hinge' (SLiC)."""
    teacher: Optional[str] = None
    """Distillation: the teacher model, frozen (a run directory, a checkpoint or a Hugging Face folder). It
    must use the student's tokenizer (compared token by token; a mismatch is refused)."""
    distill_alpha: float = 0.5
    """Distillation: the weight of the KL term; the next-token loss gets 1 - distill_alpha (1: pure
    distillation, 0: plain SFT)."""
    distill_temperature: float = 1.0
    """Distillation: both distributions are softened by this temperature; the KL is scaled by its square so
    that its gradients keep their size (Hinton et al., 2015)."""
    max_examples: Optional[int] = None
    """Use at most this many conversations (or pairs) of the sources (None: all)."""

    def __post_init__(self) -> None:
        for name, value, choices in (
            ("objective", self.objective, OBJECTIVES),
            ("loss_on", self.loss_on, LOSS_ON),
            ("dpo_loss", self.dpo_loss, DPO_LOSSES),
            ("truncation", self.truncation, TRUNCATIONS),
        ):
            if value not in choices:
                raise PosttrainConfigError(
                    f"posttrain.{name}={value!r} is not one of {', '.join(map(repr, choices))}: pick one of those."
                )
        if self.beta <= 0:
            raise PosttrainConfigError(f"posttrain.beta={self.beta} must be positive (TRL's default is 0.1).")
        if self.pair_context_messages < 1:
            raise PosttrainConfigError(
                f"posttrain.pair_context_messages={self.pair_context_messages} must be >= 1."
            )
        if self.max_pairs_per_chat < 1:
            raise PosttrainConfigError(
                f"posttrain.max_pairs_per_chat={self.max_pairs_per_chat} must be >= 1."
            )
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise PosttrainConfigError(
                f"posttrain.distill_alpha={self.distill_alpha} must be within [0, 1] (1: pure distillation)."
            )
        if self.distill_temperature <= 0:
            raise PosttrainConfigError(
                f"posttrain.distill_temperature={self.distill_temperature} must be positive (1: none)."
            )
        if self.max_examples is not None and self.max_examples < 1:
            raise PosttrainConfigError(
                f"posttrain.max_examples={self.max_examples} must be positive or null."
            )

    @property
    def active(self) -> bool:
        """Whether the run post-trains (sft, dpo or distill) rather than pre-trains."""
        return self.objective != "lm"
