"""Fast inference: a static KV cache, batched prefill + compiled one-token decode steps, sampling, loading.

Usage (a run, a checkpoint or a Hugging Face folder):

from forge_lm.trainer.inference import Generator, SamplingParams, load_model
model, tokenizer = load_model("runs/quickstart")
gen = Generator(model)
[c] = gen.generate([tokenizer.encode("ROMEO:")], 64, SamplingParams(temperature=0.8, top_p=0.95),
                   eos_ids=[tokenizer.eos_id], tokenizer=tokenizer)
"""

from forge_lm.trainer.inference.cache import KVCache
from forge_lm.trainer.inference.engine import Completion, Generator
from forge_lm.trainer.inference.load import check_tokenizer_fits, load_model, tokenizer_location
from forge_lm.trainer.inference.sampling import SamplingParams
from forge_lm.trainer.inference.slots import SlotCache, SlotDecoder

__all__ = [
    "Completion", "Generator", "KVCache", "SamplingParams", "SlotCache", "SlotDecoder", "check_tokenizer_fits",
    "load_model", "tokenizer_location",
]  # fmt: skip
