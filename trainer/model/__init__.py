"""The decoder model: its configuration, the module itself, and the family presets."""

from trainer.model.config import ConfigError, ModelConfig, MoEConfig, RopeScalingConfig
from trainer.model.decoder import Decoder

__all__ = ["ConfigError", "Decoder", "ModelConfig", "MoEConfig", "RopeScalingConfig"]
