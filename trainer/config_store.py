"""Registers the typed schema with Hydra and turns a composed config into validated dataclasses."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.config import ConfigError as DataConfigError
from data.config import register_resolvers
from trainer.config import Config, ConfigError, ParallelConfig
from trainer.model.config import ModelConfig


def schema() -> DictConfig:
    """The typed node every composition starts from.

    Built from the dataclasses, but with the *declared* defaults of the configs that derive fields:
    ModelConfig fills n_kv_heads and ffn_dim when null, ParallelConfig fills dp_shard=-1 from the world
    size; that must happen on the final values (after YAML and overrides), not be frozen into the schema.
    """
    node = OmegaConf.structured(Config)
    for key, cls in (("model", ModelConfig), ("parallel", ParallelConfig)):
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                node[key][f.name] = f.default
    return node


def register() -> None:
    register_resolvers()
    ConfigStore.instance().store(name="base_config", node=schema())


def to_config(cfg: DictConfig) -> Config:
    """Validate a composed config: every dataclass's __post_init__ runs on the final values.

    Raises ConfigError with the field, the value and the fix.
    """
    unknown = list(_unknown_keys(cfg, Config, ""))
    if unknown:
        raise ConfigError(
            f"unknown config field(s): {', '.join(unknown)}. Check the spelling against `python -m trainer.train "
            "--cfg job`, which lists every field."
        )
    try:
        obj = OmegaConf.to_object(cfg)
    except (ConfigError, DataConfigError):
        raise
    except OmegaConfBaseException as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, (ConfigError, DataConfigError)):
            raise ConfigError(str(cause)) from cause
        raise ConfigError(_short(e)) from e
    assert isinstance(obj, Config)
    return obj


def _unknown_keys(node: Any, cls: type, prefix: str) -> Iterator[str]:
    """Keys of `node` that are not fields of the dataclass `cls` (added with Hydra's `+key=value`)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in node.keys():
        if key not in names:
            yield f"{prefix}{key}"
            continue
        hint, value = hints[key], node[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, DictConfig):
            yield from _unknown_keys(value, hint, f"{prefix}{key}.")
        elif typing.get_origin(hint) is list and isinstance(value, ListConfig):
            (item_type,) = typing.get_args(hint)
            if dataclasses.is_dataclass(item_type):
                for i, item in enumerate(value):
                    yield from _unknown_keys(item, item_type, f"{prefix}{key}[{i}].")


def _short(e: Exception) -> str:
    # OmegaConf appends a block of "full_key: ... object_type=..." lines; the first line says it all.
    return str(e).strip().splitlines()[0]
