"""Every command in README.md and docs/*.md that trains, prepares, plans or launches passes the framework's
own validation, at the world size the document states, exactly as written there.

Nothing is started: no process, no process group, no training. Each command is composed and validated
in this process the way the real command would before it does any work.

Which text is a command (the extraction rule):

- Only fenced code blocks count: a fence of three backticks whose info string is empty, `bash`, `sh`,
  `shell` or `console` (not `python`, `yaml`, `json`, ...). Inline `code` in prose and tables is not read.
- A line ending in a backslash is joined with the next one; the command is named by the document line it
  starts on.
- A comment is dropped from a `#` that starts a word (outside quotes) to the end of the line, as in bash.
  A comment holding the word "refused" says the command is refused (`forge plan ...  # refused: ...`): the
  test then requires that it is (any error or non-zero exit).
- A block holding any line that starts with `$ ` is a transcript: only its `$ ` lines are commands, the
  other lines are their output. When the output's first line starts with `config error: `, the document
  says the command is refused: the test then requires that refusal, with that exact message.
- A line is split into shell words (shlex) and into commands at `&&`, `||`, `;` and `|`; a command is
  covered when it starts with one of COVERED. Every `torchrun` command is covered, and its program must be
  `-m forge_lm.trainer.train`, `-m forge_lm.launch.memcheck` or `--no-python forge train|memcheck`. Other
  commands (`pip`, `forge eval`, `forge export`, `forge lm-eval`, `forge bench`, `python -m tests...`) are
  not checked here.
- Optional parts written in square brackets as their own words (`[--dry-run]`,
  `[launch.account=... launch.qos=...]`) are dropped: the command must be valid without them. A bracket
  inside a word (`'eval.tasks=[a,b]'`) is part of an override and kept.
- Any other placeholder left (a word with `<...>`, or `...` standing for a value) fails the test: write the
  document's example concretely, or add the line to SKIPPED with the reason.

How each covered command is validated (world size = processes the command starts):

- `forge train` / `forge prepare`: one process. The tree is composed with `forge_lm.trainer.config_store`
  (primary config `config`, or `prepare`) and validated with `to_config` under WORLD_SIZE=1, and the
  parallel layout must use exactly one process (what `forge_lm.trainer.parallel.mesh.check_layout` checks
  at start). `--cfg job` is Hydra's print flag; it is accepted and dropped. A Hydra multirun (`-m`, e.g.
  `-m hydra/launcher=submitit_slurm`) is composed with each swept override reduced to its first value; each
  sweep job is one process. `hydra/launcher=...` and `hydra.launcher.*` are checked by the composition.
- `torchrun ... -m forge_lm.trainer.train` and `torchrun ... --no-python forge train`: world size =
  `--nnodes` x `--nproc-per-node`; the training overrides are composed and validated with
  `forge_lm.launch.config.compose(... launch.nodes=M launch.gpus_per_node=N)`, which sets WORLD_SIZE and
  also requires the layout to use exactly M x N processes. `launch.*` overrides are refused there (the
  trainer has no `launch` group).
- `forge memcheck` (alone, or under torchrun as above): validated as it validates itself (`launch.nodes=1`,
  `launch.gpus_per_node=<world size>`); it is not run (it builds the model and trains).
- `forge plan`: `forge_lm.launch.plan.main(args)` must return 0 (the layout fits) unless the document says
  the example is refused; it starts nothing.
- `forge slurm submit`: `forge_lm.launch.slurm.main(["submit", ..., "--dry-run"])` must return 0 (renders
  the batch script only: no sbatch, no cluster needed).
- `forge torchrun`: `forge_lm.launch.torchrun.main([..., "--dry-run"])` must return 0 (prints the command).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
COVERED = (
    ("forge", "train"),
    ("forge", "prepare"),
    ("forge", "plan"),
    ("forge", "slurm", "submit"),
    ("forge", "torchrun"),
    ("forge", "memcheck"),
    ("torchrun",),
)
SEPARATORS = {"&&", "||", ";", "|"}

SKIPPED: dict[tuple[str, str], str] = {}
"""(document, start of the command) -> why the command cannot be checked as written. Keep it empty when you
can: make the example concrete instead."""

TORCHRUN_MODULES = {"forge_lm.trainer.train": "train", "forge_lm.launch.memcheck": "memcheck"}
TORCHRUN_VALUE_OPTIONS = {
    "nproc-per-node",
    "nnodes",
    "node-rank",
    "rdzv-backend",
    "rdzv-endpoint",
    "rdzv-id",
    "rdzv-conf",
    "master-addr",
    "master-port",
    "max-restarts",
    "monitor-interval",
    "start-method",
    "role",
    "log-dir",
    "redirects",
    "tee",
    "local-ranks-filter",
    "local-addr",
}
TORCHRUN_FLAGS = {"standalone", "run-path"}


# ---------------------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DocCommand:
    doc: str
    """Document path relative to the repository."""
    line: int
    """Line the command starts on (1-based)."""
    argv: tuple[str, ...]
    """The command's words, comments and optional [...] parts dropped."""
    refused: Optional[str] = None
    """None: the document says the command works. Else the document says it is refused: with this exact
    message (a transcript's `config error: ...` line), or with any error ("", a `# refused` comment)."""

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"

    def __str__(self) -> str:
        return shlex.join(self.argv)


def split_comment(line: str) -> tuple[str, str]:
    """(code, comment): a bash comment runs from a `#` that starts a word, outside quotes, to the end."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i], line[i + 1 :]
    return line, ""


def _logical_lines(block: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Join backslash-continued lines: (first line number, joined text)."""
    out: list[tuple[int, str]] = []
    start, parts = None, []
    for number, text in block:
        if start is None:
            start = number
        stripped = text.rstrip()
        if stripped.endswith("\\"):
            parts.append(stripped[:-1])
            continue
        parts.append(stripped)
        out.append((start, " ".join(p.strip() for p in parts)))
        start, parts = None, []
    if parts:
        out.append((start, " ".join(p.strip() for p in parts)))
    return out


def _drop_optional(words: list[str]) -> list[str]:
    """Drop `[...]` optional groups written as separate words."""
    out, depth = [], 0
    for w in words:
        if depth == 0 and w.startswith("["):
            depth = 1
        if depth:
            if w.endswith("]"):
                depth = 0
            continue
        out.append(w)
    return out


def _is_covered(words: list[str]) -> bool:
    if words[0] == "unparsable:":
        return True
    return any(tuple(words[: len(prefix)]) == prefix for prefix in COVERED)


def _fenced_blocks(text: str) -> list[list[tuple[int, str]]]:
    blocks, current, fence = [], None, None
    for number, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^\s*(```+)\s*([^\s`]*)", line)
        if current is None:
            if m:
                fence, lang = m.group(1), m.group(2).lower()
                current = [] if lang in SHELL_FENCES else False
            continue
        if m and m.group(1) == fence and not m.group(2):
            if current is not False:
                blocks.append(current)
            current = None
            continue
        if current is not False:
            current.append((number, line))
    return blocks


def extract(text: str, rel: str) -> list[DocCommand]:
    """The covered commands of a document's text; `rel` names the document."""
    commands = []
    for block in _fenced_blocks(text):
        transcript = any(line.lstrip().startswith("$ ") for _, line in block)
        lines = _logical_lines(block)
        for i, (number, text) in enumerate(lines):
            text = text.strip()
            refused = None
            if transcript:
                if not text.startswith("$ "):
                    continue
                text = text[2:]
                output = lines[i + 1][1].strip() if i + 1 < len(lines) else ""
                if output.startswith("config error: "):
                    refused = output.removeprefix("config error: ")
            code, comment = split_comment(text)
            if refused is None and re.search(r"\brefused\b", comment, re.IGNORECASE):
                refused = ""  # the document says so in the comment; any refusal will do
            try:
                words = shlex.split(code)
            except ValueError:  # not shell (a listing, prose output); fail if it reads like a covered command
                if re.match(r"(forge|torchrun)\s", text):
                    commands.append(DocCommand(rel, number, ("unparsable:", text), refused))
                continue
            segment: list[str] = []
            for w in [*words, "&&"]:
                if w not in SEPARATORS:
                    segment.append(w)
                    continue
                argv = _drop_optional(segment)
                if argv and _is_covered(argv):
                    commands.append(DocCommand(rel, number, tuple(argv), refused))
                segment = []
    return commands


COMMANDS = [
    c for doc in DOCS for c in extract(doc.read_text(encoding="utf-8"), doc.relative_to(REPO).as_posix())
]


# ---------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------


class Refused(Exception):
    """The command, as the framework would run it, refuses (config error or a non-zero exit)."""


def _placeholders(argv: tuple[str, ...]) -> list[str]:
    return [w for w in argv if re.search(r"<[^>]*>", w) or w == "..." or w.endswith("=...")]


def _reduce_sweeps(overrides: list[str]) -> list[str]:
    """A multirun's swept overrides (`key=a,b`, `key=range(...)`) reduced to their first value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    out = []
    for text, o in zip(overrides, parsed):
        if o.is_sweep_override():
            first = next(iter(o.sweep_string_iterator()))
            text = f"{text.split('=', 1)[0]}={first}"
        out.append(text)
    return out


def _config_error(fn, *args):
    """fn(*args), its ConfigError or Hydra / OmegaConf composition error raised as Refused."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from forge_lm.trainer.config import ConfigError

    try:
        return fn(*args)
    except ConfigError as e:
        raise Refused(str(e)) from e
    except (HydraException, OmegaConfBaseException) as e:
        raise Refused(f"{type(e).__name__}: {' '.join(str(e).split())}") from e


def check_single_process(args: list[str], config_name: str, monkeypatch) -> None:
    """`forge train` / `forge prepare`: compose as Hydra's entry point would, validate, one process."""
    from forge_lm.trainer.config_store import compose, to_config

    multirun = False
    overrides = []
    rest = list(args)
    while rest:
        a = rest.pop(0)
        if a in ("-m", "--multirun"):
            multirun = True
        elif a in ("--cfg", "-c"):
            assert rest and rest.pop(0) in ("job", "hydra", "all"), "--cfg takes job, hydra or all"
        elif a in ("--config-dir", "-cd"):
            overrides += [a, rest.pop(0)]
        elif a == "--verify" and config_name == "prepare":
            overrides.append("data.verify=true")
        elif a.startswith("-") and not a.startswith("--config-dir="):
            pytest.fail(f"{a}: a flag this test does not know; teach it (or fix the document)")
        else:
            overrides.append(a)
    if multirun:
        overrides = _reduce_sweeps(overrides)
    monkeypatch.setenv("WORLD_SIZE", "1")
    cfg = _config_error(lambda: to_config(compose(overrides, config_name)))
    if cfg.parallel.world_size != 1:
        raise Refused(f"the parallel layout needs {cfg.parallel.world_size} processes, but this starts 1")


def check_launched(
    command: str, args: list[str], nodes: int, nproc: int, monkeypatch, launched_by_torchrun: bool
) -> None:
    """`forge train` / `forge memcheck` at nodes x nproc processes (torchrun), or memcheck alone."""
    from forge_lm.launch.config import compose, is_launch_override

    if command == "memcheck":
        rest = list(args)
        overrides = []
        while rest:
            a = rest.pop(0)
            if a in ("--steps", "--tolerance"):
                float(rest.pop(0))
            elif a.startswith("-"):
                pytest.fail(f"{a}: not a `forge memcheck` flag")
            else:
                overrides.append(a)
        # memcheck composes itself with the world size torchrun gives it, on one "node"
        overrides = [o for o in overrides if not o.startswith(("launch.nodes=", "launch.gpus_per_node="))]
        nodes, nproc = 1, nodes * nproc
    else:
        bad = [a for a in args if a.startswith("-")]
        assert not bad, f"{bad}: flags are not passed to the trainer under torchrun here; use overrides"
        launch = [a for a in args if is_launch_override(a)]
        if launched_by_torchrun and launch:
            raise Refused(
                f"{launch}: the trainer has no launch.* group (only the forge launch tools read it)"
            )
        overrides = list(args)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    _config_error(compose, [*overrides, f"launch.nodes={nodes}", f"launch.gpus_per_node={nproc}"])


def parse_torchrun(argv: list[str]) -> tuple[int, int, str, list[str]]:
    """(nodes, processes per node, forge subcommand, its arguments) of a torchrun command line."""
    nodes, nproc = 1, None
    rest = list(argv)
    while rest:
        a = rest.pop(0)
        if not a.startswith("-"):
            pytest.fail(
                f"torchrun {a}: only `-m <module>` and `--no-python forge <command>` are checked here"
            )
        name, eq, value = a.lstrip("-").partition("=")
        name = name.replace("_", "-")
        if name in ("m", "module"):
            module = rest.pop(0)
            assert module in TORCHRUN_MODULES, f"torchrun -m {module}: not a trainer entry point"
            command = TORCHRUN_MODULES[module]
            break
        if name == "no-python":
            assert rest[:1] == ["forge"] and rest[1:2] in (["train"], ["memcheck"]), (
                f"torchrun --no-python {' '.join(rest[:2])}: expected `forge train` or `forge memcheck`"
            )
            command = rest[1]
            rest = rest[2:]
            break
        if name in TORCHRUN_FLAGS:
            continue
        assert name in TORCHRUN_VALUE_OPTIONS, f"torchrun {a}: an option this test does not know"
        if not eq:
            value = rest.pop(0)
        if name == "nproc-per-node":
            assert value.isdigit(), f"--nproc-per-node {value}: give the number of processes"
            nproc = int(value)
        elif name == "nnodes":
            assert value.isdigit(), f"--nnodes {value}: give a fixed number of nodes"
            nodes = int(value)
    else:
        pytest.fail("torchrun without a program")
    assert nproc is not None, "torchrun without --nproc-per-node: the world size is not stated"
    return nodes, nproc, command, rest


def run_main(fn, args: list[str], capsys) -> None:
    from forge_lm.trainer.config import ConfigError

    try:
        code = fn(args)
    except ConfigError as e:
        raise Refused(str(e)) from e
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    if code != 0:
        raise Refused(f"exit status {code}\n{out.err.strip()}\n{out.out.strip()}".strip())


def validate(cmd: DocCommand, monkeypatch, capsys) -> None:
    argv = list(cmd.argv)
    assert argv[0] != "unparsable:", f"not a valid shell line (unbalanced quotes?): {argv[1]}"
    if argv[0] == "torchrun":
        nodes, nproc, command, args = parse_torchrun(argv[1:])
        check_launched(command, args, nodes, nproc, monkeypatch, launched_by_torchrun=True)
        return
    command, args = argv[1], argv[2:]
    if command == "train":
        check_single_process(args, "config", monkeypatch)
    elif command == "prepare":
        check_single_process(args, "prepare", monkeypatch)
    elif command == "memcheck":
        check_launched("memcheck", args, 1, 1, monkeypatch, launched_by_torchrun=False)
    elif command == "plan":
        from forge_lm.launch.plan import main

        monkeypatch.delenv("WORLD_SIZE", raising=False)
        run_main(main, args, capsys)
    elif command == "slurm":
        from forge_lm.launch.slurm import main

        monkeypatch.delenv("WORLD_SIZE", raising=False)
        extra = [] if "--dry-run" in args else ["--dry-run"]
        run_main(main, [*args, *extra], capsys)  # args[0] is "submit" (COVERED)
    elif command == "torchrun":
        from forge_lm.launch.torchrun import main

        monkeypatch.delenv("WORLD_SIZE", raising=False)
        extra = [] if "--dry-run" in args else ["--dry-run"]
        run_main(main, [*args, *extra], capsys)
    else:  # pragma: no cover - COVERED and this function disagree
        pytest.fail(f"forge {command}: not handled")


# ---------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------


def test_extraction_rules():
    block = "\n".join(
        [
            "```bash",
            "pip install x . && forge train experiment=quickstart   # first",
            "forge plan model=llama3_8b \\",
            "    launch.gpus_per_node=8 'eval.tasks=[a,b]'  [launch.account=... launch.qos=...] [--dry-run]",
            "python -m forge_lm.tools.export_hf a b",
            "torchrun --nproc-per-node 8 -m forge_lm.trainer.train x=1#2  # a comment",
            "forge plan model=llama3_8b  # refused: does not fit",
            "```",
            "```python",
            "forge train not=a_command",
            "```",
            "```",
            "$ forge train model.n_heads=5",
            "config error: model.n_heads=5 does not divide",
            "```",
        ]
    )
    found = [(c.line, c.argv, c.refused) for c in extract(block, "example.md")]
    assert found == [
        (2, ("forge", "train", "experiment=quickstart"), None),
        (3, ("forge", "plan", "model=llama3_8b", "launch.gpus_per_node=8", "eval.tasks=[a,b]"), None),
        (6, ("torchrun", "--nproc-per-node", "8", "-m", "forge_lm.trainer.train", "x=1#2"), None),
        (7, ("forge", "plan", "model=llama3_8b"), ""),
        (13, ("forge", "train", "model.n_heads=5"), "model.n_heads=5 does not divide"),
    ]


def test_documents_have_commands():
    """The extraction finds the documents' examples (a broken fence would silently skip them)."""
    docs = {c.doc for c in COMMANDS}
    assert {"README.md", "docs/launch.md"} <= docs
    kinds = {c.argv[0] if c.argv[0] == "torchrun" else " ".join(c.argv[:2]) for c in COMMANDS}
    assert {
        "torchrun",
        "forge train",
        "forge plan",
        "forge slurm",
        "forge torchrun",
        "forge prepare",
        "forge memcheck",
    } <= kinds


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.id for c in COMMANDS])
def test_documented_command(cmd: DocCommand, monkeypatch, capsys, tmp_path):
    reason = next(
        (why for (doc, start), why in SKIPPED.items() if doc == cmd.doc and str(cmd).startswith(start)), None
    )
    if reason:
        pytest.skip(reason)
    holes = _placeholders(cmd.argv)
    assert not holes, (
        f"{cmd.id}: `{cmd}` has placeholder(s) {holes}: make the example concrete, or add it to SKIPPED with why"
    )
    monkeypatch.chdir(tmp_path)  # nothing a command might write lands in the checkout
    try:
        validate(cmd, monkeypatch, capsys)
    except Refused as e:
        if cmd.refused is not None:
            if cmd.refused:
                assert str(e) == cmd.refused, f"{cmd.id}: the document shows a different error for `{cmd}`"
            return
        pytest.fail(f"{cmd.id}: `{cmd}` fails as the document writes it:\n{e}")
    assert cmd.refused is None, (
        f"{cmd.id}: the document says `{cmd}` is refused ({cmd.refused}), but it passes"
    )
