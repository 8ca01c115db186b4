"""A model summary: the knobs that make the architecture, parameters per module, FLOPs per token.

    forge arch-show qwen3_0.6b
    forge arch-show gemma3 --size 125m --seq-len 2048

Presets are defined in trainer/model/families.py; nothing is allocated (the model is built on the meta device).
"""

from __future__ import annotations

import argparse
import sys

from forge_lm.trainer.model.config import ModelConfig
from forge_lm.trainer.model.families import DEFAULT_SIZE, RELEASED_SOURCES, SIZES
from forge_lm.trainer.model.summary import counts, human, knob_values, module_rows, resolve


def render(name: str, size: str = DEFAULT_SIZE, seq_len: int = 4096, vocab: int | None = None) -> str:
    full, cfg = resolve(name, size, vocab)
    source = RELEASED_SOURCES.get(full)
    lines = [f"{full}" + (f" ({source})" if source else "") + f": family {cfg.family}", ""]
    defaults = knob_values(ModelConfig(vocab_size=cfg.vocab_size))
    changed = [f"{k}={v}" for k, v in knob_values(cfg).items() if v != defaults[k] and k != "family"]
    lines.append("knobs (where they differ from the defaults, a plain Llama):")
    lines += [f"  {item}" for item in changed] + [""]

    rows = list(module_rows(cfg))
    width = max(len(r[0]) for r in rows) + 2
    total = 0
    lines.append(f"{'parameter':{width}}{'shape':>20}{'count':>16}")
    for pname, shape, n in rows:
        times = cfg.n_layers if pname.startswith("layers.0.") else 1
        label = pname.replace("layers.0.", "layers.*.") if times > 1 else pname
        count = f"{n:,}" + (f" x{times}" if times > 1 else "")
        lines.append(f"{label:{width}}{str(list(shape)):>20}{count:>16}")
        total += n * times
    lines.append("")
    c = counts(cfg, seq_len)
    assert total == c["parameters"], (total, c["parameters"])
    for key, value in c.items():
        label = f"{key} (training, T={seq_len})" if key == "FLOPs per token" else key
        lines.append(f"{label:34}{value:>20,}  ({human(value)})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name", help="a preset (qwen3_0.6b, gemma3_tiny, ...) or a family (taken at --size)")
    parser.add_argument("--size", default=DEFAULT_SIZE, choices=list(SIZES), help="shape for a family name")
    parser.add_argument("--seq-len", type=int, default=4096, help="sequence length for FLOPs per token")
    parser.add_argument(
        "--vocab", type=int, help="vocabulary size (default: the preset's, else the family's released one)"
    )
    args = parser.parse_args(argv)
    try:
        print(render(args.name, args.size, args.seq_len, args.vocab))
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
