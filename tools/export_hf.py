"""Export a training checkpoint to a Hugging Face folder.

    forge export runs/quickstart/checkpoints/step_0000300 out_dir [--tokenizer PATH]

The model configuration and tokenizer location are read from the checkpoint itself, and a
checkpoint written under any parallel layout (FSDP, TP, PP) consolidates into one unsharded model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from forge_lm.data.tokenizer import load_tokenizer
from forge_lm.trainer.checkpoint import CheckpointError, load_model_weights, read_train_state
from forge_lm.trainer.hub import to_hf
from forge_lm.trainer.model import Decoder, ModelConfig


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, tokenizer_path: str | None = None) -> Path:
    checkpoint = Path(checkpoint)
    if not (checkpoint / "train_state.pt").is_file():
        raise CheckpointError(f"{checkpoint} has no train_state.pt: give a checkpoint directory (…/checkpoints/step_N).")
    extra = read_train_state(checkpoint)["extra"]
    if "model_config" not in extra:
        raise CheckpointError(f"{checkpoint} does not record its model config; it was written by an older version.")
    model = Decoder(ModelConfig(**extra["model_config"]))
    load_model_weights(checkpoint, model)  # consolidates any parallel layout into this plain model
    tokenizer_path = tokenizer_path or extra.get("tokenizer_path")
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None
    return Path(to_hf(model, out_dir, tokenizer=tokenizer))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="checkpoint directory (…/checkpoints/step_N)")
    parser.add_argument("out_dir", help="where to write the Hugging Face folder")
    parser.add_argument("--tokenizer", help="tokenizer.json or its directory (default: the one the run used)")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out_dir, args.tokenizer)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
