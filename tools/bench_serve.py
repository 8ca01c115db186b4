"""`forge serve` under load: concurrent streaming clients, the same requests one at a time, and one client
against the Generator called directly, all in one run.

    forge bench serve                                  # CPU defaults: the quickstart-size model, 16 clients
    forge bench serve --model runs/quickstart --clients 32 --new 256
    forge bench serve --device cuda --dtype bfloat16 --clients 64

It starts `forge serve` as a subprocess on a free 127.0.0.1 port and talks to it through the official
`openai` client (AsyncOpenAI, streaming, temperature 0 so that every run generates the same tokens):

- concurrent: `--clients` requests at once, one per client, each `--prompt` tokens of Shakespeare (a
  different passage per client) and `--new` new tokens. Aggregate tokens/s = all generated tokens over
  the wall time from the first request to the last token. Time to first token (TTFT) and inter-token
  latency (ITL, the gaps between streamed chunks of one request) as p50 / p99 over all requests.
- one at a time: the same requests, each sent after the previous one finished; tokens/s = their tokens
  over the sum of their times (from the request to its last chunk).
- Generator: after each one-at-a-time request, the same prompt through `Generator.generate` called in
  this process (the server idle), so that the two are timed seconds apart: tokens/s, prefill included,
  against the one-at-a-time client's (HTTP and streaming included). A shared VM's speed drifts by 10-20%
  within minutes; pairing each request with its Generator call keeps that drift out of the ratio.
- llama.cpp (when `llama-cpp-python` with its server extra is installed; `--no-llama-cpp` skips it): the
  same weights exported with `forge export --format gguf` (f32, or f16 for a 16-bit --dtype), served by
  `python -m llama_cpp.server` on another free port with the same threads, and the same concurrent and
  one-at-a-time phases through the same client. llama-cpp-python's server runs one request at a time
  (no continuous batching), so its concurrent phase queues (its default, a new request interrupting the
  running one, is turned off).
Every phase must return all of its tokens (clients x --new; random weights rarely emit an EOS): a phase
that returns fewer is reported as such and the script exits 1, because its tokens/s would mean nothing.
Each phase runs --repeats times, interleaved; medians are reported. Without --model the model is the
quickstart's architecture (Llama, d_model 256, 4 layers, 5.0M parameters) with random weights and a
byte-level BPE of 8,192 tokens trained on the shipped Shakespeare corpus in a few seconds: the speed of
a trained model of that shape is the same. This is a benchmark script, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch

CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpora" / "shakespeare.jsonl.zst"


def build_model(out: Path, max_seq_len: int) -> Path:
    """The quickstart's model shape with random weights and a BPE trained on Shakespeare, as an HF folder."""
    from forge_lm.data.config import SourceConfig
    from forge_lm.data.sources import iter_documents
    from forge_lm.data.tokenizer import train_bpe
    from forge_lm.trainer.hub import to_hf
    from forge_lm.trainer.model import Decoder
    from forge_lm.trainer.model.families import preset

    texts = [d.text for d in iter_documents(SourceConfig(name="shakespeare", paths=[str(CORPUS)]))]
    tokenizer = train_bpe(texts, vocab_size=8192, out_dir=str(out / "tokenizer"), show_progress=False)
    cfg = preset(
        "llama3_tiny", vocab_size=tokenizer.vocab_size, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2,
        max_seq_len=max_seq_len, tie_embeddings=True,
    )  # fmt: skip
    return Path(to_hf(Decoder.build(cfg, seed=0).eval(), out / "hf", tokenizer=tokenizer))


def prompts(tokenizer: Any, n: int, length: int) -> list[str]:
    """n different Shakespeare passages of `length` tokens each (as text)."""
    from forge_lm.data.config import SourceConfig
    from forge_lm.data.sources import iter_documents

    out = []
    docs = iter_documents(SourceConfig(name="shakespeare", paths=[str(CORPUS)]))
    for doc in itertools.islice(docs, 0, None, 7):
        ids = tokenizer.encode(doc.text)
        if len(ids) >= length:
            out.append(tokenizer.decode(ids[:length]))
        if len(out) == n:
            return out
    raise RuntimeError("not enough passages in the corpus")


def start_server(folder: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str, Optional[int]]:
    """`forge serve` on a free port: the process, its URL, and the CPU threads its model runs on."""
    command = [
        sys.executable, "-m", "forge_lm.trainer.serve", str(folder), "--port", "0", "--model-name", "bench",
        "--max-batch", str(args.max_batch), "--device", args.device, "--dtype", args.dtype,
        "--queue-size", str(max(64, args.clients)), "--log-level", "warning",
    ]  # fmt: skip
    if args.server_threads is not None:
        command += ["--threads", str(args.server_threads)]
    if args.compile is not None:
        command.append("--compile" if args.compile else "--no-compile")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in process.stdout:
        seen.append(line)
        match = re.search(r"listening on (http://\S+) ", line)
        if match:
            threads = re.search(r"on cpu, (\d+) threads", "".join(seen))
            return process, match.group(1), int(threads.group(1)) if threads else None
    raise RuntimeError("forge serve did not start:\n" + "".join(seen))


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_llama_cpp(
    folder: Path, out: Path, args: argparse.Namespace, threads: int
) -> tuple[subprocess.Popen, str]:
    """llama.cpp's own OpenAI-compatible server on the GGUF export of the same weights, on `threads`."""
    import urllib.request

    from forge_lm.tools.export_hf import export_gguf

    gguf = export_gguf(folder, out / "bench.gguf", dtype="f32" if args.dtype == "float32" else "f16")
    port = free_port()
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "bench",
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "1024", "--n_threads", str(threads),
        "--n_threads_batch", str(threads), "--verbose", "false",
        # By default a new request interrupts the one running: queue them instead, as a server should.
        "--interrupt_requests", "false",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("llama_cpp.server did not start:\n" + process.stderr.read()[-2000:])
        try:
            urllib.request.urlopen(f"{url}/v1/models", timeout=2).read()
            return process, url
        except OSError:
            time.sleep(0.5)
    process.terminate()
    raise RuntimeError("llama_cpp.server did not answer within 120 s")


def llama_cpp_server_available() -> bool:
    try:
        __import__("llama_cpp.server.app")
    except ImportError:
        return False
    return True


async def one_request(client: Any, prompt: str, new: int) -> dict[str, Any]:
    start = time.perf_counter()
    stream = await client.completions.create(
        model="bench", prompt=prompt, max_tokens=new, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    arrivals, tokens = [], 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            arrivals.append(time.perf_counter())
        if getattr(chunk, "usage", None) is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return {
        # A server that sends no usage chunk (llama-cpp-python's) streams one token per chunk.
        "tokens": tokens or len(arrivals),
        "seconds": end - start,
        "ttft": arrivals[0] - start if arrivals else float("nan"),
        "gaps": [b - a for a, b in zip(arrivals, arrivals[1:])],
    }


async def run_phase(
    url: str, texts: list[str], new: int, concurrent: bool, after_each: Optional[Callable[[int], None]] = None
) -> dict[str, Any]:
    """All `texts` at once, or one after another (then `after_each(i)` runs after request i, untimed: the
    Generator on the same prompt, so that the two are measured seconds apart, not a phase apart)."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    async with client:
        start = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(one_request(client, t, new) for t in texts))
            wall = time.perf_counter() - start
        else:
            results = []
            for i, text in enumerate(texts):
                results.append(await one_request(client, text, new))
                if after_each is not None:
                    after_each(i)
            wall = sum(r["seconds"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    gaps = [g for r in results for g in r["gaps"]]
    ttfts = [r["ttft"] for r in results]
    return {
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_ms": 1e3 * percentile(ttfts, 50),
        "ttft_p99_ms": 1e3 * percentile(ttfts, 99),
        "itl_p50_ms": 1e3 * percentile(gaps, 50),
        "itl_p99_ms": 1e3 * percentile(gaps, 99),
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class DirectGenerator:
    """The Generator called directly, one prompt at a time, on this process's main thread (the one that
    loaded the model, as `forge serve` decodes on its own): generated tokens over the seconds it took."""

    def __init__(self, model: Any, prompts_ids: list[list[int]], new: int) -> None:
        from forge_lm.trainer.inference import Generator

        self.generator, self.prompts_ids, self.new = Generator(model, max_batch_size=1), prompts_ids, new
        self.tokens, self.seconds = 0, 0.0

    def __call__(self, i: int) -> None:
        start = time.perf_counter()
        [completion] = self.generator.generate([self.prompts_ids[i]], self.new)
        self.seconds += time.perf_counter() - start
        self.tokens += len(completion.token_ids)

    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default=None, help="a run, checkpoint or HF folder (default: random, see above)"
    )
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per request (default 32)")
    p.add_argument("--new", type=int, default=128, help="new tokens per request (default 128)")
    p.add_argument("--max-batch", type=int, default=None, help="server slots (default: --clients)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument(
        "--server-threads",
        type=int,
        default=None,
        help="the server's --threads (default: forge serve's own default)",
    )
    p.add_argument(
        "--llama-cpp", action=argparse.BooleanOptionalAction, default=True,
        help="also time llama.cpp's server on the GGUF export (when llama-cpp-python[server] is installed)",
    )  # fmt: skip
    p.add_argument("--repeats", type=int, default=3, help="runs of each phase; medians reported")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    for module in ("fastapi", "uvicorn", "openai"):
        try:
            __import__(module)
        except ImportError:
            print(f"forge bench serve needs {module}: pip install 'forge-lm[serve]'", file=sys.stderr)
            return 2
    args.max_batch = args.max_batch or args.clients

    from forge_lm.trainer.inference import load_model
    from forge_lm.trainer.metrics import device_name

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else build_model(Path(tmp), max_seq_len=1024)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
        model, tokenizer = load_model(folder, device, dtype)
        texts = prompts(tokenizer, args.clients, args.prompt)
        all_ids = [tokenizer.encode(t) for t in texts]
        params = sum(p.numel() for p in model.parameters())
        print(
            f"{device_name(device)} ({platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}); "
            f"model {'random, quickstart shape' if not args.model else args.model}: {params / 1e6:.1f}M "
            f"parameters, {args.dtype}; {args.clients} clients x ({args.prompt} prompt + {args.new} new tokens), "
            f"{args.max_batch} slots",
            flush=True,
        )
        llama_cpp = args.llama_cpp and llama_cpp_server_available()
        if args.llama_cpp and not llama_cpp:
            print("llama.cpp: skipped (pip install 'llama-cpp-python[server]' to compare)", flush=True)
        process, url, server_threads = start_server(folder, args)
        processes = [process]
        threads = server_threads or torch.get_num_threads()
        print(
            f"threads: forge serve's model {server_threads or 'its default'}, the Generator called directly "
            f"{torch.get_num_threads()}" + (f", llama.cpp's server {threads}" if llama_cpp else ""),
            flush=True,
        )
        try:
            if llama_cpp:
                ref_process, ref_url = start_llama_cpp(folder, Path(tmp), args, threads)
                processes.append(ref_process)
                asyncio.run(run_phase(ref_url, texts[:2], 8, concurrent=False))  # warm-up, not timed
            warm = DirectGenerator(model, all_ids, 8)
            asyncio.run(run_phase(url, texts[:2], 8, concurrent=False, after_each=warm))  # warm-up, not timed
            concurrent, sequential, direct, ref_concurrent, ref_sequential = [], [], [], [], []
            for _ in range(args.repeats):
                concurrent.append(asyncio.run(run_phase(url, texts, args.new, concurrent=True)))
                generator = DirectGenerator(model, all_ids, args.new)
                sequential.append(
                    asyncio.run(run_phase(url, texts, args.new, concurrent=False, after_each=generator))
                )
                direct.append({"tokens_per_s": generator.tokens_per_s()})
                if llama_cpp:
                    ref_concurrent.append(asyncio.run(run_phase(ref_url, texts, args.new, concurrent=True)))
                    ref_sequential.append(asyncio.run(run_phase(ref_url, texts, args.new, concurrent=False)))
        finally:
            for proc in processes:
                proc.terminate()
                proc.wait(30)
    c, s, g = median_of(concurrent), median_of(sequential), median_of(direct)
    result = {
        "clients": args.clients, "prompt": args.prompt, "new": args.new, "slots": args.max_batch,
        "concurrent": c, "one_at_a_time": s, "generator_tokens_per_s": g["tokens_per_s"],
        "concurrency_speedup": c["tokens_per_s"] / s["tokens_per_s"],
        "one_client_vs_generator": s["tokens_per_s"] / g["tokens_per_s"],
        "one_client_vs_generator_each_run": [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(sequential, direct)],
    }  # fmt: skip
    print("| run | tokens/s | TTFT p50 / p99 ms | ITL p50 / p99 ms |")
    print("|---|---|---|---|")
    rows = [(f"{args.clients} concurrent clients", c), ("one at a time", s)]
    if ref_concurrent:
        result["llama_cpp"] = {
            "concurrent": median_of(ref_concurrent),
            "one_at_a_time": median_of(ref_sequential),
        }
        rows += [(f"llama.cpp server, {args.clients} concurrent clients", result["llama_cpp"]["concurrent"]),
                 ("llama.cpp server, one at a time", result["llama_cpp"]["one_at_a_time"])]  # fmt: skip
    for name, r in rows:
        print(
            f"| {name} | {r['tokens_per_s']:,.0f} | {r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | "
            f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} |"
        )
    print(f"| the Generator called directly, one prompt at a time | {g['tokens_per_s']:,.0f} | | |")
    print(
        f"concurrent / one at a time: {result['concurrency_speedup']:.2f}x; one client through the server / "
        f"the Generator directly: {result['one_client_vs_generator']:.2f}x (medians of {args.repeats}; each run: "
        f"{', '.join(f'{r:.2f}' for r in result['one_client_vs_generator_each_run'])})"
    )
    if ref_concurrent:
        ref = result["llama_cpp"]
        print(
            f"forge serve / llama.cpp server: {c['tokens_per_s'] / ref['concurrent']['tokens_per_s']:.2f}x with "
            f"{args.clients} concurrent clients, {s['tokens_per_s'] / ref['one_at_a_time']['tokens_per_s']:.2f}x "
            "one at a time"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    expected = args.clients * args.new
    phases = {"forge serve, concurrent": concurrent, "forge serve, one at a time": sequential,
              "llama.cpp, concurrent": ref_concurrent, "llama.cpp, one at a time": ref_sequential}  # fmt: skip
    short = {name: min(r["tokens"] for r in runs) for name, runs in phases.items() if runs}
    short = {name: n for name, n in short.items() if n < expected}
    for name, n in short.items():
        print(f"{name}: a run returned {n} of its {expected} tokens: its tokens/s are not comparable")
    return 1 if short else 0


if __name__ == "__main__":
    sys.exit(main())
