"""Golden losses: a fixed tiny CPU run must reproduce its stored per-step losses within 1e-5.

A change to the model's numerics, the data order, the optimizer or the schedule then shows up here, with
the first step that differs named. When the change is meant, regenerate the goldens on purpose:

    python -m tests.golden.test_golden_losses --update

The run is `forge train --config-dir tests/golden/configs experiment=golden` (one process, one thread).
The goldens record the torch version they were made with; under another torch the comparison is skipped,
since kernels may then legitimately round differently.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from forge_lm.tools.compare_runs import first_difference
from forge_lm.trainer.metrics import read_metrics

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "losses.json"
TOKENIZER = HERE.parent / "assets" / "tokenizers" / "gpt2"


def golden_run(output_root: Path, *overrides: str) -> dict[int, float]:
    """Train the golden configuration in a fresh process; returns {step: loss}."""
    output_root.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "forge_lm", "train", "--config-dir", str(HERE / "configs"), "experiment=golden",
        f"output_root={output_root}", f"data.tokenizer.path={TOKENIZER}", *overrides,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=output_root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {r["step"]: r["loss"] for r in read_metrics(output_root / "golden", "train")}


def test_the_golden_run_reproduces_its_losses_and_a_planted_change_is_caught(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    if golden["torch"] != torch.__version__:
        pytest.skip(f"goldens made with torch {golden['torch']}, this is {torch.__version__}")
    want = {int(k): v for k, v in golden["losses"].items()}
    problem = first_difference(golden_run(tmp_path / "as_is"), want)
    assert problem is None, (
        f"{problem}. If the change is meant: python -m tests.golden.test_golden_losses --update"
    )

    # A change far below what a loss curve would show: the learning rate moved by one part in a thousand.
    # Step 1's loss comes before any update, so the first step that differs is 2.
    planted = first_difference(golden_run(tmp_path / "planted", "trainer.lr=3.003e-3"), want)
    assert planted is not None and planted.startswith("step 2:"), planted


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit(__doc__)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        losses = golden_run(Path(tmp))
    GOLDEN.write_text(json.dumps({"torch": torch.__version__, "losses": losses}, indent=1) + "\n")
    print(f"wrote {len(losses)} golden losses to {GOLDEN}")
