"""Verify checkpoints offline against the checksums recorded when they were saved.

    forge verify runs/quickstart                              # every checkpoint of a run
    forge verify runs/quickstart/checkpoints/step_0000200     # one checkpoint

Prints one line per checkpoint: OK (every file matches), UNVERIFIED (saved before checksums were
recorded), CORRUPT (naming the file and what is wrong), INCOMPLETE (a save that never finished) or
UNSAFE (its metadata asks to run code; nothing of it is run here either). Exit status 0 when every
complete checkpoint is OK or UNVERIFIED, 1 otherwise, 2 for a path that holds no checkpoint.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from forge_lm.trainer.checkpoint_verify import COMPLETE_MARKER, Verdict, verify
from forge_lm.trainer.safe_pickle import UnsafeCheckpointError, load_metadata

_CHECKPOINT = re.compile(r"^step_\d+(\.tmp)?$")


def checkpoints_in(path: Path) -> list[Path]:
    """The checkpoint directories at `path`: itself, or those in it or in its checkpoints/ folder."""
    if (path / COMPLETE_MARKER).is_file() or (path / "train_state.pt").is_file():
        return [path]
    for folder in (path / "checkpoints", path):
        if folder.is_dir():
            found = sorted(p for p in folder.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name))
            if found:
                return found
    return []


def check(path: Path) -> tuple[str, str]:
    """(status word, detail) for one checkpoint directory."""
    verdict: Verdict = verify(path)
    if verdict.status == "incomplete":
        return "INCOMPLETE", verdict.detail
    if verdict.status == "corrupt":
        return "CORRUPT", verdict.detail
    metadata = path / ".metadata"
    if metadata.is_file():
        try:
            load_metadata(metadata)
        except UnsafeCheckpointError as e:
            return "UNSAFE", str(e)
        except Exception as e:
            return "CORRUPT", f".metadata is unreadable ({e})"
    if verdict.status == "unverified":
        return "UNVERIFIED", "saved without checksums (by an earlier version): loads, but cannot be checked"
    return "OK", "every file matches its recorded checksum"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("path", help="a checkpoint directory, a run directory or its checkpoints/ folder")
    args = parser.parse_args(argv)
    path = Path(args.path)
    found = checkpoints_in(path)
    if not found:
        print(
            f"error: {path}: no checkpoints there (give a run directory or …/checkpoints/step_N)",
            file=sys.stderr,
        )
        return 2
    bad = 0
    for checkpoint in found:
        status, detail = check(checkpoint)
        if checkpoint.name.endswith(".tmp") and status == "INCOMPLETE":
            status, detail = (
                "INCOMPLETE",
                "an unfinished save (never loaded; removed by the next save of that step)",
            )
        elif status in ("CORRUPT", "UNSAFE"):
            bad += 1
        print(f"{status:<10} {checkpoint}  {detail}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
