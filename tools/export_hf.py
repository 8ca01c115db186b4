"""Export a training checkpoint to a Hugging Face folder, or to one GGUF file for llama.cpp.

    forge export runs/quickstart/checkpoints/step_0000300 out_dir [--tokenizer PATH] [--dtype f32|f16|bf16]
    forge export runs/quickstart out.gguf --format gguf [--dtype f32|f16|bf16|q8_0]

The model configuration and tokenizer location are read from the checkpoint itself, and a
checkpoint written under any parallel layout (FSDP, TP, PP) consolidates into one unsharded model.
GGUF export also takes a run directory (its latest checkpoint) or a Hugging Face folder; its target is
a .gguf file, or a directory that receives model-<dtype>.gguf (docs/gguf.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from forge_lm.data.tokenizer import load_tokenizer
from forge_lm.trainer.checkpoint import CheckpointError, load_model_weights, read_train_state
from forge_lm.trainer.hub import to_hf
from forge_lm.trainer.model import Decoder, ModelConfig

FORMATS = ("hf", "gguf")
HF_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_DTYPE = {"hf": "f32", "gguf": "f16"}
"""The HF export keeps full precision by default; GGUF defaults to f16, as llama.cpp's own converter does."""


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    tokenizer_path: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    checkpoint = Path(checkpoint)
    if not (checkpoint / "train_state.pt").is_file():
        raise CheckpointError(
            f"{checkpoint} has no train_state.pt: give a checkpoint directory (…/checkpoints/step_N)."
        )
    extra = read_train_state(checkpoint)["extra"]
    if "model_config" not in extra:
        raise CheckpointError(
            f"{checkpoint} does not record its model config; it was written by an older version."
        )
    model = Decoder(ModelConfig(**extra["model_config"]))
    load_model_weights(checkpoint, model)  # consolidates any parallel layout into this plain model
    tokenizer_path = tokenizer_path or extra.get("tokenizer_path")
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None
    return Path(to_hf(model, out_dir, tokenizer=tokenizer, dtype=dtype))


def export_gguf(
    source: str | Path, out: str | Path, dtype: str = "f16", tokenizer_path: str | None = None
) -> Path:
    """Write the model at `source` (checkpoint, run directory or Hugging Face folder) as one GGUF file.

    `out` is the .gguf file, or a directory that receives model-<dtype>.gguf. Raises ValueError (and its
    subclasses), CheckpointError or FileNotFoundError, before anything is written, for whatever llama.cpp
    could not run the same way.
    """
    from forge_lm.trainer.hub.gguf import GGUF_DTYPES, read_tokenizer_extras, to_gguf
    from forge_lm.trainer.inference.load import load_model, tokenizer_location

    source = Path(source)
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"--dtype {dtype}: GGUF export takes one of {', '.join(GGUF_DTYPES)}.")
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such checkpoint, run directory or Hugging Face folder.")
    model, tokenizer = load_model(source, tokenizer_path=tokenizer_path)
    if tokenizer is None:
        raise FileNotFoundError(
            f"{source}: no tokenizer found (the one recorded at training is gone): give --tokenizer PATH, "
            "since llama.cpp needs the vocabulary inside the GGUF file."
        )
    extras = read_tokenizer_extras(tokenizer_path or tokenizer_location(source))
    target = Path(out)
    if target.suffix != ".gguf":
        target = target / f"model-{dtype}.gguf"
    return Path(to_gguf(model, target, tokenizer, dtype=dtype, extras=extras, name=_model_name(source)))


def _model_name(source: Path) -> str:
    """general.name: the run's name (a checkpoint's run is two levels up: run/checkpoints/step_N)."""
    source = source.resolve()
    if source.parent.name == "checkpoints":
        return source.parent.parent.name
    if source.name == "hf" and (source / "config.json").is_file():  # a run's own export: run/hf
        return source.parent.name
    return source.name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkpoint",
        help="checkpoint directory (…/checkpoints/step_N); for gguf also a run directory or a Hugging Face folder",
    )
    parser.add_argument(
        "out_dir", help="where to write: the Hugging Face folder, or the .gguf file (or its directory)"
    )
    parser.add_argument("--tokenizer", help="tokenizer.json or its directory (default: the one the run used)")
    parser.add_argument("--format", default="hf", help="hf (default): a Hugging Face folder; gguf: llama.cpp")
    parser.add_argument(
        "--dtype",
        help="weights as f32, f16, bf16 (hf, gguf) or q8_0 (gguf); default f32 for hf, f16 for gguf",
    )
    args = parser.parse_args(argv)
    # Checked here rather than by argparse `choices`, so a mistake is one line naming the choices.
    if args.format not in FORMATS:
        print(f"error: --format {args.format}: choose one of {', '.join(FORMATS)}.", file=sys.stderr)
        return 2
    dtype = args.dtype or DEFAULT_DTYPE[args.format]
    try:
        if args.format == "gguf":
            try:
                import gguf  # noqa: F401
            except ImportError:
                print(
                    "error: forge export --format gguf needs the gguf package: pip install gguf",
                    file=sys.stderr,
                )
                return 2
            out = export_gguf(args.checkpoint, args.out_dir, dtype, args.tokenizer)
        else:
            if dtype not in HF_DTYPES:
                raise ValueError(
                    f"--dtype {dtype}: a Hugging Face export takes one of {', '.join(HF_DTYPES)}."
                )
            out = export_checkpoint(args.checkpoint, args.out_dir, args.tokenizer, HF_DTYPES[dtype])
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} to {out}")
    return 0


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


if __name__ == "__main__":
    sys.exit(main())
