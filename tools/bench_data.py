"""Benchmark of the data pipeline against the ceiling set by the tokenizer itself (a script, not a test).

    forge bench data [--mb 20] [--tokenizer tests/assets/tokenizers/gpt2] [--workers N] [--repeat 5]

On the same text (CPython's standard library sources and the Shakespeare corpus, written once as a .jsonl
file), in one run, it measures:

  (a) ceiling    raw `tokenizers` encode_batch on one core, texts already in memory
  (b) prepare    `forge_lm.data.prepare` end to end (read, tokenize, pack, write shards + manifest) with 1 worker
                 process and with N, and in the calling process (num_workers=0)
  (c) baseline   `datasets.load_dataset("json")` + `Dataset.map(batched=True)` with the same tokenizer, what
                 users do today, with num_proc=1 and N
  (d) loader     `Loader` batches of 8 x 2048 tokens from the prepared shards, in one process

`--long-document MB` instead measures one document of that many megabytes on a single line (real prose
repeated): the peak memory beyond the text and the time of encoding it whole with the `tokenizers` library,
and through `Tokenizer.encode_batch` (which encodes a long text a piece at a time), each in its own process.

Token rates use the same token count for every row (the ids of the documents, without EOS), so the ratios
compare times. Each timing is the best of --repeat runs, taken round-robin over the measurements so that
load from other users of a shared machine spreads evenly; CPU seconds (this process and its workers)
are printed beside the wall time.
"""

from __future__ import annotations

import os

# One core for the tokenizer in this process: the ceiling and the in-process and baseline rows are single-core.
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sysconfig  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

CORPORA = Path(__file__).resolve().parents[1] / "data" / "corpora"  # shipped inside forge_lm.data
# The GPT-2 tokenizer the tests use; only in a source checkout, so elsewhere --tokenizer is required.
CHECKOUT_TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "assets" / "tokenizers" / "gpt2"


def build_corpus(path: Path, megabytes: float) -> list[str]:
    """Shakespeare's scenes, then CPython modules, until `megabytes` of text; written as .jsonl."""
    from forge_lm.data.config import SourceConfig
    from forge_lm.data.report import InputReport
    from forge_lm.data.sources import iter_documents

    sources = [
        SourceConfig(name="shakespeare", paths=[str(CORPORA / "shakespeare.jsonl.zst")]),
        SourceConfig(
            name="cpython",
            paths=[f"{sysconfig.get_paths()['stdlib']}/**/*.py"],
            exclude=["*/site-packages/*"],
        ),
    ]
    texts, size = [], 0
    for source in sources:
        for doc in iter_documents(source, InputReport()):  # (a few stdlib test files are not UTF-8)
            texts.append(doc.text)
            size += len(doc.text.encode())
            if size >= megabytes * 1e6:
                break
        if size >= megabytes * 1e6:
            break
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": f"doc{i}", "text": text}) + "\n")
    return texts


def cpu_seconds() -> float:
    """CPU time of this process and of its waited-for children (worker processes), user + system."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def measure(runs: dict[str, Callable[[], object]], repeat: int) -> dict[str, tuple[float, float]]:
    """name -> (best wall seconds, CPU seconds of that run), the runs interleaved round by round so that
    load from other users of the machine spreads evenly over them."""
    best: dict[str, tuple[float, float]] = {}
    for _ in range(repeat):
        for name, fn in runs.items():
            cpu, start = cpu_seconds(), time.perf_counter()
            fn()
            wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
            if name not in best or wall < best[name][0]:
                best[name] = (wall, cpu)
    return best


def main() -> None:
    from forge_lm.data.workers import available_cpus

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=20.0, help="megabytes of text (default 20)")
    parser.add_argument(
        "--tokenizer",
        default=str(CHECKOUT_TOKENIZER) if CHECKOUT_TOKENIZER.is_dir() else None,
        required=not CHECKOUT_TOKENIZER.is_dir(),
        help="a tokenizer.json or its folder (default in a source checkout: tests/assets/tokenizers/gpt2)",
    )
    parser.add_argument("--workers", type=int, default=available_cpus(), help="N (default: available cores)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per timing, best kept (default 5)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--chunk-chars", type=int, default=1_000_000, help="data.chunk_chars (default 1M)")
    parser.add_argument("--out", default=None, help="work directory (default: a temporary one, removed)")
    parser.add_argument("--long-document", type=float, metavar="MB", help="measure one MB-long line instead")
    args = parser.parse_args()
    if args.long_document:
        _long_document(args.tokenizer, args.long_document)
        return

    import numpy as np

    from forge_lm.data.config import DataConfig, SourceConfig, TokenizerConfig
    from forge_lm.data.loader import Loader
    from forge_lm.data.prepare import prepare
    from forge_lm.data.shards import ShardDataset
    from forge_lm.data.tokenizer import load_tokenizer

    work = Path(args.out or tempfile.mkdtemp(prefix="bench_data-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    texts = build_corpus(corpus, args.mb)
    tokenizer = load_tokenizer(args.tokenizer)
    n = args.workers
    print(f"corpus: {len(texts):,} documents, {corpus.stat().st_size / 1e6:.1f} MB ({corpus})")
    print(f"tokenizer: {args.tokenizer} (vocab {tokenizer.vocab_size}); workers N={n}; best of {args.repeat}")
    print(f"prepare: seq_len {args.seq_len}, chunk_chars {args.chunk_chars:,}, concat packing, no val split")

    # (a) the ceiling: encode_batch on one core, texts in memory
    backend = tokenizer.backend
    batches = [texts[i : i + 256] for i in range(0, len(texts), 256)]
    tokens = sum(len(e) for b in batches for e in backend.encode_batch_fast(b, add_special_tokens=False))

    def ceiling() -> None:
        # A fresh copy each time, as a worker process starts with: the tokenizer caches words it has seen.
        fresh = type(backend).from_str(backend.to_str())
        for b in batches:
            fresh.encode_batch_fast(b, add_special_tokens=False)

    # (b) prepare, end to end
    def run_prepare(workers: int) -> None:
        out = work / f"prepared_w{workers}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = DataConfig(
            name="bench",
            sources=[SourceConfig(name="corpus", paths=[str(corpus)])],
            tokenizer=TokenizerConfig(path=args.tokenizer, train=False),
            seq_len=args.seq_len,
            prepared_dir=str(out),
            val_fraction=0.0,
            num_workers=workers,
            chunk_chars=args.chunk_chars,
        )
        prepare(cfg, tokenizer, show_progress=False)

    # (c) the baseline: datasets.load_dataset + map
    import datasets

    datasets.disable_progress_bars()

    def run_datasets(num_proc: int) -> None:
        cache = work / "hf_cache"
        shutil.rmtree(cache, ignore_errors=True)
        ds = datasets.load_dataset("json", data_files=str(corpus), split="train", cache_dir=str(cache))
        ds.map(
            lambda batch: {"ids": tokenizer.encode_batch(batch["text"])},
            batched=True,
            remove_columns=ds.column_names,
            num_proc=num_proc if num_proc > 1 else None,
        )

    results = measure(
        {
            "(a) tokenizers encode_batch, 1 core (ceiling)": ceiling,
            "(b) prepare, 1 worker process": lambda: run_prepare(1),
            f"(b) prepare, {n} worker processes": lambda: run_prepare(n),
            "(b) prepare, in the calling process": lambda: run_prepare(0),
            "(c) datasets load_dataset + map, num_proc=1": lambda: run_datasets(1),
            f"(c) datasets load_dataset + map, num_proc={n}": lambda: run_datasets(n),
        },
        args.repeat,
    )

    # (d) the loader, from the prepared shards
    dataset = ShardDataset(work / "prepared_w0" / "train")
    batch_size, steps = 8, 2000
    loader_tokens = batch_size * args.seq_len * steps
    loaders = {p: Loader(dataset, batch_size, seed=0, prefetch=p) for p in (0, 2)}
    for loader in loaders.values():
        for _ in range(20):  # page the shards in
            next(loader)
    results.update(
        measure(
            {
                f"(d) loader, 8 x {args.seq_len} batches, prefetch={p}": lambda loader=loader: [
                    next(loader) for _ in range(steps)
                ]
                for p, loader in loaders.items()
            },
            args.repeat,
        )
    )
    for loader in loaders.values():
        loader.close()

    print()
    print(f"{'measurement':52s} {'tokens/s':>12s} {'vs ceiling':>10s} {'wall s':>7s} {'CPU s':>7s}")
    ceiling_rate = tokens / results["(a) tokenizers encode_batch, 1 core (ceiling)"][0]
    for name, (wall, cpu) in results.items():
        count = loader_tokens if name.startswith("(d)") else tokens
        rate = count / wall
        print(f"{name:52s} {rate:12,.0f} {rate / ceiling_rate:9.0%} {wall:7.2f} {cpu:7.2f}")
    prep1 = tokens / results["(b) prepare, 1 worker process"][0]
    base1 = tokens / results["(c) datasets load_dataset + map, num_proc=1"][0]
    prepn = tokens / results[f"(b) prepare, {n} worker processes"][0]
    basen = tokens / results[f"(c) datasets load_dataset + map, num_proc={n}"][0]
    print(f"\nprepare vs datasets.map: {prep1 / base1:.2f}x with 1 process, {prepn / basen:.2f}x with {n}")
    print(f"{tokens:,} tokens; loader: {np.int64(loader_tokens):,} tokens per timing")
    print(
        f"machine: {platform.machine()}, {available_cpus()} cores available, {platform.python_version()}, "
        f"date {datetime.date.today()}, load average {os.getloadavg()[0]:.1f} at the end"
    )
    if args.out is None:
        shutil.rmtree(work, ignore_errors=True)


_LONG_DOCUMENT = """
import json, resource, sys, time
from forge_lm.data.tokenizer import load_tokenizer
from forge_lm.tools.bench_data import build_corpus
import tempfile, pathlib
texts = build_corpus(pathlib.Path(tempfile.mkdtemp()) / "c.jsonl", {mb})
one = " ".join(t.replace("\\n", " ") for t in texts)
doc = (one * (int({mb} * 1e6) // len(one) + 1))[: int({mb} * 1e6)]
tok = load_tokenizer({tokenizer!r})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
ids = tok._tok.encode(doc, add_special_tokens=False).ids if {whole} else tok.encode_batch([doc])[0]
seconds = time.perf_counter() - t0
print(json.dumps([len(ids), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024, seconds]))
"""


def _long_document(tokenizer: str, mb: float) -> None:
    import subprocess
    import sys

    print(f"one line of {mb:g} MB (real prose repeated), tokenizer {tokenizer}")
    for label, whole in (("tokenizers library, whole", True), ("Tokenizer.encode_batch", False)):
        script = _LONG_DOCUMENT.format(mb=mb, tokenizer=tokenizer, whole=whole)
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
        tokens, extra, seconds = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {label:28s} {tokens:,} tokens | {extra / 2**30:.2f} GiB beyond the text | {seconds:.1f} s")


if __name__ == "__main__":
    main()
