"""forge-lm as a user gets it: a wheel installed into a fresh environment, used from an empty directory.

The scratch environment is a real virtual environment whose site-packages holds the test environment's
packages (linked, so torch is not installed again) except forge-lm itself and lm-evaluation-harness: the
wheel is the only forge_lm it can import, and `forge lm-eval` meets the missing `eval` extra.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from tests.conftest import REPO

# What the wheel is built from: the packaging files and the folders mapped under forge_lm.
SOURCES = ["pyproject.toml", "setup.py", "README.md", "forge_lm", "trainer", "data", "launch", "tools", "configs"]
# Left out of the scratch environment: our own install (editable or not) and the `eval` extra.
NOT_LINKED = ("forge_lm", "__editable__", "lm_eval")

USER_EXPERIMENT = """\
# @package _global_
# A user's own experiment, kept in their project: the shipped quickstart, smaller and shorter.
defaults:
  - override /data: tiny
  - override /model: llama3_tiny
name: mine
model: {d_model: 64, n_layers: 2, n_heads: 4, n_kv_heads: 2, max_seq_len: 128}
trainer:
  max_steps: 4
  global_batch_tokens: 1024
  micro_batch_size: 8
  log_every: 2
  checkpoint_every: 4
  device: cpu
  precision: fp32
  wandb: {mode: disabled}
eval: {every: 0, max_batches: 2, batch_size: 4, task_limit: 8, max_new_tokens: 8}
"""


def _link_site_packages(scratch: Path) -> None:
    """Link every distribution of this environment into the scratch one, except those in NOT_LINKED."""
    [target] = (scratch / "lib").glob("python*/site-packages")
    paths = sysconfig.get_paths()
    for site in dict.fromkeys([paths["purelib"], paths["platlib"]]):
        for entry in Path(site).iterdir():
            if entry.name.startswith(NOT_LINKED) or entry.name == "__pycache__" or (target / entry.name).exists():
                continue
            (target / entry.name).symlink_to(entry)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """A wheel built from a copy of the sources, installed into a scratch virtual environment."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(REPO / name, src / name)
    dist = root / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    [wheel] = dist.glob("forge_lm-*.whl")

    scratch = root / "venv"
    venv.create(scratch, with_pip=False, symlinks=True)
    _link_site_packages(scratch)
    python = scratch / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{scratch / 'bin'}{os.pathsep}{env['PATH']}", WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    work = root / "project"  # the user's empty directory: no source tree anywhere near it
    work.mkdir()
    return {"python": python, "scratch": scratch, "work": work, "env": env, "wheel": wheel}


def forge(installed: dict, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(installed["scratch"] / "bin" / "forge"), *args],
        cwd=installed["work"], env=installed["env"], capture_output=True, text=True, timeout=timeout,
    )


def test_only_forge_lm_is_installed_at_the_top_level(installed):
    """The wheel's RECORD and the installed metadata name one import root: forge_lm."""
    script = (
        "import importlib.metadata as md, json, forge_lm\n"
        "dist = md.distribution('forge-lm')\n"
        "tops = sorted({str(f).split('/')[0] for f in dist.files if not str(f).startswith('..')})\n"
        "roots = sorted(k for k, v in md.packages_distributions().items() if 'forge-lm' in v)\n"
        "print(json.dumps({'tops': tops, 'roots': roots, 'file': forge_lm.__file__}))\n"
    )
    out = subprocess.run(
        [str(installed["python"]), "-c", script], cwd=installed["work"], env=installed["env"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    import json

    found = json.loads(out.stdout)
    assert found["roots"] == ["forge_lm"]
    assert found["tops"] == ["forge_lm", "forge_lm-0.1.0.dist-info"]
    assert Path(found["file"]).is_relative_to(installed["scratch"]), found["file"]  # the wheel, not the checkout
    record = (installed["scratch"] / "lib").glob("python*/site-packages/forge_lm-*.dist-info/RECORD")
    paths = [line.split(",")[0] for line in next(record).read_text().splitlines()]
    assert "forge_lm/configs/config.yaml" in paths and "forge_lm/configs/model/qwen3_tiny.yaml" in paths
    assert "forge_lm/data/corpora/shakespeare.jsonl.zst" in paths
    assert "forge_lm/data/evalsets/bigbench/code_line_description/task.json" in paths


def test_forge_train_from_an_empty_directory_with_a_user_config_dir(installed):
    """`forge train --config-dir my_configs experiment=mine`: the user's experiment over the shipped model
    and data presets trains, checkpoints and exports into ./runs; eval, plan and arch-diff work beside it."""
    work = installed["work"]
    (work / "my_configs" / "experiment").mkdir(parents=True)
    (work / "my_configs" / "experiment" / "mine.yaml").write_text(USER_EXPERIMENT)

    run = forge(installed, "train", "--config-dir", "my_configs", "experiment=mine")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    run_dir = work / "runs" / "mine"
    assert (run_dir / "checkpoints" / "step_0000004").is_dir()
    assert (run_dir / "hf" / "model.safetensors").is_file() and (run_dir / "hf" / "config.json").is_file()
    assert "llama" in (run_dir / "config.yaml").read_text()  # model=llama3_tiny came from the package

    ev = forge(installed, "eval", "--config-dir", "my_configs", "experiment=mine", "eval.checkpoint=runs/mine")
    assert ev.returncode == 0, ev.stdout[-3000:] + ev.stderr[-3000:]
    assert "code_line_description" in ev.stdout  # the shipped default task, found from the wheel

    plan = forge(installed, "plan", "model=llama3_8b", "launch.nodes=1", "launch.gpus_per_node=8",
                 "data.seq_len=4096", "model.max_seq_len=4096", "trainer.global_batch_tokens=1048576",
                 "trainer.micro_batch_size=1")
    assert plan.returncode in (0, 1), plan.stdout + plan.stderr  # 1: a plan that does not fit, said clearly
    assert "memory" in plan.stdout.lower()

    diff = forge(installed, "arch-diff", "qwen3", "gemma3")
    assert diff.returncode == 0, diff.stderr
    assert "qk_norm" in diff.stdout

    module = subprocess.run(
        [str(installed["python"]), "-m", "forge_lm", "--help"], cwd=work, env=installed["env"],
        capture_output=True, text=True, timeout=60,
    )
    assert module.returncode == 0 and "arch-diff" in module.stdout


def test_a_missing_extra_is_named_in_one_line(installed):
    out = forge(installed, "lm-eval", "--model", "forge", "--tasks", "x")
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "forge lm-eval needs lm-evaluation-harness, which is not installed: pip install 'forge-lm[eval]'"
    )
    assert out.stdout == ""
