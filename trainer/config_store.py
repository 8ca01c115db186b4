"""Registers the typed schema with Hydra, composes the config tree and turns it into validated dataclasses.

The tree ships inside the package (`forge_lm.configs`, found through importlib.resources, Hydra's
`pkg://`), so it is found the same way from a wheel, an editable install or a checkout. A user's own
config folder joins it with `--config-dir DIR` (every `forge` command that composes configs takes it):
its groups sit beside the shipped ones, so `experiment=mine` from DIR/experiment/mine.yaml can pick
`model=qwen3_tiny` from the package.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from forge_lm.data.config import ConfigError as DataConfigError
from forge_lm.data.config import register_resolvers
from forge_lm.trainer.config import Config, ConfigError, ParallelConfig
from forge_lm.trainer.model.config import ModelConfig


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


CONFIG_MODULE = "forge_lm.configs"
"""The shipped config tree, as a package: `pkg://forge_lm.configs` in Hydra's terms."""

CONFIG_DIR_FLAGS = ("--config-dir", "-cd")
"""Hydra's own flag for an extra config folder; `forge train` and `forge prepare` get it from Hydra itself."""


def config_dir_as_override(args: Sequence[str]) -> list[str]:
    """Replace `--config-dir DIR` (or `--config-dir=DIR`, `-cd DIR`) by the override that puts DIR on
    Hydra's search path, `hydra.searchpath=[file:///abs/DIR]`.

    The override form travels: the launch tools pass it on to the training command they build, and both
    Hydra's compose API and `forge train` accept it.
    """
    out: list[str] = []
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        flag, eq, value = arg.partition("=")
        if flag not in CONFIG_DIR_FLAGS:
            out.append(arg)
            continue
        if not eq:
            if not rest:
                raise ConfigError(f"{flag} needs a folder: {flag} my_configs")
            value = rest.pop(0)
        folder = Path(value).expanduser().resolve()
        if not folder.is_dir():
            raise ConfigError(
                f"{flag} {value}: no such folder ({folder}). Give the folder that holds your config groups, "
                "e.g. my_configs with my_configs/experiment/mine.yaml."
            )
        out.append(f"hydra.searchpath=[file://{folder}]")
    return out


def compose(overrides: Sequence[str], config_name: str = "config") -> DictConfig:
    """The shipped tree composed with `overrides` (which may hold `--config-dir DIR`), not yet validated."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    register()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=config_dir_as_override(overrides))


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
            f"unknown config field(s): {', '.join(unknown)}. Check the spelling against `forge train "
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
