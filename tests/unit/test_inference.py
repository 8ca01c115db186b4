"""The KV-cache generation path against transformers and against our own full forward.

For every family preset at a tiny random config (fp32): greedy generation of 32 tokens equals
`transformers.generate` on the exported folder, for one prompt and for a batch of prompts of different
lengths (left-padded on both sides); the logits of every cached decode step equal a full forward within
1e-5. The sliding windows (8) are shorter than prompt + generation, so the ring-buffer caches wrap.
"""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import AutoModelForCausalLM

from forge_lm.data.tokenizer import Tokenizer
from forge_lm.trainer import checkpoint as ckpt
from forge_lm.trainer.checkpoint import CheckpointError
from forge_lm.trainer.config import TrainerConfig
from forge_lm.trainer.hub import to_hf
from forge_lm.trainer.inference import Generator, KVCache, SamplingParams, load_model
from forge_lm.trainer.model import Decoder
from forge_lm.trainer.model.families import preset
from forge_lm.trainer.optim import build_optimizer
from tests.unit.test_families import FAMILIES, VOCAB, perturb_vectors, tiny_overrides

PROMPT_LENGTHS = (5, 11, 2)


# Initialisation scales at which each tiny random model's greedy continuations vary (a random model
# easily settles into repeating one token, which would make "same tokens as transformers" a weak check).
INIT_STD = {"gemma": 1.0, "gemma2": 0.02, "gemma3": 0.02, "olmo2": 0.15}


def tiny(family: str, seed: int = 0, varied: bool = True) -> Decoder:
    """The family's tiny test model; varied: at the INIT_STD scale, else at the parity tests' own (0.1)."""
    overrides = tiny_overrides(family)
    if varied:
        overrides["init_std"] = INIT_STD.get(family, 0.3)
    model = Decoder.build(preset(f"{family}_tiny", **overrides), seed=seed).eval()
    perturb_vectors(model)
    return model


def prompts(lengths=PROMPT_LENGTHS, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def hf_greedy_batch(hf, batch: list[list[int]], n: int) -> list[list[int]]:
    """transformers' own batched generation: left padding and an attention mask."""
    T = max(map(len, batch))
    ids = torch.zeros(len(batch), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(batch):
        ids[row, T - len(p) :] = torch.tensor(p)
        mask[row, T - len(p) :] = 1
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[:, T:].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_equals_transformers(tmp_path, family: str) -> None:
    ours = tiny(family)
    hf = AutoModelForCausalLM.from_pretrained(to_hf(ours, tmp_path / "hf"), local_files_only=True).eval()
    batch = prompts()
    got = [c.token_ids for c in Generator(ours).generate(batch, 32)]
    assert all(len(ids) == 32 for ids in got)
    assert got == hf_greedy_batch(hf, batch, 32)  # a batch of different lengths
    for prompt, ids in zip(batch, got):  # each prompt alone
        assert hf_greedy_batch(hf, [prompt], 32) == [ids]
    # Not a degenerate model that repeats one token.
    assert len({t for ids in got for t in ids}) > 3


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decode_logits_equal_a_full_forward(family: str) -> None:
    model = tiny(family, varied=False)
    batch = prompts()
    T, steps = max(map(len, batch)), 20
    cache = KVCache(model.cfg, len(batch), T + steps, "cpu", torch.float32)
    cache.reset(torch.tensor([T - len(p) for p in batch]))
    ids = torch.zeros(len(batch), T, dtype=torch.long)
    for row, p in enumerate(batch):
        ids[row, T - len(p) :] = torch.tensor(p)
    step_logits = []
    with torch.no_grad():
        cache.prefilling = True
        logits = model(ids, cache=cache)[:, -1]
        cache.prefilling = False
        cache.slot.fill_(T)
        sequences = [list(p) for p in batch]
        for _ in range(steps):
            step_logits.append(logits)
            nxt = logits.argmax(-1)
            for row, token in enumerate(nxt.tolist()):
                sequences[row].append(token)
            logits = model(nxt[:, None], cache=cache)[:, -1]
            cache.slot += 1
        for row, seq in enumerate(sequences):
            full = model(torch.tensor([seq]))[0]  # no padding, no cache
            n = len(batch[row])
            assert full.abs().max() > 1.0  # logits of a meaningful size
            for i, cached in enumerate(step_logits):
                assert (cached[row] - full[n - 1 + i]).abs().max().item() <= 1e-5, (row, i)


def test_the_decode_step_compiles_to_the_same_tokens() -> None:
    for family in ("llama3", "gemma2"):  # plain causal; ring buffers with soft-capping
        model = tiny(family)
        batch = prompts()
        eager = Generator(model, compile=False).generate(batch, 24)
        compiled = Generator(model, compile=True)
        assert [c.token_ids for c in compiled.generate(batch, 24)] == [c.token_ids for c in eager]
        # A second batch of the same size reuses the cache (and the compiled graph).
        again = compiled.generate(prompts(seed=7), 24)
        assert [c.token_ids for c in again] == [
            c.token_ids for c in Generator(model).generate(prompts(seed=7), 24)
        ]


def test_sliding_window_layers_keep_only_the_window() -> None:
    model = tiny("gemma3")  # five local layers (window 8), one global
    cache = KVCache(model.cfg, 2, 128, "cpu", torch.float32)
    lengths = [layer.k.shape[2] for layer in cache.layers]
    assert lengths == [8, 8, 8, 8, 8, 128]
    cfg = model.cfg
    per_slot = 2 * 2 * cfg.n_kv_heads * cfg.head_dim * 4  # k and v, 2 rows, fp32
    assert cache.nbytes() == (5 * 8 + 128) * per_slot  # instead of 6 * 128 slots


def test_sampling_is_seeded_and_respects_top_k_and_top_p() -> None:
    model = tiny("qwen3")
    gen = Generator(model)
    batch = prompts()
    hot = SamplingParams(temperature=1.5, seed=3)
    a = [c.token_ids for c in gen.generate(batch, 16, hot)]
    assert a == [c.token_ids for c in gen.generate(batch, 16, hot)]  # same seed, same tokens
    assert a != [c.token_ids for c in gen.generate(batch, 16, SamplingParams(temperature=1.5, seed=4))]
    greedy = [c.token_ids for c in gen.generate(batch, 16)]
    assert a != greedy
    # top_k=1 and a tiny top_p leave only the most likely token: sampling becomes greedy.
    assert [c.token_ids for c in gen.generate(batch, 16, SamplingParams(1.5, top_k=1, seed=5))] == greedy
    assert [c.token_ids for c in gen.generate(batch, 16, SamplingParams(1.5, top_p=1e-6, seed=5))] == greedy
    # top_k=3: every sampled token is among the 3 most likely at its step.
    [prompt] = prompts((6,))
    [c] = gen.generate([prompt], 12, SamplingParams(temperature=2.0, top_k=3, seed=0))
    seq = list(prompt)
    for token in c.token_ids:
        with torch.no_grad():
            top3 = model(torch.tensor([seq]))[0, -1].topk(3).indices.tolist()
        assert token in top3
        seq.append(token)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_streaming_yields_the_generated_tokens_as_they_come() -> None:
    model = tiny("llama3")
    [prompt] = prompts((7,))
    stream = Generator(model).stream(prompt, 10)
    first = next(stream)
    rest = list(stream)
    assert [first, *rest] == Generator(model).generate([prompt], 10)[0].token_ids


def test_generation_stops_at_eos_and_at_stop_strings(small_tokenizer: Tokenizer) -> None:
    cfg = preset("llama3_tiny", vocab_size=small_tokenizer.vocab_size, d_model=64, n_layers=2, n_heads=4,
                 n_kv_heads=2, max_seq_len=128, init_std=0.1)  # fmt: skip
    model = Decoder.build(cfg, seed=0).eval()
    prompt = small_tokenizer.encode("ROMEO: But soft, what light")
    gen = Generator(model)
    [free] = gen.generate([prompt], 20, tokenizer=small_tokenizer)
    assert free.finish_reason == "length" and len(free.token_ids) == 20

    eos = free.token_ids[5]  # pretend the 6th token is the end of sequence
    stop_at = free.token_ids.index(eos)
    [c] = gen.generate([prompt], 20, eos_ids=[eos], tokenizer=small_tokenizer)
    assert c.finish_reason == "eos" and c.token_ids == free.token_ids[: stop_at + 1]
    assert c.text == small_tokenizer.decode(free.token_ids[:stop_at])

    stop = small_tokenizer.decode(free.token_ids[:12])[-3:]  # text that appears after the 12th token
    [s] = gen.generate([prompt], 20, stop_strings=[stop], tokenizer=small_tokenizer)
    assert s.finish_reason == "stop" and len(s.token_ids) <= 12
    assert stop not in s.text and free.text.startswith(s.text)

    # A batch: rows finish independently, the others go on.
    both = gen.generate([prompt, prompt[:3]], 20, eos_ids=[eos], tokenizer=small_tokenizer)
    assert both[0].token_ids == c.token_ids


def test_bad_requests_are_refused_with_what_to_do() -> None:
    model = tiny("llama3")  # max_seq_len 128
    gen = Generator(model)
    with pytest.raises(ValueError, match="longer than the context of 128 tokens"):
        gen.generate([list(range(100))], 40)
    with pytest.raises(ValueError, match="outside the model's vocabulary of 256"):
        gen.generate([[1, 2, 300]], 4)
    with pytest.raises(ValueError, match="empty"):
        gen.generate([[]], 4)
    with pytest.raises(ValueError, match="need a tokenizer"):
        gen.generate([[1, 2]], 4, stop_strings=["\n"])


def _checkpoint(root, model: Decoder, tokenizer_path: str | None = None):
    opt = build_optimizer(model, TrainerConfig(max_steps=2, warmup_steps=1))
    extra = {"model_config": dataclasses.asdict(model.cfg), "tokenizer_path": tokenizer_path}
    return ckpt.Checkpointer(root).save(1, [model], [opt], {"extra": extra})


def test_load_model_reads_checkpoints_runs_and_hf_folders(tmp_path, small_tokenizer_dir) -> None:
    cfg = preset("qwen3_tiny", vocab_size=1024, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2)
    model = Decoder.build(cfg, seed=0)
    path = _checkpoint(tmp_path / "run" / "checkpoints", model, small_tokenizer_dir)
    x = torch.randint(0, 1024, (1, 12))
    with torch.no_grad():
        want = model(x)
        for where in (path, tmp_path / "run"):  # the checkpoint, or the run (its latest checkpoint)
            loaded, tok = load_model(where)
            assert tok is not None and tok.vocab_size == 1024
            assert torch.equal(loaded(x), want)
        to_hf(model, tmp_path / "hf", tokenizer=tok)
        from_folder, tok2 = load_model(tmp_path / "hf")
        assert (from_folder(x) - want).abs().max() <= 1e-6 and tok2.encode("ROMEO") == tok.encode("ROMEO")


def test_load_model_refuses_mismatches_clearly(tmp_path, small_tokenizer_dir, qwen3_dir) -> None:
    cfg = preset("llama3_tiny", vocab_size=1024, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2)
    path = _checkpoint(tmp_path / "ckpt", Decoder.build(cfg, seed=0))
    other = preset("qwen3_tiny", vocab_size=1024, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2)
    with pytest.raises(
        CheckpointError, match=r"another architecture.*family='llama'.*n_layers=2 \(config: 4\)"
    ):
        load_model(path, expect=other)
    # The Qwen3 tokenizer (151,669 tokens) cannot index a 1024-row embedding.
    with pytest.raises(ValueError, match=r"151\d{3} tokens but the model's vocabulary holds 1024"):
        load_model(path, tokenizer_path=qwen3_dir)
    with pytest.raises(FileNotFoundError, match="neither a Hugging Face folder"):
        load_model(tmp_path / "nothing_here")
