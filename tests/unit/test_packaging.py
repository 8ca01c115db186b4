"""One import root, configs from the package, a user's config folder, and the `forge` command's table."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from forge_lm import cli
from forge_lm.trainer.config import ConfigError
from forge_lm.trainer.config_store import compose, config_dir_as_override
from tests.conftest import REPO

MAPPED = ("trainer", "data", "launch", "tools", "configs")
PYTHON_DIRS = ("forge_lm", "trainer", "data", "launch", "tools", "tests")


def _python_files():
    for folder in PYTHON_DIRS:
        yield from sorted((REPO / folder).rglob("*.py"))


def test_every_import_goes_through_forge_lm():
    """`import trainer...` would load a second copy of a module from the checkout (and fail in a wheel)."""
    bare = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            bare += [f"{path.relative_to(REPO)}:{node.lineno}: {n}" for n in names if n.split(".")[0] in MAPPED]
    assert not bare, "import these through forge_lm.<package>:\n" + "\n".join(bare)


def test_every_python_folder_is_a_package():
    """setup.py finds packages by their __init__.py: a folder without one would be left out of the wheel."""
    folders = {p.parent for d in MAPPED for p in (REPO / d).rglob("*.py")}
    missing = sorted(str(f.relative_to(REPO)) for f in folders if not (f / "__init__.py").is_file())
    assert not missing, f"add an __init__.py to: {missing}"


def test_configs_are_found_through_the_package():
    """No entry point reaches the config tree through a path relative to the source files."""
    offenders = [
        f"{path.relative_to(REPO)}:{i}: {line.strip()}"
        for path in _python_files()
        if path.resolve() != Path(__file__).resolve()
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if ("config_path=" in line and "pkg://forge_lm.configs" not in line) or "initialize_config_dir" in line
    ]
    assert not offenders, "\n".join(offenders)


def test_a_user_config_folder_composes_with_the_shipped_groups(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "launch").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: qwen3_tiny\nname: mine\ntrainer: {max_steps: 7}\n"
    )
    cfg = compose(["--config-dir", str(tmp_path), "experiment=mine"])
    assert (cfg.name, cfg.trainer.max_steps, cfg.model.family, cfg.model.qk_norm) == ("mine", 7, "qwen3", "head")
    assert compose([f"--config-dir={tmp_path}", "experiment=quickstart"]).name == "quickstart"  # ours stay

    # The launch tools compose their `launch` group from the same search path.
    (tmp_path / "launch" / "mycluster.yaml").write_text(
        "defaults: [default]\nnodes: 2\ngpus_per_node: 4\npartition: big\n"
    )
    from forge_lm.launch.config import compose as compose_launch

    train_cfg, launch = compose_launch(["-cd", str(tmp_path), "experiment=mine", "launch=mycluster"])
    assert (launch.nodes, launch.gpus_per_node, launch.partition) == (2, 4, "big")
    assert train_cfg.parallel.world_size == 8 and train_cfg.name == "mine"


def test_a_missing_config_folder_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"--config-dir nowhere: no such folder"):
        config_dir_as_override(["--config-dir", "nowhere", "experiment=mine"])
    with pytest.raises(ConfigError, match="needs a folder"):
        config_dir_as_override(["experiment=mine", "-cd"])
    assert config_dir_as_override(["-cd", str(tmp_path), "a=1"]) == [f"hydra.searchpath=[file://{tmp_path}]", "a=1"]


def test_forge_lists_every_entry_point_and_refuses_unknown_ones(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in [*cli.COMMANDS, *(f"bench {b}" for b in cli.BENCHMARKS)]:
        assert f"  {name} " in out
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err
    assert cli.main(["bench", "nothing"]) == 2
    assert "choose one of train, data, inference, kernels" in capsys.readouterr().err


def test_every_command_target_exists():
    """Each subcommand's module imports and has its entry function (those whose extra is installed here)."""
    import importlib

    for name, command in [*cli.COMMANDS.items(), *cli.BENCHMARKS.items()]:
        if cli.missing_extra(name, command):
            continue
        module, function = command.target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name


def test_forge_subcommands_pass_their_arguments_on(tmp_path):
    """Through the real console script: Hydra overrides reach `forge train`, argparse flags `forge arch-show`."""
    forge = Path(sys.executable).with_name("forge")
    job = subprocess.run(
        [str(forge), "train", "experiment=quickstart", "trainer.max_steps=3", "--cfg", "job"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert job.returncode == 0, job.stderr
    assert "max_steps: 3" in job.stdout and "name: quickstart" in job.stdout
    show = subprocess.run(
        [str(forge), "arch-show", "qwen3", "--size", "125m"], cwd=tmp_path, capture_output=True, text=True,
        timeout=120,
    )
    assert show.returncode == 0, show.stderr
    assert "qwen3" in show.stdout
