"""The decoder model: its configuration and the module itself."""

from trainer.model.config import ConfigError, ModelConfig
from trainer.model.decoder import Decoder

__all__ = ["ConfigError", "Decoder", "ModelConfig"]
