"""The training entry point: `python -m trainer.train [Hydra overrides]`.

One run, in order: tokenizer (trained if missing) -> packed shards (prepared if missing) ->
model -> optimizer and schedule -> resume from the latest complete checkpoint -> train with
gradient accumulation, clipping and periodic evaluation -> checkpoint -> Hugging Face export ->
a generated sample -> a summary of where everything went.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from data.loader import Loader, eval_batches
from data.prepare import ensure_tokenizer, prepare
from data.shards import ShardDataset
from data.sources import DataError
from trainer import checkpoint as ckpt
from trainer.config import Config, ConfigError
from trainer.config_store import register, to_config
from trainer.eval.perplexity import evaluate_loss
from trainer.inference.generate import generate
from trainer.loss import IGNORE_INDEX, lm_loss
from trainer.metrics import MetricsLogger
from trainer.model import Decoder
from trainer.optim import build_optimizer
from trainer.schedule import build_scheduler

logger = logging.getLogger("trainer")


@dataclass
class RunResult:
    """What a finished run reports (also handy for tests and notebooks)."""

    run_dir: Path
    step: int
    initial_val_loss: Optional[float]
    final_val_loss: float
    final_val_perplexity: float
    checkpoint: Optional[Path]
    hf_dir: Optional[Path]
    samples: dict[str, str] = field(default_factory=dict)
    wall_seconds: float = 0.0


def resolve_device(cfg: Config) -> torch.device:
    want = cfg.trainer.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "trainer.device='cuda' but no CUDA device is visible: use trainer.device=cpu or auto."
        )
    return torch.device(want)


def autocast_context(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast where it is asked for, or where 'auto' finds a device that runs bf16 fast."""
    precision = cfg.trainer.precision
    if precision == "auto":
        fast_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        precision = "bf16" if fast_bf16 else "fp32"
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def check_world(cfg: Config) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.parallel.world_size != world:
        raise ConfigError(
            f"the parallel layout dp_replicate*dp_shard*tp*pp = {cfg.parallel.world_size} does not match the "
            f"{world} process(es) started: set parallel.* so that their product is {world}."
        )
    if world > 1:
        raise ConfigError(
            f"{world} processes were started, but this version trains on a single device: "
            "run `python -m trainer.train` without torchrun."
        )


def run(cfg: Config, resolved_yaml: Optional[str] = None) -> RunResult:
    """Train according to `cfg`. Safe to call again on the same run_dir: it resumes."""
    started = time.perf_counter()
    check_world(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if resolved_yaml is None:
        resolved_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    (run_dir / "config.yaml").write_text(resolved_yaml)
    if cfg.trainer.threads > 0:
        torch.set_num_threads(cfg.trainer.threads)
    device = resolve_device(cfg)
    autocast = autocast_context(cfg, device)

    # -- data: tokenizer and packed shards (both reused when already prepared) --
    tokenizer = ensure_tokenizer(cfg.data)
    prepare(cfg.data, tokenizer)
    train_set = ShardDataset(Path(cfg.data.prepared_dir) / "train")
    val_set = ShardDataset(Path(cfg.data.prepared_dir) / "val")
    loader = Loader(train_set, cfg.trainer.micro_batch_size, seed=cfg.data.seed, shuffle=cfg.data.shuffle)

    # -- model, optimizer, schedule --
    cfg.model.with_vocab(tokenizer.vocab_size)
    model = Decoder.build(cfg.model, device=device, seed=cfg.trainer.seed)
    optimizer = build_optimizer(model, cfg.trainer)
    scheduler = build_scheduler(optimizer, cfg.trainer)

    # -- resume --
    step, initial_val_loss = 0, None
    checkpoint_dir = run_dir / "checkpoints"
    resume_from = _checkpoint_to_resume(cfg, checkpoint_dir)
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model, optimizer, scheduler)
        loader.load_state_dict(state["loader"])
        ckpt.set_rng_state(state["rng"])
        step = state["step"]
        initial_val_loss = state["extra"].get("initial_val_loss")
        logger.info("resumed from %s at step %d", resume_from, step)

    metrics = MetricsLogger(
        run_dir, cfg.trainer.wandb, cfg.name, OmegaConf.to_container(OmegaConf.structured(cfg))
    )
    accum = cfg.grad_accum_steps
    tokens_per_step = cfg.trainer.global_batch_tokens
    flops_per_token = model.flops_per_token(cfg.data.seq_len)
    logger.info(
        "model: %s parameters (%s without embeddings), %.1f MFLOPs per token | device %s, %s",
        f"{model.num_params():,}",
        f"{model.num_params(exclude_embeddings=True):,}",
        flops_per_token / 1e6,
        device,
        "bf16 autocast" if not isinstance(autocast, contextlib.nullcontext) else "fp32",
    )
    logger.info(
        "batch: %d tokens per step = micro-batch %d x seq_len %d x grad-accumulation %d x data-parallel %d | "
        "train %s sequences, val %s",
        tokens_per_step,
        cfg.trainer.micro_batch_size,
        cfg.data.seq_len,
        accum,
        cfg.parallel.dp_size,
        f"{len(train_set):,}",
        f"{len(val_set):,}",
    )

    def validate(at_step: int) -> dict[str, float]:
        batches = eval_batches(val_set, cfg.eval.batch_size, cfg.eval.max_batches)
        result = evaluate_loss(model, batches, device, autocast)
        metrics.log(at_step, {"loss": result["loss"], "perplexity": result["perplexity"]}, kind="val")
        logger.info(
            "step %d | val loss %.4f | val perplexity %.2f", at_step, result["loss"], result["perplexity"]
        )
        return result

    if step == 0:
        initial_val_loss = validate(0)["loss"]

    last_checkpoint = None
    exit_early = False
    model.train()
    with logging_redirect_tqdm():
        bar = tqdm(
            total=cfg.trainer.max_steps,
            initial=step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=None,
        )
        while step < cfg.trainer.max_steps:
            t0 = time.perf_counter()
            micro_batches = [next(loader) for _ in range(accum)]
            n_tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches)
            loss_sum = 0.0
            for batch in micro_batches:
                with autocast:
                    logits = model(
                        batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device)
                    )
                # Sum over tokens / tokens in the whole step: every token weighs the same, whatever micro-batch it is in.
                loss = lm_loss(logits, batch["labels"].to(device), reduction="sum") / n_tokens
                loss.backward()
                loss_sum += loss.item()
            max_norm = cfg.trainer.grad_clip if cfg.trainer.grad_clip > 0 else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0

            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}", tok_s=f"{n_tokens / dt:,.0f}")
            if step % cfg.trainer.log_every == 0 or step == cfg.trainer.max_steps:
                record = {
                    "loss": loss_sum,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": n_tokens / dt,
                    "step_time_s": dt,
                    "tokens_seen": loader.samples_seen * cfg.data.seq_len,
                }
                metrics.log(step, record)
                logger.info(
                    "step %d | loss %.4f | lr %.2e | grad norm %.3f | %.0f tok/s | %.3f s/step",
                    step,
                    loss_sum,
                    lr,
                    grad_norm,
                    n_tokens / dt,
                    dt,
                )
            if not math.isfinite(loss_sum):
                raise FloatingPointError(
                    f"loss is {loss_sum} at step {step}: lower trainer.lr or check the data."
                )

            if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.trainer.max_steps:
                validate(step)
            exit_early = (
                cfg.trainer.exit_at_step > 0 and step == cfg.trainer.exit_at_step < cfg.trainer.max_steps
            )
            periodic = cfg.trainer.checkpoint_every and step % cfg.trainer.checkpoint_every == 0
            if periodic or exit_early or step == cfg.trainer.max_steps:
                last_checkpoint = ckpt.save_checkpoint(
                    checkpoint_dir,
                    step,
                    model,
                    optimizer,
                    scheduler,
                    loader.state_dict(),
                    extra={
                        "initial_val_loss": initial_val_loss,
                        "model_config": dataclasses.asdict(cfg.model),
                        "tokenizer_path": str(Path(cfg.data.tokenizer.path).resolve()),
                    },
                    keep_last=cfg.trainer.keep_last,
                )
            if exit_early:
                logger.info(
                    "exiting at step %d as asked (trainer.exit_at_step); resume by running again", step
                )
                break
        bar.close()

    if exit_early:
        metrics.close()
        return RunResult(run_dir, step, initial_val_loss, float("nan"), float("nan"), last_checkpoint, None)

    final = validate(step)
    if last_checkpoint is None:
        found = ckpt.latest_checkpoint(checkpoint_dir)
        last_checkpoint = found.path if found else None
    hf_dir = None
    if cfg.trainer.export_hf:
        from trainer.hub import to_hf

        hf_dir = Path(to_hf(model, run_dir / "hf", tokenizer=tokenizer))
        logger.info("exported a Hugging Face folder to %s", hf_dir)

    samples = {}
    for i, prompt in enumerate(cfg.eval.prompts):
        new_ids = generate(
            model,
            tokenizer.encode(prompt),
            cfg.eval.max_new_tokens,
            temperature=cfg.eval.temperature,
            top_k=cfg.eval.top_k,
            eos_id=tokenizer.eos_id,
            seed=cfg.trainer.seed + i,
            max_context=cfg.data.seq_len,
        )
        samples[prompt] = prompt + tokenizer.decode(new_ids)
    metrics.log(step, {f"sample_{i}": s for i, s in enumerate(samples.values())}, kind="samples")
    metrics.close()

    result = RunResult(
        run_dir,
        step,
        initial_val_loss,
        final["loss"],
        final["perplexity"],
        last_checkpoint,
        hf_dir,
        samples,
        wall_seconds=time.perf_counter() - started,
    )
    _print_summary(cfg, result, tokenizer_path=cfg.data.tokenizer.path)
    return result


def _checkpoint_to_resume(cfg: Config, checkpoint_dir: Path) -> Optional[Path]:
    mode = cfg.trainer.resume
    if mode == "never":
        return None
    if mode == "auto":
        found = ckpt.latest_checkpoint(checkpoint_dir)
        return found.path if found else None
    path = Path(mode)
    if not path.is_dir():
        raise ConfigError(
            f"trainer.resume={mode!r} is not a directory: give a checkpoint directory, 'auto' or 'never'."
        )
    return path


def _print_summary(cfg: Config, r: RunResult, tokenizer_path: str) -> None:
    lines = [
        "",
        "=" * 72,
        f"run '{cfg.name}' finished at step {r.step} ({r.wall_seconds / 60:.1f} min in this process)",
    ]
    if r.initial_val_loss is not None:
        lines.append(
            f"  validation loss: {r.initial_val_loss:.4f} at step 0 -> {r.final_val_loss:.4f} "
            f"(perplexity {r.final_val_perplexity:.2f}), {r.initial_val_loss - r.final_val_loss:.2f} nats lower"
        )
    else:
        lines.append(f"  validation loss: {r.final_val_loss:.4f} (perplexity {r.final_val_perplexity:.2f})")
    for prompt, text in r.samples.items():
        lines.append(f"  sample for {prompt!r}:")
        lines.extend("    | " + line for line in text.splitlines()[:12])
    lines += [
        "  artifacts:",
        f"    run directory     {r.run_dir}",
        f"    resolved config   {r.run_dir / 'config.yaml'}",
        f"    metrics (JSONL)   {r.run_dir / 'metrics.jsonl'}",
        f"    log               {r.run_dir / 'train.log'}",
        f"    checkpoint        {r.checkpoint}",
        f"    Hugging Face dir  {r.hf_dir}",
        f"    tokenizer         {tokenizer_path}",
        f"    prepared shards   {cfg.data.prepared_dir}",
        "=" * 72,
    ]
    print("\n".join(lines), flush=True)


register()


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(dcfg: DictConfig) -> Any:
    try:
        cfg = to_config(dcfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        result = run(cfg, resolved_yaml=OmegaConf.to_yaml(dcfg, resolve=True))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    except (DataError, ckpt.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return result.final_val_loss


if __name__ == "__main__":
    main()
