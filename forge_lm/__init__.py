"""forge-lm: pre-train, evaluate, export and launch decoder LLMs.

One import root for the whole distribution:

    forge_lm.data      the streaming data pipeline (sources, tokenizers, packing, shards, loader)
    forge_lm.trainer   model, parallelism, training loop, checkpoints, evaluation, inference, export
    forge_lm.launch    torchrun and SLURM launch helpers, the layout planner
    forge_lm.tools     thin command-line tools (export, architecture diff, benchmarks)
    forge_lm.configs   the Hydra config tree (`pkg://forge_lm.configs`)

The command line is `forge` (forge_lm.cli): `forge --help` lists the subcommands.
"""

from pathlib import Path

__version__ = "0.1.0"

# In a wheel the subpackages sit inside this folder. In a source checkout they are the repository's
# top-level folders (trainer/, data/, ...), which the editable install maps here; adding the checkout
# to the search path as well makes `python -m forge_lm...` from the checkout use the checkout's code even
# when a regular (non-editable) install is also present, instead of failing to find the subpackages.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "trainer" / "__init__.py").is_file():
    __path__.append(str(_checkout))
del _checkout
