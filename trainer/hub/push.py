"""Upload an exported Hugging Face folder to the Hub: the only part of trainer.hub that uses the network.

Nothing is pushed unless asked: `push_to_hub(folder, repo_id)` is an explicit call, and `dry_run=True`
checks the folder and returns what would be uploaded without any network access (what the tests use).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from forge_lm.trainer.hub.export import SAFETENSORS_INDEX


def push_to_hub(
    folder: str | os.PathLike[str],
    repo_id: str,
    token: str | None = None,
    private: bool = True,
    dry_run: bool = False,
    commit_message: str = "Upload model exported by forge-lm",
) -> list[str]:
    """Upload `folder` (written by `to_hf`) to the model repo `repo_id` ("user/name"), creating it if needed
    (private unless private=False). Returns the files uploaded (or, with dry_run, that would be).

    token: a Hub token; None uses the login of `hf auth login` or $HF_TOKEN.
    """
    files = files_to_upload(folder)
    if "/" not in repo_id or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id={repo_id!r} must look like 'user-or-org/model-name'.")
    if dry_run:
        return files
    from huggingface_hub import HfApi  # imported here: only pushing needs it

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), allow_patterns=files, commit_message=commit_message
    )
    return files


def files_to_upload(folder: str | os.PathLike[str]) -> list[str]:
    """The files of an export folder, relative and sorted; ValueError if it is not a complete export."""
    root = Path(folder)
    if not (root / "config.json").is_file():
        raise ValueError(f"{root}: no config.json; push a folder written by trainer.hub.to_hf.")
    files = sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if (root / SAFETENSORS_INDEX).is_file():
        shards = set(json.loads((root / SAFETENSORS_INDEX).read_text())["weight_map"].values())
        absent = sorted(s for s in shards if s not in files)
        if absent:
            raise ValueError(f"{root}: {SAFETENSORS_INDEX} lists shards that are missing: {absent}.")
    elif "model.safetensors" not in files:
        raise ValueError(f"{root}: no model.safetensors (or sharded index); nothing to push.")
    return files
