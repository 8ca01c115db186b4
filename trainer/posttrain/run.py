"""What a post-training run sets up before the engine takes over (called from trainer/train.py).

init_from (a run directory, a checkpoint or a Hugging Face folder) gives the weights and the tokenizer; the
chat tokenizer adds the template (and its special tokens, growing the model's vocabulary); the records become
packed examples or pairs; DPO computes the reference log-probabilities of every pair once, with the starting
weights, before the first step. The run itself is the ordinary training loop in its own run_dir: a fresh
optimizer and schedule, checkpoints, resume, evaluation and export as in pre-training.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from forge_lm.data.report import DataError
from forge_lm.trainer.config import Config, ConfigError
from forge_lm.trainer.model import Decoder
from forge_lm.trainer.posttrain.chat import ChatTokenizer, chat_tokenizer, grow_vocab
from forge_lm.trainer.posttrain.data import PackedBatches, PackedLoader, build_posttrain_data
from forge_lm.trainer.posttrain.distill import DistillObjective, check_same_vocab
from forge_lm.trainer.posttrain.dpo import DPOObjective, reference_logps

logger = logging.getLogger(__name__)


@dataclass
class PosttrainSetup:
    model: Decoder
    tokenizer: ChatTokenizer
    loader: PackedLoader
    val_batches: PackedBatches
    objective: Optional[DPOObjective | DistillObjective]
    """None for SFT (the engine's token loss); the DPO or distillation loss otherwise."""


def check_layout(cfg: Config) -> None:
    """Refuse, before any work, what post-training does not run."""
    p, post = cfg.parallel, cfg.posttrain
    if not post.init_from:
        raise ConfigError(
            f"posttrain.objective={post.objective} needs posttrain.init_from: a run directory, a checkpoint "
            "or a Hugging Face folder to start from (e.g. posttrain.init_from=runs/quickstart)."
        )
    if not cfg.data.document_masking:
        raise ConfigError(
            "post-training packs several conversations into a row: set data.document_masking=true so that they "
            "never attend to each other."
        )
    if post.objective in ("dpo", "distill") and (p.tp > 1 or p.pp > 1 or cfg.trainer.backend != "torch"):
        raise ConfigError(
            f"posttrain.objective={post.objective} runs on one process or with FSDP2 data parallelism only: set "
            "parallel.tp=1, parallel.pp=1 and trainer.backend=torch."
        )
    if post.objective == "distill" and not post.teacher:
        raise ConfigError(
            "posttrain.objective=distill needs posttrain.teacher: the run directory, checkpoint or Hugging Face "
            "folder of the model to distil from (e.g. posttrain.teacher=runs/chat_sft)."
        )


def _model_source(field: str, value: Any) -> tuple[Path, str]:
    """A model to start from or learn from (run directory, checkpoint or HF folder) and its tokenizer's path."""
    from forge_lm.trainer.inference.load import tokenizer_location

    source = Path(value)
    if not source.exists():
        raise ConfigError(f"{field}={value!r} does not exist: give a run directory, a checkpoint or a Hugging "
                          "Face folder.")  # fmt: skip
    tokenizer_path = tokenizer_location(source)
    if tokenizer_path is None:
        raise DataError(f"{source}: found no tokenizer beside the model ({field}); export it with its tokenizer.")
    return source, tokenizer_path


def setup_posttrain(
    cfg: Config, is_main: bool, device: torch.device, dp_rank: int, dp_size: int, dims: Any = None
) -> PosttrainSetup:
    """`dims` (the run's ParallelDims) shards a distillation teacher as the student is sharded."""
    from forge_lm.trainer.inference.load import load_model

    check_layout(cfg)
    post = cfg.posttrain
    source, tokenizer_path = _model_source("posttrain.init_from", post.init_from)
    model, _ = load_model(source, device=device)
    chat = chat_tokenizer(tokenizer_path, post.chat_template)
    added = grow_vocab(model, chat.vocab_size)
    if added:
        logger.info(
            "grew the vocabulary by %d rows for the chat tokens (new rows = mean of the old ones)", added
        )
    # The run's own tokenizer (with the template) is what its checkpoints name and its export carries.
    own = Path(cfg.run_dir) / "tokenizer"
    if is_main:
        chat.save(str(own))
    cfg.data.tokenizer.path = str(own)
    cfg.model = model.cfg
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} is longer than the model's max_seq_len="
                          f"{cfg.model.max_seq_len}: lower data.seq_len.")  # fmt: skip

    data = build_posttrain_data(cfg.data, post, chat)
    objective = None
    if post.objective == "dpo":
        from forge_lm.trainer.strategy import wants_bf16

        # In the precision the policy computes in, so that policy and reference agree at step 0 (a bf16
        # policy against fp32 reference log-probabilities would start with non-zero rewards).
        bf16 = wants_bf16(cfg, device)
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            reference_logps(model, data.train + data.val, data.collate, device)
        objective = DPOObjective(post.beta, post.dpo_loss)
    elif post.objective == "distill":
        objective = load_teacher(cfg, chat, tokenizer_path, device, dims)
    model.train()
    loader = data.loader(cfg.trainer.micro_batch_size, cfg.data.seed, dp_rank, dp_size)
    val = data.val_batches(cfg.eval.batch_size, cfg.eval.max_batches)
    logger.info("post-training (%s) from %s: %s", post.objective, source, loader.describe())
    return PosttrainSetup(model, chat, loader, val, objective)


def load_teacher(cfg: Config, chat: ChatTokenizer, student_tokenizer: str, device: torch.device,
                 dims: Any) -> DistillObjective:  # fmt: skip
    """The frozen teacher of a distillation run, on the student's vocabulary and sharded like the student."""
    from forge_lm.trainer.inference.load import load_model
    from forge_lm.trainer.parallel.parallelize import parallelize, uses_fsdp
    from forge_lm.trainer.strategy import wants_bf16

    post = cfg.posttrain
    source, tokenizer_path = _model_source("posttrain.teacher", post.teacher)
    check_same_vocab(
        chat, student_tokenizer, chat_tokenizer(tokenizer_path, post.chat_template), tokenizer_path
    )
    teacher, _ = load_model(source, device=device)
    grow_vocab(teacher, chat.vocab_size)  # a teacher without the chat tokens the student's template adds
    if dims is not None:
        fsdp = uses_fsdp(dims)
        teacher = parallelize(
            teacher, dims, torch.bfloat16 if (fsdp and wants_bf16(cfg, device)) else torch.float32
        )
    logger.info("distilling from %s (alpha %.2f, temperature %.2f)", source, post.distill_alpha,
                post.distill_temperature)  # fmt: skip
    return DistillObjective(teacher, chat.vocab_size, post.distill_alpha, post.distill_temperature)


def objective_record(sums: dict[str, Any], pairs: float) -> dict[str, float]:
    return {k: float(v) / pairs for k, v in sums.items()}
