"""Which knobs really differ between two architectures, and what that does to size and compute.

    forge arch-diff qwen3 gemma3                 two families, at the same generic shape (--size)
    forge arch-diff qwen3_0.6b gemma3_1b_pt      two presets as released

Presets are defined in trainer/model/families.py; knobs are documented in trainer/model/config.py.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

from forge_lm.trainer.model.families import DEFAULT_SIZE, SIZES
from forge_lm.trainer.model.summary import counts, differing_knobs, human, resolve


def render(a: str, b: str, size: str = DEFAULT_SIZE, seq_len: int = 4096, vocab: int | None = None) -> str:
    name_a, cfg_a = resolve(a, size, vocab)
    name_b, cfg_b = resolve(b, size, vocab)
    differ, same = differing_knobs(cfg_a, cfg_b)
    ca, cb = counts(cfg_a, seq_len), counts(cfg_b, seq_len)
    labels = {key: f"{key} (T={seq_len})" if key == "FLOPs per token" else key for key in ca}
    width = max(len(x) for x in [k for k, _, _ in differ] + list(labels.values())) + 2
    col = max(len(name_a), len(name_b), 12) + 2

    lines = [f"{name_a} vs {name_b}"]
    if name_a != a or name_b != b:
        lines.append(
            f"(a family alone is taken at the generic '{size}' shape; a null vocab_size is the family's released one)"
        )
    lines += ["", f"{'knob':{width}}{name_a:{col}}{name_b}"]
    lines += [f"{knob:{width}}{_show(va):{col}}{_show(vb)}" for knob, va, vb in differ]
    lines += ["", *textwrap.wrap(f"same in both ({len(same)}): " + ", ".join(same), width=100), ""]
    lines.append(f"{'':{width}}{name_a:{col}}{name_b}")
    lines += [f"{labels[key]:{width}}{human(ca[key]):{col}}{human(cb[key])}" for key in ca]
    return "\n".join(lines)


def _show(value: object) -> str:
    return "null" if value is None else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "a", help="a family (llama3, qwen3, gemma3, ...) or a preset (qwen3_0.6b, gemma3_tiny, ...)"
    )
    parser.add_argument("b", help="the other one")
    parser.add_argument("--size", default=DEFAULT_SIZE, choices=list(SIZES), help="shape for family names")
    parser.add_argument("--seq-len", type=int, default=4096, help="sequence length for FLOPs per token")
    parser.add_argument(
        "--vocab", type=int, help="vocabulary size for both (default: each family's released one)"
    )
    args = parser.parse_args(argv)
    try:
        print(render(args.a, args.b, args.size, args.seq_len, args.vocab))
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
