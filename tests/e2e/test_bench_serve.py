"""`forge bench serve` end to end at a tiny size: it starts the real `forge serve`, runs every phase through
the `openai` client and writes its results. No speed is asserted (benchmarks are scripts, not timed tests):
this keeps the script working and checks what it counts."""

from __future__ import annotations

import json

from forge_lm.tools.bench_serve import main


def test_the_benchmark_runs_every_phase_and_counts_every_token(tmp_path, capsys) -> None:
    out = tmp_path / "serve.json"
    code = main(["--clients", "3", "--prompt", "8", "--new", "5", "--repeats", "1", "--no-llama-cpp",
                 "--json", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    result = json.loads(out.read_text())
    for phase in ("concurrent", "one_at_a_time"):
        assert result[phase]["tokens"] == 3 * 5, (phase, result[phase])
        assert result[phase]["tokens_per_s"] > 0
    assert result["generator_tokens_per_s"] > 0
    assert len(result["one_client_vs_generator_each_run"]) == 1
    assert "threads: forge serve's model" in printed and "the Generator directly:" in printed
