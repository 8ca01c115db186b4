"""Hugging Face interop: export our model to an HF folder, load an HF folder as our model."""

from trainer.hub.export import to_hf
from trainer.hub.load import from_hf

__all__ = ["from_hf", "to_hf"]
