"""The decoder model: its configuration, the module itself, and the family presets."""

from forge_lm.trainer.model.config import ConfigError, ModelConfig, MoEConfig, RopeScalingConfig
from forge_lm.trainer.model.decoder import Decoder

__all__ = ["ConfigError", "Decoder", "ModelConfig", "MoEConfig", "RopeScalingConfig"]
