"""Write a model as a Hugging Face folder that `AutoModelForCausalLM.from_pretrained(dir)` loads, for any
supported family (trainer/hub/families.py): the right class in config.json's `architectures`, its config
fields, a generation config and the tokenizer's files.

Layout: config.json, generation_config.json, model.safetensors (or model-0000k-of-0000n.safetensors shards
plus model.safetensors.index.json), and the tokenizer's own files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import save_file

from forge_lm.trainer.hub.convert import model_config_to_hf, to_hf_state_dict
from forge_lm.trainer.model.decoder import Decoder

SAFETENSORS_INDEX = "model.safetensors.index.json"

logger = logging.getLogger(__name__)


class ExportableTokenizer(Protocol):
    """What export needs from a tokenizer: its special ids and a way to write its files into a folder."""

    eos_id: int | None
    bos_id: int | None

    def save(self, directory: str) -> Any: ...


def to_hf(
    model: Decoder,
    out_dir: str | os.PathLike[str],
    tokenizer: ExportableTokenizer | None = None,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = 5 * 2**30,
) -> str:
    """Export `model` (and `tokenizer`) to `out_dir` in Hugging Face format; returns out_dir.

    Everything is written into a hidden temporary folder beside out_dir, which is then renamed into place
    (replacing an earlier export), so an interrupted export never leaves a folder that looks complete.
    The model must hold full (unsharded) tensors.
    """
    out = Path(out_dir)
    cfg = model.cfg
    bos_id = getattr(tokenizer, "bos_id", None) if tokenizer is not None else None
    eos_id = getattr(tokenizer, "eos_id", None) if tokenizer is not None else None
    dtype_name = str(dtype).removeprefix("torch.")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_json(tmp / "config.json", model_config_to_hf(cfg, bos_id, eos_id, dtype_name))
        generation = {"bos_token_id": bos_id, "eos_token_id": eos_id, "max_length": cfg.max_seq_len}
        # A chat tokenizer (trainer/posttrain/chat.py): generation also stops at the end of an assistant turn.
        end_of_turn = getattr(tokenizer, "end_of_turn_id", None)
        if end_of_turn is not None and end_of_turn != eos_id:
            generation["eos_token_id"] = [end_of_turn, eos_id]
        _write_json(tmp / "generation_config.json", generation)
        hf_sd = to_hf_state_dict(_hf_visible(model), tie_embeddings=cfg.tie_embeddings, family=cfg.family)
        tensors = {k: v.detach().to(device="cpu", dtype=dtype).contiguous() for k, v in hf_sd.items()}
        _save_safetensors(tensors, tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save(str(tmp))
            chat_template = getattr(tokenizer, "chat_template", None)
            if chat_template:  # what transformers' apply_chat_template reads
                _add_to_json(tmp / "tokenizer_config.json", {"chat_template": chat_template})
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(out)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _add_to_json(path: Path, fields: dict[str, Any]) -> None:
    obj = json.loads(path.read_text()) if path.is_file() else {}
    _write_json(path, {**obj, **fields})


def _save_safetensors(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int) -> None:
    """One model.safetensors, or shards of at most max_shard_bytes each (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += nbytes

    metadata = {"format": "pt"}  # transformers checks this to know the tensors are in PyTorch layout
    if len(shards) == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata=metadata)
        return
    weight_map: dict[str, str] = {}
    for i, names in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(directory / filename), metadata=metadata)
        weight_map.update(dict.fromkeys(names, filename))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(directory / SAFETENSORS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _replace_dir(new: Path, target: Path) -> None:
    """Move the finished folder `new` to `target`, replacing whatever was there."""
    if not target.exists():
        os.replace(new, target)
        return
    # A folder cannot be atomically replaced by another: move the old one aside first, then delete it.
    # A crash in between leaves target absent (never half-written) and the old export in .<name>.old-*.
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / target.name)
    os.replace(new, target)
    shutil.rmtree(old)


def _hf_visible(model: Decoder) -> dict[str, torch.Tensor]:
    """The state dict without what the Hugging Face classes have no place for: MoE routing biases
    (model.moe.balance=bias), which the exported model then routes without, said in a warning."""
    sd = model.state_dict()
    biases = [k for k in sd if k.endswith(".expert_bias")]
    if any(bool(sd[k].any()) for k in biases):
        logger.warning(
            "the MoE routing biases (model.moe.balance=bias) have no place in the %s Hugging Face format: "
            "the exported model chooses its experts by router probability alone, so its outputs differ "
            "from this model's where a bias changed the choice",
            model.cfg.family,
        )
    return {k: v for k, v in sd.items() if k not in biases}
