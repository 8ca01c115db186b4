"""Evaluate a saved model: `forge eval eval.checkpoint=PATH [Hydra overrides]`.

    forge eval eval.checkpoint=runs/quickstart/checkpoints/step_0000200 experiment=quickstart
    forge eval eval.checkpoint=runs/quickstart/hf eval.tasks=[my/arc.jsonl] eval.task_limit=100
    forge eval eval.checkpoint=runs/quickstart eval.output=results.json   # latest checkpoint

PATH is a checkpoint directory of any parallel layout (consolidated here into one model), a run directory
(its latest complete checkpoint) or a Hugging Face folder. The same config tree as training (configs/)
is composed, so eval.* choose tasks, prompts and batch sizes, and data.* the validation data. The model's
own configuration comes from the checkpoint; giving model=... or model.* overrides states the
architecture you expect, and a checkpoint of another one is refused. The results are printed, and
written as JSON with eval.output=FILE.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from forge_lm.data.sources import DataError
from forge_lm.data.tokenizer import Tokenizer, has_tokenizer, load_tokenizer
from forge_lm.trainer.checkpoint import CheckpointError, latest_checkpoint, read_train_state
from forge_lm.trainer.config import Config, ConfigError
from forge_lm.trainer.eval.evaluator import EvalResult, Evaluator
from forge_lm.trainer.eval.formats import TaskFormatError
from forge_lm.trainer.eval.scorers import EvalModel
from forge_lm.trainer.eval.validation import LossFn, ValSet, build_val_sets, plain_loss

logger = logging.getLogger(__name__)


def compose(overrides: list[str]) -> Config:
    """The validated config tree with `overrides` (and `--config-dir DIR`), as `forge train` would compose it."""
    from forge_lm.trainer.config_store import compose as compose_tree
    from forge_lm.trainer.config_store import to_config

    return to_config(compose_tree(overrides))


def evaluate(cfg: Config, expect_architecture: bool = False) -> tuple[EvalResult, dict[str, Any]]:
    """Load eval.checkpoint and evaluate it once. Returns the result and a description of what was evaluated."""
    from forge_lm.trainer.engine import wants_bf16
    from forge_lm.trainer.inference import load_model

    if not cfg.eval.checkpoint:
        raise ConfigError(
            "eval.checkpoint is not set: give a checkpoint, run directory or Hugging Face folder."
        )
    device = torch.device(
        "cuda" if cfg.trainer.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    )
    if cfg.trainer.device == "cuda" and device.type != "cuda":
        raise ConfigError(
            "trainer.device='cuda' but no CUDA device is visible: use trainer.device=cpu or auto."
        )
    expect = cfg.model if expect_architecture else None
    model, tokenizer = load_model(cfg.eval.checkpoint, device, torch.float32, expect, cfg.eval.tokenizer)
    if tokenizer is None:
        raise ConfigError(
            f"{cfg.eval.checkpoint}: no tokenizer found with the model (the run's tokenizer path is gone, or the "
            "folder has none): give one with eval.tokenizer=PATH."
        )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if wants_bf16(cfg, device) else None
    about = {
        "model": str(cfg.eval.checkpoint),
        "step": _step_of(Path(cfg.eval.checkpoint)),
        "device": str(device),
    }
    val_sets, loss_fn, note = _validation(cfg, tokenizer, model, device, autocast)
    evaluator = Evaluator(cfg.eval, tokenizer, model.cfg.max_seq_len, val_sets, seed=cfg.trainer.seed)
    result = evaluator.run(about["step"] or 0, loss_fn, EvalModel(model, device, autocast=autocast))
    if note:
        result.notes.append(note)
    return result, about


def _validation(
    cfg: Config, tokenizer: Tokenizer, model: torch.nn.Module, device: torch.device, autocast: Optional[Any]
) -> tuple[list[ValSet], Optional[LossFn], Optional[str]]:
    """The validation sets of cfg.data, if they can be measured with this model's tokenizer."""
    if not cfg.eval.validation:
        return [], None, None
    data_tokenizer = cfg.data.tokenizer.path
    if not has_tokenizer(data_tokenizer):
        return [], None, f"no validation numbers: data.tokenizer.path={data_tokenizer} holds no tokenizer"
    if load_tokenizer(data_tokenizer).fingerprint != tokenizer.fingerprint:
        return (
            [],
            None,
            (
                f"no validation numbers: data {cfg.data.name!r} is tokenized with {data_tokenizer}, not with the model's "
                "tokenizer (choose the data the model was trained on, e.g. the same data=... and output_root=...)"
            ),
        )
    from forge_lm.data.prepare import ensure_tokenizer, prepare

    data_tok = ensure_tokenizer(cfg.data, show_progress=False)
    prepare(cfg.data, data_tok)  # nothing to do when the run prepared it already
    sets = build_val_sets(cfg.data, cfg.eval, data_tok)
    return sets, plain_loss(model, device, cfg.data.document_masking, autocast), None


def _step_of(path: Path) -> Optional[int]:
    """The training step of a checkpoint or of a run's latest complete one; None for a Hugging Face folder."""
    if (path / "train_state.pt").is_file():
        try:
            return int(read_train_state(path)["step"])
        except (CheckpointError, KeyError, ValueError):
            return None
    found = latest_checkpoint(path / "checkpoints") or latest_checkpoint(path)
    return found.step if found else None


def main(argv: Optional[list[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = compose(args)
    except (ConfigError, HydraException, OmegaConfBaseException) as e:
        print(f"config error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    try:
        expect = any(a.lstrip("+~").split("=")[0].split(".")[0] == "model" for a in args)
        result, about = evaluate(cfg, expect_architecture=expect)
    except (ConfigError, CheckpointError, TaskFormatError, DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"evaluated {about['model']}" + (f" (step {about['step']})" if about["step"] is not None else ""))
    for line in result.summary():
        print("  " + line.split(" | ", 1)[-1])
    if cfg.eval.output:
        out = Path(cfg.eval.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {
            **about,
            "val": result.val,
            "tasks": result.tasks,
            "samples": result.samples,
            "seconds": result.seconds,
            "notes": result.notes,
        }
        out.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
