"""`trainer.profile.steps=[a,b]`: a torch.profiler trace of those steps with the training phases named."""

from __future__ import annotations

import json

from forge_lm.trainer.train import run
from tests.conftest import compose_config, tiny_overrides
from tests.distributed.conftest import launch

PHASES = {"forge/data", "forge/forward", "forge/backward", "forge/optimizer"}


def _names(trace_path) -> set[str]:
    return {event.get("name") for event in json.loads(trace_path.read_text())["traceEvents"]}


def test_a_trace_of_the_chosen_steps_names_every_phase(shared_output_root):
    result = run(
        compose_config(*tiny_overrides(shared_output_root, "profiled", "trainer.max_steps=4",
                                       "trainer.profile.steps=[2,3]"))  # fmt: skip
    )
    [trace] = (result.run_dir / "profile").glob("*.json")
    assert trace.name == "trace_steps2-3_rank0.json"
    names = _names(trace)
    assert PHASES <= names, PHASES - names
    # Two steps recorded: each phase appears once per step (one micro-batch per step here).
    events = json.loads(trace.read_text())["traceEvents"]
    assert sum(e.get("name") == "forge/optimizer" for e in events) == 2


def test_collectives_appear_in_the_trace_of_a_distributed_run(tmp_path):
    out = launch(2, tmp_path, "profiled_fsdp", "parallel.dp_shard=2", "trainer.max_steps=3",
                 "trainer.profile.steps=[2,2]")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    for rank in (0, 1):
        names = _names(tmp_path / "profiled_fsdp" / "profile" / f"trace_steps2-2_rank{rank}.json")
        assert PHASES | {"forge/all_reduce"} <= names
