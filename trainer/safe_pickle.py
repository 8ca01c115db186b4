"""Reading the pickled parts of a checkpoint without ever running code from them.

A pickle names functions to call while it is read, so an ordinary `pickle.load` of a file someone
handed you runs whatever that file asks for. Three places of a checkpoint are pickles:

    .metadata              DCP's index of the checkpoint (plain pickle; DCP reads it with pickle.load)
    non-tensor items       inside *.distcp files, e.g. the optimizer's param groups (DCP's default planner
                           reads them with torch.load(weights_only=False))
    DeepSpeed's *.pt       read by DeepSpeed with torch.load(weights_only=False)

Here each is read through an allow-list instead: `.metadata` by `MetadataUnpickler`, which admits only
DCP's metadata dataclasses and the few torch and standard-library types they hold; the other two through
torch's weights-only unpickler (tensors, containers and plain values, plus the named DeepSpeed types a
DeepSpeed checkpoint holds). Anything else is refused with `UnsafeCheckpointError` before it can run.

`SafeFileSystemReader` and `SafeLoadPlanner` plug the first two into `torch.distributed.checkpoint.load`.
"""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo
from torch.distributed.checkpoint.planner import ReadItem


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file asks to run or import something no checkpoint needs; nothing of it was run."""


def _metadata_types() -> dict[tuple[str, str], Any]:
    """(module, name) -> object for everything a DCP `.metadata` pickle may name."""
    allowed: dict[tuple[str, str], Any] = {}
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "ChunkStorageMetadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "TensorProperties",
        "_MEM_FORMAT_ENCODING",
    ):
        obj = getattr(dcp_metadata, name, None)
        if obj is not None:
            allowed[("torch.distributed.checkpoint.metadata", name)] = obj
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = _StorageInfo
    allowed[("torch", "Size")] = torch.Size
    # torch.layout pickles as a call of this lookup with the layout's name ("torch.strided").
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    # StorageMeta.checkpoint_id is the path the checkpoint was saved to.
    for cls in (pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath):
        allowed[("pathlib", cls.__name__)] = cls
    for name in ("OrderedDict", "defaultdict"):
        allowed[("collections", name)] = getattr(__import__("collections"), name)
    return allowed


_METADATA_TYPES = _metadata_types()


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP `.metadata` file, admitting only the types DCP's metadata is made of.

    Anything else (os.system, builtins.eval, subprocess.Popen, an arbitrary class) raises
    `UnsafeCheckpointError` at the moment the pickle names it, before anything could be called.
    """

    def __init__(self, file: Any, source: str | os.PathLike = "<.metadata>") -> None:
        super().__init__(file)
        self.source = str(source)

    def find_class(self, module: str, name: str) -> Any:
        found = _METADATA_TYPES.get((module, name))
        if found is not None:
            return found
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)  # dtypes (torch.float32, ...) pickle as module attributes
        raise UnsafeCheckpointError(
            f"refused to read {self.source}: it asks to load {module}.{name}, which checkpoint metadata never "
            "holds, so the file was tampered with or is not a checkpoint's. Nothing from it was run; do not "
            "load this checkpoint (an earlier one, or one from a source you trust)."
        )


def load_metadata(path: str | os.PathLike) -> dcp_metadata.Metadata:
    """A DCP `.metadata` file, read through `MetadataUnpickler`."""
    with open(path, "rb") as f:
        try:
            metadata = MetadataUnpickler(f, path).load()
        except UnsafeCheckpointError:
            raise
        except Exception as e:  # truncated or garbled pickle
            raise pickle.UnpicklingError(f"{path} is not readable checkpoint metadata: {e}") from e
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise UnsafeCheckpointError(
            f"refused to read {path}: it holds a {type(metadata).__name__}, not checkpoint metadata."
        )
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's file-system reader with `.metadata` read through `MetadataUnpickler` instead of pickle.load."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        metadata = load_metadata(self._get_metadata_path(kwargs.get("rank")))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def weights_only_load(data: Any, source: str, safe_globals: tuple[Any, ...] = ()) -> Any:
    """torch.load with weights_only=True (plus `safe_globals`), turning a refusal into UnsafeCheckpointError."""
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(data, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e) or "weights_only" in str(e).lower():
            raise UnsafeCheckpointError(
                f"refused to read {source}: it asks to load {_short(str(e))}, which no checkpoint holds, so the "
                "file was tampered with or is not a checkpoint's. Nothing from it was run; do not load this "
                "checkpoint (an earlier one, or one from a source you trust)."
            ) from e
        raise


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, but non-tensor items (optimizer param groups and the like) are read with
    torch.load(weights_only=True) rather than DCP's weights_only=False, so a planted payload is refused."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        obj = weights_only_load(value, f"the checkpoint item {fqn!r}")
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def safe_torch_load(safe_globals: tuple[Any, ...] = ()) -> Callable[..., Any]:
    """A stand-in for `torch.load(path, map_location=...)` that reads weights-only, for loaders (DeepSpeed)
    that would otherwise unpickle a user's file with weights_only=False."""

    def load(path: str | os.PathLike, map_location: Any = None, **_: Any) -> Any:
        try:
            with torch.serialization.safe_globals(list(safe_globals)):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(
                f"refused to read {Path(path)}: it asks to load {_short(str(e))}, which no checkpoint holds, so "
                "the file was tampered with or is not a checkpoint's. Nothing from it was run; do not load this "
                "checkpoint (an earlier one, or one from a source you trust)."
            ) from e

    return load


def _short(text: str) -> str:
    """What torch's long weights-only refusal refused (its advice to allow-list the global is not ours)."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return f"{found.group(1)}"
    first = text.strip().splitlines()[0] if text.strip() else text
    return first[:200]
