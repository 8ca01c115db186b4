"""`forge prepare` takes the trainer's Hydra overrides and writes verified shards."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def test_prepare_cli_writes_both_splits_and_reuses_them(tmp_path):
    cmd = [sys.executable, "-m", "forge_lm.data.prepare", "data=tiny", f"output_root={tmp_path}", "data.seq_len=64"]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    prepared = tmp_path / "prepared" / "tiny_bpe1024_seq64"
    for split in ("train", "val"):
        manifest = json.loads((prepared / split / "manifest.json").read_text())
        assert manifest["seq_len"] == 64 and manifest["num_sequences"] > 0
        assert f"{split}: " in first.stdout
    from forge_lm.data.shards import ShardDataset

    ShardDataset(prepared / "train").verify()

    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and "reusing prepared data" in second.stdout + second.stderr


def test_prepare_cli_reports_a_missing_corpus_cleanly(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "forge_lm.data.prepare",
        "data=tiny",
        f"output_root={tmp_path}",
        f"data.sources=[{{name: missing, paths: ['{tmp_path}/nope/*.jsonl']}}]",
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "error:" in out.stderr and "nope/*.jsonl" in out.stderr and "Traceback" not in out.stderr
