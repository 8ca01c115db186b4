"""`forge compare RUN_A RUN_B`: two real short runs, the step where they part, and the config that differs."""

from __future__ import annotations

import json

from forge_lm.tools.compare_runs import main as compare
from forge_lm.trainer.train import run
from tests.conftest import compose_config, tiny_overrides


def test_compare_finds_where_runs_part_and_why(shared_output_root, capsys):
    steps = ("trainer.max_steps=5", "eval.every=0")
    a = run(compose_config(*tiny_overrides(shared_output_root, "compare_a", *steps))).run_dir
    same = run(compose_config(*tiny_overrides(shared_output_root, "compare_same", *steps))).run_dir
    other_lr = run(compose_config(*tiny_overrides(shared_output_root, "compare_lr", *steps, "trainer.lr=2e-3"))).run_dir

    assert compare([str(a), str(same)]) == 0
    out = capsys.readouterr().out
    assert "agree within 1e-05 on all 5 common steps" in out and "name: compare_a -> compare_same" in out

    # Step 1's loss comes before any update, so a different learning rate first shows at step 2.
    assert compare([str(a), str(other_lr)]) == 1
    out = capsys.readouterr().out
    assert "train losses part at step 2:" in out and "trainer.lr: 0.003 -> 0.002" in out

    # A divergence planted later in an otherwise identical run is found at its own step.
    path = same / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for r in records:
        if r["kind"] == "train" and r["step"] == 4:
            r["loss"] += 1e-4
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert compare([str(a), str(same)]) == 1
    assert "part at step 4:" in capsys.readouterr().out

    assert compare([str(a), str(shared_output_root / "no_such_run")]) == 2
