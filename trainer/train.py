"""The training entry point: `forge train [Hydra overrides]`.

One run, in order: tokenizer (trained if missing) -> packed shards (prepared if missing) ->
model -> optimizer and schedule -> resume from the latest complete checkpoint -> train with
gradient accumulation, clipping and periodic evaluation -> checkpoint -> Hugging Face export ->
a generated sample -> a summary of where everything went.
"""

from __future__ import annotations

import sys

# First, before the heavy imports below (seconds): a preemption signal from now on exits 75, "requeue me".
from forge_lm.trainer.preemption import exit_on_stop_signals

if __name__ == "__main__" or sys.argv[1:2] == ["train"]:  # run as a program: python -m ..., forge train
    exit_on_stop_signals()

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from forge_lm.data.pipeline import build_train_loader, build_val_batches
from forge_lm.data.prepare import ensure_tokenizer, prepare
from forge_lm.data.sources import DataError
from forge_lm.data.tokenizer import Tokenizer
from forge_lm.trainer import checkpoint as ckpt
from forge_lm.trainer.config import Config, ConfigError
from forge_lm.trainer.config_store import register, to_config
from forge_lm.trainer.engine import Engine
from forge_lm.trainer.eval.evaluator import EvalResult, Evaluator
from forge_lm.trainer.eval.scorers import EvalModel
from forge_lm.trainer.eval.validation import build_val_sets
from forge_lm.trainer.metrics import MetricsLogger, device_name, peak_flops, peak_memory_gib
from forge_lm.trainer.model import Decoder
from forge_lm.trainer.parallel import collectives, liveness
from forge_lm.trainer.parallel.mesh import ParallelDims, init_parallel, shutdown
from forge_lm.trainer.preemption import REQUEUE_EXIT_CODE, StopSignal, restart_count, restart_message
from forge_lm.trainer.profiling import StepProfiler, phase
from forge_lm.trainer.spike import SpikeMonitor
from forge_lm.trainer.timing import breakdown_record

logger = logging.getLogger("forge_lm.trainer")


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
    final_eval: Optional[EvalResult] = None
    """The last evaluation: validation numbers (overall and per source), task metrics and samples."""
    wall_seconds: float = 0.0
    stopped_for_requeue: bool = False
    figure: Optional[Path] = None
    """<run_dir>/plots/overview.png, drawn at the end (trainer.plot)."""
    """Stopped early (SIGUSR1/SIGTERM, the stop file or trainer.time_budget_s) after saving a checkpoint."""


def resolve_device(cfg: Config, local_rank: int = 0) -> torch.device:
    want = cfg.trainer.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "trainer.device='cuda' but no CUDA device is visible: use trainer.device=cpu or auto."
        )
    return torch.device(want, local_rank) if want == "cuda" else torch.device(want)


def prepare_data(cfg: Config, dims: ParallelDims) -> Tokenizer:
    """Rank 0 trains the tokenizer and writes the shards if they are missing; the others then load them."""
    error = None
    if dims.is_main:
        try:
            prepare(cfg.data, ensure_tokenizer(cfg.data))
        except (DataError, ConfigError) as e:
            error = e
    if dims.distributed:
        collectives.wait_for_all("data preparation on rank 0")  # may take hours: no collective timeout
        shared = collectives.broadcast_object(str(error) if error else None, src=0)
        if shared is not None and error is None:
            raise DataError(shared)
    if error is not None:
        raise error
    return ensure_tokenizer(cfg.data)


def run(cfg: Config, resolved_yaml: Optional[str] = None) -> RunResult:
    """Train according to `cfg`. Safe to call again on the same run_dir: it resumes.

    Every process started by torchrun calls this; a single-device run is the 1-process case. While it
    runs, SIGUSR1 and SIGTERM make it stop cleanly after the current step (trainer.preemption). An error it
    dies of is recorded for the other ranks, which then end too (trainer.parallel.liveness).
    """
    with StopSignal(cfg.trainer.time_budget_s) as stop_signal, liveness.tell_peers_on_failure():
        return _run(cfg, resolved_yaml, stop_signal)


def _run(cfg: Config, resolved_yaml: Optional[str], stop_signal: StopSignal) -> RunResult:
    started = time.perf_counter()
    dims = init_parallel(cfg.parallel, "cuda" if resolve_device(cfg).type == "cuda" else "cpu")
    device = resolve_device(cfg, dims.local_rank)
    # torch seeds its global generator differently in every process: seed it, so that anything drawing from it
    # is the same in every run, and the state a checkpoint saves (rank 0's, restored on every rank) is the one
    # every rank of an uninterrupted run has.
    torch.manual_seed(cfg.trainer.seed)
    if not dims.is_main:  # one voice in the console: rank 0 logs, the others only warn
        logging.getLogger().setLevel(logging.WARNING)
    run_dir = Path(cfg.run_dir)
    if dims.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resolved_yaml is None:
            resolved_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
        (run_dir / "config.yaml").write_text(resolved_yaml)
    if cfg.trainer.threads > 0:
        torch.set_num_threads(cfg.trainer.threads)

    posttrain = None
    if cfg.posttrain.active:
        # -- post-training (SFT, DPO, distillation): weights, chat tokenizer and conversations from posttrain.* --
        from forge_lm.trainer.posttrain.run import setup_posttrain

        posttrain = setup_posttrain(cfg, dims.is_main, device, dims.dp_rank, dims.dp_size, dims=dims)
        tokenizer, loader, val_batches, model = (
            posttrain.tokenizer, posttrain.loader, posttrain.val_batches, posttrain.model
        )
    else:
        # -- data: tokenizer and packed shards (prepared once, reused afterwards) --
        tokenizer = prepare_data(cfg, dims)
        # One prepared dataset, a weighted mixture, or online tokenization: the data package decides.
        loader = build_train_loader(
            cfg.data, tokenizer, cfg.trainer.micro_batch_size, dp_rank=dims.dp_rank, dp_world_size=dims.dp_size
        )
        val_batches = build_val_batches(cfg.data, tokenizer, cfg.eval.batch_size, cfg.eval.max_batches)

        # -- model: built whole on every rank from the same seed, then split by the parallel layout --
        cfg.model.with_vocab(tokenizer.vocab_size)
        model = Decoder.build(cfg.model, device=device, seed=cfg.trainer.seed)
    engine = Engine(cfg, dims, device, model)  # FSDP2/TP/PP, or DeepSpeed ZeRO (trainer.backend)
    if posttrain is not None:
        engine.objective = posttrain.objective
    del model  # the engine owns it now
    checkpointer = ckpt.Checkpointer(
        run_dir / "checkpoints",
        keep_last=cfg.trainer.keep_last,
        async_save=cfg.trainer.async_checkpoint,
        on_save_error=cfg.trainer.on_save_error,
    )

    # Loss spikes and non-finite steps (trainer.spike): the engine drops their updates on the device; this
    # host half reads the verdicts at log steps, rewinds past a run of them and skips their data.
    samples_per_step = cfg.trainer.micro_batch_size * cfg.grad_accum_steps * dims.dp_size
    spikes = SpikeMonitor(
        cfg.trainer.spike, cfg.trainer.debug, samples_per_step, active=engine.spike is not None
    )

    # -- resume --
    step, initial_val_loss = 0, None
    resume_from = _checkpoint_to_resume(cfg, checkpointer.root)
    if resume_from is not None:
        state = engine.load(resume_from)
        loader.load_state_dict(state["loader"])
        ckpt.set_rng_state(state["rng"])
        step = state["step"]
        initial_val_loss = state["extra"].get("initial_val_loss")
        spikes.load_state_dict(state.get("spike"))
        spikes.loaded(resume_from, step)
    if resume_from is not None or restart_count() > 0:
        logger.info(restart_message(step, resume_from))

    metrics = None
    if dims.is_main:
        metrics = MetricsLogger(
            run_dir,
            cfg.trainer.wandb,
            cfg.name,
            OmegaConf.to_container(OmegaConf.structured(cfg)),
            tensorboard=cfg.trainer.tensorboard,
        )
    accum = cfg.grad_accum_steps
    # (ZeRO-3 swaps parameters for empty placeholders; ds_numel is their real size)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for part in engine.parts for p in part.parameters())
    flops_per_token = _flops_per_token(cfg)
    peak = peak_flops(device_name(device))
    logger.info(
        "model: %s parameters on this rank, %.1f MFLOPs per token | %s, %s | mesh pp=%d dp_replicate=%d "
        "dp_shard=%d tp=%d (%d processes)",
        f"{n_params:,}",
        flops_per_token / 1e6,
        device_name(device),
        engine.precision,
        cfg.parallel.pp,
        cfg.parallel.dp_replicate,
        cfg.parallel.dp_shard,
        cfg.parallel.tp,
        dims.world_size,
    )
    logger.info(
        "batch: %d tokens per step = micro-batch %d x seq_len %d x grad-accumulation %d x data-parallel %d | "
        "train data: %s",
        cfg.trainer.global_batch_tokens,
        cfg.trainer.micro_batch_size,
        cfg.data.seq_len,
        accum,
        dims.dp_size,
        loader.describe(),
    )

    def log(at_step: int, record: dict[str, Any], kind: str) -> None:
        if metrics is not None:
            metrics.log(at_step, record, kind=kind)

    # Evaluation (trainer.eval): validation loss / perplexity / bits per byte, overall and per source, through
    # the engine under any layout; tasks and samples where the engine can run the whole model (else at the end).
    evaluator = Evaluator(
        cfg.eval,
        tokenizer,
        cfg.model.max_seq_len,
        build_val_sets(cfg.data, cfg.eval, tokenizer, val_batches),
        seed=cfg.trainer.seed,
        max_context=cfg.data.seq_len,
    )
    eval_model = engine.eval_model()

    def report(evaluation: EvalResult) -> None:
        for kind, record in evaluation.records():
            log(evaluation.step, record, kind)
        if metrics is not None and evaluation.samples:
            metrics.log_text(evaluation.step, "generations", evaluation.samples)
        for line in evaluation.summary():
            logger.info("%s", line)

    def validate(at_step: int) -> EvalResult:
        evaluation = evaluator.run(at_step, engine.evaluate, eval_model)
        report(evaluation)
        if engine.objective is not None:  # DPO, distillation: the objective's loss and metrics held out
            held_out = engine.evaluate_objective(val_batches)
            log(at_step, held_out, "objective_val")
            logger.info("held-out objective at step %d: %s", at_step, ", ".join(f"{k} {v:.4f}" for k, v in held_out.items()))
        return evaluation

    if resume_from is not None or restart_count() > 0:
        log(step, {"restart_count": restart_count(), "resumed_from": str(resume_from)}, "resume")
    if step == 0:
        initial_val_loss = validate(0).val["loss"]

    def save(at_step: int) -> Path:
        extra = {
            "initial_val_loss": initial_val_loss,
            "model_config": dataclasses.asdict(cfg.model),
            "tokenizer_path": str(Path(cfg.data.tokenizer.path).resolve()),
        }
        spikes.read(log)  # every skipped step so far counted, so a resume continues the count
        state = {"loader": loader.state_dict(), "extra": extra, "spike": spikes.state_dict()}
        return engine.save(checkpointer, at_step, state)

    last_checkpoint = None
    exit_early = stopped = False
    with logging_redirect_tqdm():
        bar = tqdm(
            total=cfg.trainer.max_steps,
            initial=step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=None if dims.is_main else True,
        )
        profiler = StepProfiler(cfg.trainer.profile, run_dir, dims.rank, device)
        # The step's numbers stay on the device (no host sync per step); they are read at log steps, where
        # speeds are averaged over the steps since the previous log.
        window_start, window_steps, window_tokens = time.perf_counter(), 0, None
        stall_warner = DataStallWarner(cfg.trainer.data_stall_warn)
        while step < cfg.trainer.max_steps:
            profiler.before(step + 1)
            with phase("data"), engine.clock.host("data"):
                spikes.skip_windows(loader, accum)  # data that made earlier steps skip, before a rewind
                first_sample = loader.samples_seen
                batches = [next(loader) for _ in range(accum)]
            out = engine.train_step(batches, grad_factor=spikes.planted_factor(first_sample))
            step += 1
            spikes.record(step, out.pop("spike", None), first_sample, loader.samples_seen)
            profiler.after(step)
            if engine.last_layer_stats is not None:
                log(step, engine.last_layer_stats, "layer_stats")
                engine.last_layer_stats = None
            window_steps += 1
            window_tokens = out["tokens"] if window_tokens is None else window_tokens + out["tokens"]
            bar.update(1)
            log_now = step % cfg.trainer.log_every == 0 or step == cfg.trainer.max_steps
            periodic = cfg.trainer.checkpoint_every and step % cfg.trainer.checkpoint_every == 0
            if log_now or periodic:  # the health check before a checkpoint is written, too
                out = {k: _host(v) for k, v in out.items()}
                loss = out["loss"]
                # trainer.spike: log the steps skipped since the last read; after a run of them, go back to a
                # checkpoint from before it (the monitor then skips their data), or stop saying what was seen.
                if spikes.review(log):
                    checkpointer.wait()
                    target = spikes.rewind(checkpointer.root, log)
                    state = engine.load(target.path)
                    loader.load_state_dict(state["loader"])
                    ckpt.set_rng_state(state["rng"])
                    step = state["step"]
                    bar.n = step
                    bar.refresh()
                    engine.clock.read()  # the steps are redone: time them afresh
                    window_start, window_steps, window_tokens = time.perf_counter(), 0, None
                    continue
                if not spikes.active and not math.isfinite(loss):  # nothing skipped it: stop
                    raise FloatingPointError(
                        f"loss is {loss} at step {step}: lower trainer.lr or check the data."
                    )
            if log_now:
                dt = (time.perf_counter() - window_start) / window_steps
                tokens_per_s = _host(window_tokens) / (dt * window_steps)
                times, steps_timed = engine.clock.read(), window_steps
                data_share = times["data"] / (dt * steps_timed)
                window_start, window_steps, window_tokens = time.perf_counter(), 0, None
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{out['lr']:.2e}", tok_s=f"{tokens_per_s:,.0f}")
                record = {
                    "loss": loss,
                    "lr": out["lr"],
                    "grad_norm": out["grad_norm"],
                    "tokens_per_s": tokens_per_s,
                    "tokens_per_s_per_device": tokens_per_s / dims.world_size,
                    "step_time_s": dt,
                    "tokens_seen": loader.samples_seen * cfg.data.seq_len,
                    "peak_memory_gib": peak_memory_gib(device),
                }
                record.update(breakdown_record(times, steps_timed))
                record["data_wait_fraction"] = data_share
                if spikes.active:
                    record["skipped_steps"] = spikes.skipped_total
                record.update({k: v for k, v in out.items() if k.startswith(("moe_", "rewards/", "logps/", "distill/"))})
                if peak is not None:
                    record["mfu"] = flops_per_token * tokens_per_s / (peak * dims.world_size)
                log(step, record, "train")
                logger.info(
                    "step %d | loss %.4f | lr %.2e | grad norm %.3f | %.0f tok/s | %.3f s/step%s | %s",
                    step,
                    loss,
                    out["lr"],
                    out["grad_norm"],
                    tokens_per_s,
                    dt,
                    f" | MFU {record['mfu']:.1%}" if "mfu" in record else "",
                    _breakdown_line(record, dt),
                )
                stall_warner.check(step, data_share)

            paused = time.perf_counter()  # evaluation and saving do not count in the training speed
            if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.trainer.max_steps:
                with engine.clock.host("eval"):
                    validate(step)
            # Collective: every rank asks after every step, so all stop after the same one.
            stopped = step < cfg.trainer.max_steps and stop_signal.should_stop()
            exit_early = stopped or (
                cfg.trainer.exit_at_step > 0 and step == cfg.trainer.exit_at_step < cfg.trainer.max_steps
            )
            # No periodic checkpoint in the middle of a run of skipped steps: a rewind needs one from before it,
            # and keep_last would otherwise prune those.
            if (periodic and not spikes.in_streak) or exit_early or step == cfg.trainer.max_steps:
                with engine.clock.host("checkpoint"):
                    last_checkpoint = save(step)
            window_start += time.perf_counter() - paused
            if exit_early:
                if stopped:
                    logger.info("stopping at step %d for requeue (%s)", step, stop_signal.reason)
                else:
                    logger.info(
                        "exiting at step %d as asked (trainer.exit_at_step); resume by running again", step
                    )
                break
        bar.close()
    checkpointer.wait()
    if stopped:
        stop_signal.mark_requeue(step, last_checkpoint)

    result = RunResult(run_dir, step, initial_val_loss, float("nan"), float("nan"), last_checkpoint, None)
    result.stopped_for_requeue = stopped
    if not exit_early:
        final = validate(step)
        result.final_eval = final
        result.final_val_loss, result.final_val_perplexity = final.val["loss"], final.val["perplexity"]
        if last_checkpoint is None:
            found = ckpt.latest_checkpoint(checkpointer.root)
            result.checkpoint = found.path if found else None
        full_model = engine.full_model(result.checkpoint)
        if full_model is not None:
            late = _export_and_sample(cfg, full_model, tokenizer, result, evaluator, device)
            if late is not None:
                report(late)
        del full_model
        log(step, {f"sample_{i}": s for i, s in enumerate(result.samples.values())}, "samples")
    loader.close()  # stops its prefetch thread / online workers
    if metrics is not None:
        metrics.close()
        if cfg.trainer.plot and not exit_early:
            result.figure = _draw_figure(run_dir)
    result.wall_seconds = time.perf_counter() - started
    if dims.is_main and not exit_early:
        _print_summary(cfg, result, tokenizer_path=cfg.data.tokenizer.path)
    if collectives.active():  # also the 1-process group torchrun gets
        del engine, loader
        shutdown()
    return result


class DataStallWarner:
    """Warns when the training loop waits for its data: at the first log step where the wait exceeds the
    threshold, and after that at most once every 10 log steps while it lasts. The first log step of a process
    is not judged: it includes the loader's start (opening shards, filling its prefetch queue)."""

    def __init__(self, threshold: float) -> None:
        self.threshold, self.quiet_for, self.started = threshold, 0, False

    def check(self, step: int, share: float) -> None:
        if not self.started:
            self.started = True
            return
        self.quiet_for = max(0, self.quiet_for - 1)
        if self.threshold and share > self.threshold and self.quiet_for == 0:
            logger.warning(
                "step %d: training waited for data %.0f%% of the time since the last log (more than "
                "trainer.data_stall_warn=%g): the loader cannot keep up. Raise data.prefetch, use prepared "
                "shards (data.mode=offline), or raise data.num_workers with data.mode=online.",
                step,
                100 * share,
                self.threshold,
            )
            self.quiet_for = 10


def _breakdown_line(record: dict[str, Any], step_time: float) -> str:
    """`data 1% | fwd+bwd 88% | optimizer 9% | comm 0%` of the step time (checkpoint and evaluation are
    outside it and appear only when they happened since the last log)."""
    parts = [
        f"{label} {100 * record[key] / step_time:.0f}%"
        for label, key in (
            ("data", "time_data_s"),
            ("fwd+bwd", "time_fwd_bwd_s"),
            ("optimizer", "time_optimizer_s"),
            ("comm", "time_comm_s"),
        )
    ]
    parts += [f"{label} {record[key]:.1f} s" for label, key in (("checkpoint", "time_checkpoint_s"),
              ("eval", "time_eval_s")) if record[key] > 0]  # fmt: skip
    return ", ".join(parts)


def _draw_figure(run_dir: Path) -> Optional[Path]:
    """The run's overview figure (forge plot); a failure to draw is a warning, never a failed run."""
    try:
        from forge_lm.tools.plot_runs import plot_layer_stats, plot_objective, plot_runs

        out = run_dir / "plots" / "overview.png"
        plot_runs([run_dir], out)
        plot_layer_stats([run_dir], out.with_name("layer_stats.png"))
        plot_objective([run_dir], out.with_name("objective.png"))
        return out
    except Exception as e:
        logger.warning("could not draw the run's figure (%s); `forge plot %s` draws it later", e, run_dir)
        return None


def _host(value: Any) -> Any:
    """A step statistic as a Python number (this waits for the device)."""
    return value.item() if isinstance(value, torch.Tensor) else value


def _flops_per_token(cfg: Config) -> int:
    with torch.device("meta"):
        return Decoder(cfg.model).flops_per_token(cfg.data.seq_len)


def _export_and_sample(
    cfg: Config,
    model: Decoder,
    tokenizer: Tokenizer,
    result: RunResult,
    evaluator: Evaluator,
    device: torch.device,
) -> Optional[EvalResult]:
    """Export the finished model; take the samples of the final evaluation. Returns the tasks and samples
    evaluated here on the consolidated model when the training layout could not run them (else None)."""
    if cfg.trainer.export_hf:
        from forge_lm.trainer.hub import to_hf

        result.hf_dir = Path(to_hf(model, result.run_dir / "hf", tokenizer=tokenizer))
        logger.info("exported a Hugging Face folder to %s", result.hf_dir)
    final = result.final_eval
    late = None
    if final is not None and not final.tasks and not final.samples and (evaluator.tasks or cfg.eval.prompts):
        late = evaluator.run(final.step, None, EvalModel(model, device))
        final.tasks, final.samples = late.tasks, late.samples
    if final is not None:
        result.samples = dict(final.samples)
    return late


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
    if r.final_eval is not None:
        if "bpb" in r.final_eval.val:
            lines.append(f"  bits per byte: {r.final_eval.val['bpb']:.4f}")
        for name, m in r.final_eval.tasks.items():
            shown = ", ".join(f"{k} {v:.3f}" for k, v in m.items() if k != "n")
            lines.append(f"  {name} ({int(m.get('n', 0))} examples): {shown}")
    for prompt, text in r.samples.items():
        lines.append(f"  sample for {prompt!r}:")
        lines.extend("    | " + line for line in text.splitlines()[:12])
    lines += [
        "  artifacts:",
        f"    run directory     {r.run_dir}",
        f"    resolved config   {r.run_dir / 'config.yaml'}",
        f"    metrics (JSONL)   {r.run_dir / 'metrics.jsonl'}",
        *([f"    figure            {r.figure}"] if r.figure else []),
        *(
            [f"    TensorBoard       tensorboard --logdir {r.run_dir / 'tensorboard'}"]
            if cfg.trainer.tensorboard
            else []
        ),
        f"    log               {r.run_dir / 'train.log'}",
        f"    checkpoint        {r.checkpoint}",
        f"    Hugging Face dir  {r.hf_dir}",
        f"    tokenizer         {tokenizer_path}",
        f"    prepared shards   {cfg.data.prepared_dir}",
        "  talk to it:",
        f"    forge serve {r.run_dir}     (OpenAI API at http://127.0.0.1:8000/v1, chat page at http://127.0.0.1:8000/;"
        " pip install 'forge-lm[serve]')",
        f"    forge export {r.run_dir} {r.run_dir / 'model.gguf'} --format gguf     (one file for llama.cpp)",
        "=" * 72,
    ]
    print("\n".join(lines), flush=True)


register()


@hydra.main(version_base="1.3", config_path="pkg://forge_lm.configs", config_name="config")
def main(dcfg: DictConfig) -> Any:
    _own_run_dir_per_sweep_job(dcfg)
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
    except (DataError, ckpt.CheckpointError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        if liveness.peer_failure(e):  # another rank died or went silent: one line, exit 75 (requeue)
            liveness.exit_for_collective_error(e)
        raise
    if result.stopped_for_requeue:
        sys.exit(REQUEUE_EXIT_CODE)
    return result.final_val_loss


def _own_run_dir_per_sweep_job(dcfg: DictConfig) -> None:
    """In a multirun (`-m`, e.g. through hydra/launcher=submitit_slurm) every job writes into its own sweep
    folder (<output_root>/multirun/<name>/<job number>) instead of sharing run_dir, unless run_dir is set."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    run_dir_set = any(o.lstrip("+~").startswith("run_dir=") for o in hc.overrides.task)
    if hc.mode == RunMode.MULTIRUN and not run_dir_set:
        dcfg.run_dir = hc.runtime.output_dir


if __name__ == "__main__":
    main()
