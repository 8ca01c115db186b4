"""The streaming data pipeline: raw corpora -> packed, sharded, exactly resumable training batches.

Stages, one module each (docs/data.md is the user guide and the shard format):

- `data.sources`   files, directories, globs (.jsonl, .jsonl.zst, .json.gz, .parquet, text) and Hugging Face
                   datasets -> a stream of `Document`s; bad records skipped and counted (`data.report`)
- `data.tokenizer` any tokenizer.json or GPT-2 vocab, or a byte-level BPE trained on the sources; BOS/EOS policy
- `data.chunks`    the document stream cut into work units, each split, tokenized and packed independently
- `data.packing`   framed documents packed into rows of seq_len + 1 tokens (concat, or best-fit decreasing)
- `data.workers`   work units run in worker processes, results in order (output independent of their number)
- `data.shards`    rows on disk in the "packed-v2" format (token shards + manifest.json), read by memmap
- `data.prepare`   sources -> shards, resumable after a kill (`python -m data.prepare`)
- `data.loader`    deterministic, resumable, data-parallel batches (input_ids, labels, position_ids, document_ids)
- `data.mixture`   several datasets mixed in exact proportions
- `data.online`    the same rows produced on the fly from raw sources (`data.mode=online`)
- `data.pipeline`  `build_train_loader` / `build_val_batches`: what the trainer calls

Nothing heavy is imported here: `data.build_train_loader` and `data.build_val_batches` load on first use.
"""

from typing import Any

__all__ = ["build_train_loader", "build_val_batches"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from data import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")
