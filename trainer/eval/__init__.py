"""Evaluation: validation loss / perplexity / bits per byte (overall and per data source), benchmark tasks
scored by lm-evaluation-harness's rules, samples for fixed prompts; in the training loop, stand-alone
(`forge eval`), and inside lm_eval (`forge_lm.trainer.eval.harness`, model "forge"). See docs/eval.md.

    tasks.py        a task's documents, its requests and its metrics (multiple choice, loglikelihood, rolling)
    formats.py      HellaSwag / ARC / PIQA / LAMBADA / WikiText JSON lines and BIG-bench task.json -> Task
    scoring.py      lm_eval's rules: context/continuation split, truncation, rolling windows; batched
    scorers.py      the model call: Decoder.score (unsharded) or forward on every rank (sharded)
    validation.py   validation sets with their bytes: loss, perplexity, bits per byte
    generation.py   samples for prompts (KV-cache Generator, or lock-step over ranks)
    evaluator.py    one evaluation of all of the above, its metrics records and console lines
    harness.py      the lm_eval model and the `forge lm-eval` command
    lm_eval_tasks.py  lm_eval task YAMLs over local files
    __main__.py     `forge eval eval.checkpoint=...`
"""
