"""`python -m forge_lm.tools.gpu_check --cpu`: the GPU check's script, end to end at tiny sizes on the CPU,
so the command a GPU session runs first cannot rot between the sessions that have a GPU."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    report = tmp_path / "report.md"
    proc = subprocess.run(
        [sys.executable, "-m", "forge_lm.tools.gpu_check", "--cpu", "--out", str(report)],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    text = report.read_text()
    summary = text.split("\n## ")[0]  # the table; each check's output follows under its own heading
    rows = [line for line in summary.splitlines() if line.startswith("| ") and not line.startswith("| check")]
    assert len(rows) == 7 and all("| pass |" in row for row in rows), "\n".join(rows)
    assert "loss 6." in text and "framework compiled" in text and "same tokens: yes" in text
    assert "parameter and optimizer bytes as planned" in text
    assert (REPO / "tests" / "unit" / "test_gpu_paths.py").name in text  # the GPU tests were collected
