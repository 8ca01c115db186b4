"""`parallel.compile=true` through a whole run: train, resume, export, generate (Inductor runs on CPU too).

Blocks are compiled in place (Module.compile), so parameter names never change: checkpoints, the
Hugging Face export and generation see the same model as an eager run.
"""

from __future__ import annotations

import torch

from forge_lm.trainer.metrics import read_metrics
from forge_lm.trainer.train import run
from tests.conftest import compose_config, tiny_overrides

N = 3  # steps before the interruption; the runs go to 2N


def test_compiled_run_resumes_exports_and_generates(shared_output_root):
    compiled = ("parallel.compile=true", f"trainer.max_steps={2 * N}", "trainer.checkpoint_every=100")
    straight = run(compose_config(*tiny_overrides(shared_output_root, "compiled_straight", *compiled)))
    stopped_cfg = compose_config(
        *tiny_overrides(shared_output_root, "compiled_stopped", *compiled, f"trainer.exit_at_step={N}")
    )
    first = run(stopped_cfg)
    assert first.step == N
    resumed = run(stopped_cfg)
    assert resumed.step == 2 * N

    want = {r["step"]: r["loss"] for r in read_metrics(straight.run_dir, "train")}
    got = {r["step"]: r["loss"] for r in read_metrics(resumed.run_dir, "train")}
    assert sorted(got) == list(range(1, 2 * N + 1))
    for step in got:
        assert abs(want[step] - got[step]) <= 1e-5, (step, want[step], got[step])

    # The checkpoint and the export carry the model's own names (no `_orig_mod`), and transformers
    # loads the folder with our logits.
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from forge_lm.data.tokenizer import load_tokenizer
    from forge_lm.trainer.hub import from_hf
    from forge_lm.trainer.inference import Generator, load_model

    names = load_file(str(resumed.hf_dir / "model.safetensors")).keys()
    assert not [n for n in names if "_orig_mod" in n or "_checkpoint_wrapped" in n]
    hf_model = AutoModelForCausalLM.from_pretrained(resumed.hf_dir).eval()
    ours = from_hf(resumed.hf_dir).eval()
    tokenizer = load_tokenizer(resumed.hf_dir)
    prompt = tokenizer.encode("ROMEO:\nBut soft, what light through yonder window breaks?")
    ids = torch.tensor([prompt])
    with torch.no_grad():
        assert (hf_model(ids).logits - ours(ids)).abs().max().item() <= 1e-4

    # It generates: the end-of-run samples, and greedy tokens from the checkpoint equal transformers'.
    assert all(text.strip() for text in resumed.samples.values())
    model, _ = load_model(resumed.run_dir, torch.device("cpu"), torch.float32)
    [out] = Generator(model).generate([prompt], 8)  # greedy
    with torch.no_grad():
        theirs = hf_model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert out.token_ids == theirs[0, len(prompt) :].tolist()
