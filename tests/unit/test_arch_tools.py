"""tools/arch_diff.py and tools/arch_show.py: what they print, and that the README shows their real output."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

from forge_lm.tools import arch_diff, arch_show
from forge_lm.trainer.model import Decoder
from forge_lm.trainer.model.families import preset

REPO = Path(__file__).resolve().parents[2]


def test_arch_diff_lists_exactly_the_differing_knobs() -> None:
    out = arch_diff.render("qwen3", "gemma3")
    rows = {
        line.split()[0]: line.split()[1:]
        for line in out.splitlines()
        if line and not line.startswith((" ", "("))
    }
    for knob, values in {
        "activation": ["silu", "gelu_tanh"],
        "norm_unit_offset": ["False", "True"],
        "post_norm": ["False", "True"],
        "scale_embeddings": ["False", "True"],
        "sliding_window": ["null", "1024"],
        "full_attention_every": ["0", "6"],
    }.items():
        assert rows[knob] == values, knob
    assert "qk_norm" not in rows and "d_model" not in rows  # equal in both: listed as the same, not as a diff
    assert re.search(r"same in both \(\d+\): .*qk_norm", out.replace("\n", " "))
    assert "FLOPs per token (T=4096)" in out


def test_arch_diff_counts_are_the_models() -> None:
    out = arch_diff.render("qwen3_0.6b", "mixtral_8x7b", seq_len=2048)
    assert re.search(r"^parameters\s+596M\s+46\.7B$", out, re.M)
    assert re.search(r"^active per token\s+596M\s+12\.9B$", out, re.M)


def test_readme_shows_the_real_arch_diff_output() -> None:
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```\n\$ forge arch-diff qwen3 gemma3\n(.*?)```", readme, re.S)
    assert block, "README has no `forge arch-diff qwen3 gemma3` block"
    assert block.group(1).rstrip("\n") == arch_diff.render("qwen3", "gemma3")


def test_arch_show_breaks_down_every_parameter() -> None:
    out = arch_show.render("gemma2_tiny", seq_len=1024)
    cfg = preset("gemma2_tiny", vocab_size=256000)
    with torch.device("meta"):
        model = Decoder(cfg)
    assert f"{model.num_params():,}" in out and f"{model.flops_per_token(1024):,}" in out
    assert "layers.*.post_attention_norm.weight" in out and "x4" in out
    assert "output.weight (tied: the embedding)" in out


def test_tools_run_as_commands_and_report_bad_names() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "forge_lm", "arch-diff", "llama3", "olmo2", "--size", "125m"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert re.search(r"^pre_norm\s+True\s+False$", done.stdout, re.M)
    assert arch_show.main(["qwen4"]) == 2
