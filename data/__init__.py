"""The streaming data pipeline: raw corpus files -> packed, memory-mapped training batches.

Stages, one module each:

- `data.sources`   files, directories and globs -> a stream of `Document`s (.jsonl, .jsonl.zst, .json.gz, text)
- `data.tokenizer` a HuggingFace tokenizer.json (loaded, or a byte-level BPE trained on the sources)
- `data.packing`   documents + EOS concatenated and cut into rows of seq_len + 1 tokens
- `data.shards`    rows on disk in the "packed-v1" format (token shards + manifest.json), read by memmap
- `data.loader`    deterministic, resumable, data-parallel batches of input_ids / labels / position_ids
- `data.prepare`   runs sources -> tokenizer -> packing -> shards once, for train and val

Nothing heavy is imported here: import the stage you need.
"""
