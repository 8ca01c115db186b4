"""Every collective the framework issues goes through trainer.parallel.collectives, which puts it on the
device of the group's backend (a CPU tensor never reaches NCCL)."""

from __future__ import annotations

import ast

import torch

from forge_lm.trainer.parallel import collectives
from tests.conftest import REPO

COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all", "all_to_all_single",
    "barrier", "monitored_barrier", "broadcast", "broadcast_object_list", "reduce", "reduce_scatter",
    "reduce_scatter_tensor", "gather", "gather_object", "scatter", "scatter_object_list", "send", "recv",
    "isend", "irecv", "batch_isend_irecv", "new_group",
}  # fmt: skip
HOME = REPO / "trainer" / "parallel" / "collectives.py"


def _direct_calls(path):
    tree = ast.parse(path.read_text(), str(path))
    aliases = {"dist", "torch.distributed"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            for a in node.names:
                if a.name in COLLECTIVES:
                    yield node.lineno, f"from torch.distributed import {a.name}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            owner = ast.unparse(node.func.value)
            if owner in aliases:
                yield node.lineno, ast.unparse(node.func)


def test_no_collective_outside_the_collectives_module():
    found = [
        f"{path.relative_to(REPO)}:{line}: {call}"
        for folder in ("forge_lm", "trainer", "data", "launch", "tools")
        for path in sorted((REPO / folder).rglob("*.py"))
        if path != HOME
        for line, call in _direct_calls(path)
    ]
    assert not found, "call these through forge_lm.trainer.parallel.collectives:\n" + "\n".join(found)
    assert list(_direct_calls(HOME)), "the rule's own check finds nothing in the module that has them all"


def test_without_a_process_group_every_collective_is_the_identity():
    x = torch.tensor([3.0, 4.0])
    assert collectives.all_reduce(x) is x and x.tolist() == [3.0, 4.0]
    assert collectives.broadcast(x, src=0) is x
    assert collectives.any_rank(True) and not collectives.any_rank(False)
    assert collectives.broadcast_object({"a": 1}) == {"a": 1}
    collectives.barrier()
