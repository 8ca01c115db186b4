"""The streaming data pipeline: raw corpora -> packed, sharded, exactly resumable training batches.

Stages, one module each (docs/data.md is the user guide and the shard format):

- `forge_lm.data.sources`   files, directories, globs (.jsonl, .jsonl.zst, .json.gz, .parquet, text) and Hugging Face
                   datasets -> a stream of `Document`s; bad records skipped and counted (`forge_lm.data.report`)
- `data.tokenizer` any tokenizer.json or GPT-2 vocab, or a byte-level BPE trained on the sources; BOS/EOS policy
- `forge_lm.data.chunks`    the document stream cut into work units, each split, tokenized and packed independently
- `data.packing`   framed documents packed into rows of seq_len + 1 tokens (concat, or best-fit decreasing)
- `forge_lm.data.workers`   work units run in worker processes, results in order (output independent of their number)
- `forge_lm.data.shards`    rows on disk in the "packed-v2" format (token shards + manifest.json), read by memmap
- `forge_lm.data.prepare`   sources -> shards, resumable after a kill (`forge prepare`)
- `forge_lm.data.loader`    deterministic, resumable, data-parallel batches (input_ids, labels, position_ids, document_ids)
- `forge_lm.data.mixture`   several datasets mixed in exact proportions
- `forge_lm.data.online`    the same rows produced on the fly from raw sources (`data.mode=online`)
- `forge_lm.data.pipeline`  `build_train_loader` / `build_val_batches`: what the trainer calls

Nothing heavy is imported here: `forge_lm.data.build_train_loader` and `forge_lm.data.build_val_batches` load on first use.
"""

from typing import Any

__all__ = ["build_train_loader", "build_val_batches"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from forge_lm.data import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")
