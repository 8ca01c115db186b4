"""Read a Hugging Face folder (config.json + safetensors) into our Decoder.

Only safetensors are read: a pickled pytorch_model.bin can execute arbitrary code when loaded, so it is
refused with instructions to convert it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from forge_lm.trainer.hub.convert import from_hf_state_dict, hf_config_to_model_config
from forge_lm.trainer.hub.export import SAFETENSORS_INDEX
from forge_lm.trainer.model.decoder import Decoder


def from_hf(
    path: str | os.PathLike[str], dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> Decoder:
    """Load a local Hugging Face model folder as a Decoder with parameters in `dtype` on `device`."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: no such directory (from_hf reads a local Hugging Face model folder)."
        )
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder}: no config.json, so this is not a Hugging Face model folder.")
    cfg = hf_config_to_model_config(json.loads(config_file.read_text()))
    state_dict = from_hf_state_dict(_read_safetensors(folder), cfg)

    # Build without allocating or initialising (meta), then allocate in the target dtype and copy in.
    with torch.device("meta"):
        model = Decoder(cfg)
    model.to(dtype)
    model.to_empty(device=device)
    model.init_buffers()  # re-ties the output to the embedding before loading, and makes RoPE fp32
    model.load_state_dict(state_dict, strict=True)
    return model


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        tensors: dict[str, torch.Tensor] = {}
        for filename in sorted(set(weight_map.values())):
            shard = folder / filename
            if not shard.is_file():
                raise FileNotFoundError(f"{shard}: listed in {index.name} but missing.")
            tensors.update(load_file(str(shard)))
        return tensors
    single = folder / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    if (folder / "pytorch_model.bin").exists() or (folder / "pytorch_model.bin.index.json").exists():
        raise ValueError(
            f"{folder}: only pickled weights (pytorch_model.bin); convert them to safetensors first. from_hf "
            "never unpickles, since that can run arbitrary code. Where you trust the file, run once:\n"
            '  python -c "from transformers import AutoModelForCausalLM as M; '
            f"M.from_pretrained('{folder}').save_pretrained('{folder}')\"  # writes model.safetensors"
        )
    raise FileNotFoundError(
        f"{folder}: no model.safetensors or {SAFETENSORS_INDEX} (found: {sorted(p.name for p in folder.iterdir())})."
    )
