"""What checkpoint checksums cost: save and load times with and without them, in one run (a script, not a test).

    python -m forge_lm.tools.bench_checkpoint [--experiment quickstart] [--repeat 7] [--dir DIR]

The model and optimizer of the experiment (default: the quickstart's) after one AdamW step are saved with
`Checkpointer(checksums=True)` and `checksums=False` (complete.json without them, as before they existed),
then loaded back into a fresh model and optimizer (its AdamW state created before the clock starts), each checkpoint from a new directory so that every load
verifies its files. The two variants alternate (with, without, with, ...) so that load from other users of
a shared machine spreads evenly over both; the median of --repeat rounds is printed, with the overhead.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _model_and_optimizer(experiment: str):
    from forge_lm.trainer.config_store import compose, to_config
    from forge_lm.trainer.model import Decoder
    from forge_lm.trainer.optim import build_optimizer

    cfg = to_config(compose([f"experiment={experiment}"]))
    cfg.model.with_vocab(cfg.data.tokenizer.vocab_size)
    model = Decoder.build(cfg.model, device="cpu", seed=0)
    opt = build_optimizer(model, cfg.trainer)
    x = torch.randint(0, cfg.model.vocab_size, (2, 64))
    model(x).float().logsumexp(-1).mean().backward()
    opt.step()
    return cfg, model, opt


def main(argv: list[str] | None = None) -> int:
    from forge_lm.trainer import checkpoint as ckpt
    from forge_lm.trainer.checkpoint_verify import file_record
    from forge_lm.trainer.model import Decoder
    from forge_lm.trainer.optim import build_optimizer

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experiment", default="quickstart")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args(argv)

    cfg, model, opt = _model_and_optimizer(args.experiment)
    params = sum(p.numel() for p in model.parameters())
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-ckpt-"))
    times: dict[tuple[str, bool], list[float]] = {(k, c): [] for k in ("save", "load") for c in (True, False)}
    size = 0
    work: list[float] = []
    try:
        for round_ in range(args.repeat + 1):  # round 0 warms up (imports, page cache) and is not counted
            for checksums in (True, False) if round_ % 2 == 0 else (False, True):
                folder = root / f"r{round_}_{int(checksums)}"
                saver = ckpt.Checkpointer(folder, keep_last=1, checksums=checksums)
                start = time.perf_counter()
                path = saver.save(1, [model], [opt], {"extra": {}})
                saved = time.perf_counter() - start
                size = sum(f.stat().st_size for f in path.iterdir())
                fresh = Decoder(cfg.model)
                fresh_opt = build_optimizer(fresh, cfg.trainer)
                ckpt.optimizer_state([fresh], [fresh_opt])  # creates AdamW's state now, outside the timing
                start = time.perf_counter()
                ckpt.load_checkpoint(path, [fresh], [fresh_opt])
                loaded = time.perf_counter() - start
                if round_:
                    times[("save", checksums)].append(saved)
                    times[("load", checksums)].append(loaded)
                if checksums and round_:  # the checksum work alone, on the files just written
                    start = time.perf_counter()
                    for f in path.iterdir():
                        file_record(f)
                    work.append(time.perf_counter() - start)
                shutil.rmtree(folder)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)

    print(
        f"checkpoint of experiment={args.experiment}: {params / 1e6:.1f} M parameters + AdamW state, "
        f"{size / 2**20:.1f} MiB on disk; median of {args.repeat} interleaved rounds"
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; "
        f"date {datetime.date.today()}; torch {torch.__version__}"
    )
    for kind in ("save", "load"):
        with_, without = (statistics.median(times[(kind, c)]) for c in (True, False))
        print(
            f"  {kind}: {without * 1000:7.1f} ms without checksums, {with_ * 1000:7.1f} ms with "
            f"({(with_ / without - 1) * 100:+.1f}%)"
        )
    print(
        f"  checksums of every file of one checkpoint (what a save adds, overlapped with its fsync; what a load "
        f"adds to verify): {statistics.median(work) * 1000:.1f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
