"""Inference throughput: prefill and decode tokens/s of the KV-cache Generator, side by side with
`transformers.generate` on the same model (same weights) and the same prompts, in one run.

    forge bench inference                                   # CPU defaults: tiny model, batch 1 and 8
    forge bench inference --preset 1b --device cuda --dtype bf16 --prompt 512 --new 256

Both implementations run greedy decoding, interleaved (ours, theirs, ours, theirs, ...) so machine noise
hits both alike; the median of --repeats runs is reported. Prefill time is a 1-new-token generation;
decode time is the rest of a --new token generation. The generated tokens are compared too (fp32: they
must be identical). KV-cache memory: the bytes our static cache holds vs transformers' cache at the end.
On a GPU, batch-1 decode is bandwidth-bound: the fraction of HBM bandwidth reached is the bytes one step
must read (weights + the cache read so far) over the step time, against the device's peak.
Ours compiles the decode step (--no-compile to time it eager); compile time is reported, not timed.
This is a benchmark script, not a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from forge_lm.trainer.hub import to_hf
from forge_lm.trainer.inference import Generator
from forge_lm.trainer.metrics import device_name
from forge_lm.trainer.model import Decoder
from forge_lm.trainer.model.families import preset

# Peak HBM bandwidth, bytes/s (vendor datasheets).
PEAK_HBM_BYTES = {
    "B200": 8.0e12,
    "H200": 4.8e12,
    "H100 SXM": 3.35e12,
    "H100 NVL": 3.9e12,
    "H100 PCIe": 2.0e12,
    "A100-SXM4-80GB": 2.04e12,
    "A100": 1.56e12,
    "L40S": 0.864e12,
}

SIZES = {  # overrides of the llama3 presets that fit the machine at hand
    "tiny": dict(d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=8192, tie_embeddings=True),
    "125m": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, vocab_size=32000),
    "1b": dict(d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, vocab_size=128256),
}


def peak_hbm(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_HBM_BYTES, key=len, reverse=True):
        if all(part in name for part in key.split()):
            return PEAK_HBM_BYTES[key]
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=SIZES, default="tiny")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens per row")
    p.add_argument("--new", type=int, default=128, help="new tokens per row")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--no-compile", action="store_true", help="run our decode step eagerly")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    max_len = args.prompt + args.new
    cfg = preset("llama3_tiny", max_seq_len=max(max_len, 256), **SIZES[args.preset])
    ours = Decoder.build(cfg, device="cpu", seed=0).eval()
    with tempfile.TemporaryDirectory() as folder:
        # The same weights in transformers, through the export every user would use.
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(to_hf(ours, folder), local_files_only=True, dtype=dtype)
    hf = hf.to(device).eval()
    ours = ours.to(device=device, dtype=dtype)
    generator = Generator(ours, max_batch_size=max(args.batch), compile=not args.no_compile)

    print(
        f"{device_name(device)} ({platform.machine()}, {torch.get_num_threads()} threads), torch "
        f"{torch.__version__}; llama3 {args.preset}: {ours.num_params() / 1e6:.1f}M params, {args.dtype}; "
        f"prompt {args.prompt} + {args.new} new tokens, greedy, median of {args.repeats}"
    )
    results = []
    for batch_size in args.batch:
        g = torch.Generator().manual_seed(batch_size)
        prompts = torch.randint(0, cfg.vocab_size, (batch_size, args.prompt), generator=g).to(device)
        rows = prompts.tolist()

        def ours_run(n: int, rows=rows) -> list[list[int]]:
            return [c.token_ids for c in generator.generate(rows, n)]

        def hf_run(n: int, prompts=prompts) -> torch.Tensor:
            with torch.no_grad():
                return hf.generate(
                    prompts,
                    attention_mask=torch.ones_like(prompts),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    return_dict_in_generate=True,
                )

        compile_s, _ = timed(lambda: ours_run(args.new), device)  # warm-up: compiles the decode step
        hf_run(2)
        times: dict[str, list[float]] = {k: [] for k in ("ours_1", "ours_n", "hf_1", "hf_n")}
        for _ in range(args.repeats):
            for key, fn in (("ours", ours_run), ("hf", hf_run)):
                times[f"{key}_1"].append(timed(lambda fn=fn: fn(1), device)[0])
                elapsed, out = timed(lambda fn=fn: fn(args.new), device)
                times[f"{key}_n"].append(elapsed)
                if key == "ours":
                    our_tokens = out
                else:
                    hf_out = out
        med = {k: statistics.median(v) for k, v in times.items()}
        hf_tokens = hf_out.sequences[:, args.prompt :].tolist()
        hf_cache = sum(t.numel() * t.element_size() for t in _cache_tensors(hf_out.past_key_values))
        row = {
            "batch": batch_size,
            "ours_prefill_tok_s": batch_size * args.prompt / med["ours_1"],
            "hf_prefill_tok_s": batch_size * args.prompt / med["hf_1"],
            "ours_decode_tok_s": batch_size * (args.new - 1) / (med["ours_n"] - med["ours_1"]),
            "hf_decode_tok_s": batch_size * (args.new - 1) / (med["hf_n"] - med["hf_1"]),
            "ours_cache_mib": generator.cache_bytes() / 2**20,
            "hf_cache_mib": hf_cache / 2**20,
            "same_tokens": our_tokens == hf_tokens,
            "compile_s": compile_s,
        }
        row["decode_ratio"] = row["ours_decode_tok_s"] / row["hf_decode_tok_s"]
        row["prefill_ratio"] = row["ours_prefill_tok_s"] / row["hf_prefill_tok_s"]
        peak = peak_hbm(device)
        if peak and batch_size == 1:
            step_s = (med["ours_n"] - med["ours_1"]) / (args.new - 1)
            weights = sum(p.numel() * p.element_size() for p in ours.parameters())
            kv_read = generator.cache_bytes() * (args.prompt + args.new / 2) / generator._cache.max_len
            row["hbm_fraction"] = (weights + kv_read) / step_s / peak
        results.append(row)

    print(
        "\n| batch | prefill tok/s ours | transformers | ratio | decode tok/s ours | transformers | ratio "
        "| KV cache MiB ours | transformers | same tokens |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['batch']} | {r['ours_prefill_tok_s']:,.0f} | {r['hf_prefill_tok_s']:,.0f} | "
            f"{r['prefill_ratio']:.2f}x | {r['ours_decode_tok_s']:,.0f} | {r['hf_decode_tok_s']:,.0f} | "
            f"{r['decode_ratio']:.2f}x | {r['ours_cache_mib']:.1f} | {r['hf_cache_mib']:.1f} | "
            f"{'yes' if r['same_tokens'] else 'NO'} |"
        )
    for r in results:
        if "hbm_fraction" in r:
            print(f"batch-1 decode reaches {r['hbm_fraction']:.0%} of peak HBM bandwidth")
    warmups = ", ".join(f"{r['compile_s']:.1f}s" for r in results)
    print(f"first generation per batch size (warm-up incl. compile, not timed): {warmups}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": device_name(device), "results": results}, f, indent=2)


def _cache_tensors(cache: object) -> list[torch.Tensor]:
    """The key/value tensors of a transformers cache object (its layout changed across versions)."""
    tensors = []
    for layer in getattr(cache, "layers", []):
        tensors += [
            t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None
        ]
    if not tensors and hasattr(cache, "key_cache"):
        tensors = [*cache.key_cache, *cache.value_cache]
    return tensors


if __name__ == "__main__":
    main()
