"""Hugging Face interop: export our model to an HF folder, load an HF folder as our model, push to the Hub."""

from forge_lm.trainer.hub.export import to_hf
from forge_lm.trainer.hub.load import from_hf
from forge_lm.trainer.hub.push import push_to_hub

__all__ = ["from_hf", "push_to_hub", "to_hf"]
