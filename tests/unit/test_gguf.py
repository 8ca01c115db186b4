"""GGUF export for llama.cpp: every family's tiny preset written in every dtype and read back with gguf's own
reader, checked against an independent statement of what llama.cpp expects.

The reference for the tensors is our Hugging Face export (itself checked logit for logit against
transformers in test_hub.py), renamed by llama.cpp's own HF -> GGUF name map (gguf.get_tensor_name_map) and
transformed as llama.cpp's converter does: Q/K rows interleaved for the "llama" architecture (stated here by
indices, not by the reshape the writer uses), +1 on Gemma norms, experts stacked. Metadata values are stated
from the config. The end-to-end check with llama.cpp itself is tests/e2e/test_gguf_llamacpp.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from functools import cache
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from forge_lm.tools.export_hf import main as export_main
from forge_lm.trainer import checkpoint as ckpt
from forge_lm.trainer.config import TrainerConfig
from forge_lm.trainer.hub.convert import to_hf_state_dict
from forge_lm.trainer.hub.gguf import (
    GGUFExportError,
    TokenizerExtras,
    read_tokenizer_extras,
    to_gguf,
    tokenizer_metadata,
)
from forge_lm.trainer.model import Decoder
from forge_lm.trainer.model.families import FAMILY_KNOBS, preset
from forge_lm.trainer.optim import build_optimizer

FAMILIES = list(FAMILY_KNOBS)  # llama3 qwen2 qwen3 qwen3_moe mixtral gemma gemma2 gemma3 glm4 olmo2
DTYPES = ["f32", "f16", "bf16", "q8_0"]
VOCAB = 1024  # the small trained tokenizer's

# What llama.cpp calls each family's architecture (its src/llama-arch.cpp names).
LLAMA_CPP_ARCH = {
    "llama3": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3moe",
    "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3", "glm4": "glm4", "olmo2": "olmo2",
}  # fmt: skip
GGML_TYPE = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}


@cache
def tiny_model(family: str, **overrides) -> Decoder:
    """The family's tiny preset with every parameter random (norm gains too, so that a swapped norm or a
    missing +1 shows), seeded. Nested overrides come as tuples of items (hashable, for the cache)."""
    overrides = {k: dict(v) if isinstance(v, tuple) else v for k, v in overrides.items()}
    model = Decoder.build(preset(f"{family}_tiny", vocab_size=VOCAB, **overrides), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def read(path: str | Path) -> tuple[dict[str, gguf.ReaderTensor], dict[str, object]]:
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    fields = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    return tensors, fields


def as_float(t: gguf.ReaderTensor) -> torch.Tensor:
    """A tensor of the file as float32 in our (PyTorch) shape, whatever its storage type."""
    shape = tuple(int(n) for n in reversed(t.shape))
    return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape))


def interleaved_rows(n_heads: int, head_dim: int) -> list[int]:
    """For llama.cpp's pair-rotating RoPE: row 2i of a head holds our row i, row 2i + 1 our row i + d/2."""
    order = []
    for h in range(n_heads):
        for i in range(head_dim // 2):
            order += [h * head_dim + i, h * head_dim + head_dim // 2 + i]
    return order


def expected_tensors(model: Decoder) -> dict[str, torch.Tensor]:
    """What llama.cpp should find, built from the HF export and llama.cpp's own name map."""
    cfg = model.cfg
    arch = LLAMA_CPP_ARCH[_family_key(cfg.family)]
    hf = {
        k: v.float() for k, v in to_hf_state_dict(model.state_dict(), cfg.tie_embeddings, cfg.family).items()
    }
    # Experts: HF stores one matrix per expert; llama.cpp one 3-D tensor per kind, named after the HF prefix.
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for name in [n for n in hf if ".experts." in n]:
        prefix, rest = name.split(".experts.")
        e, kind = rest.split(".", 1)
        experts.setdefault(f"{prefix}.experts.{kind}", {})[int(e)] = hf.pop(name)
    for name, by_e in experts.items():
        hf[name] = torch.stack([by_e[e] for e in sorted(by_e)])
    if arch == "olmo2" and cfg.tie_embeddings:  # llama.cpp's OLMo 2 always reads an output matrix
        hf["lm_head.weight"] = hf["model.embed_tokens.weight"]

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.n_layers)
    out = {}
    for hf_name, t in hf.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, f"llama.cpp's {arch} has no tensor for {hf_name}"
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            heads = cfg.n_heads if ".attn_q." in name else cfg.n_kv_heads
            t = t[interleaved_rows(heads, cfg.head_dim)]
        if cfg.family.startswith("gemma") and name.endswith("norm.weight"):
            t = t + 1  # Gemma's gain is 1 + w; llama.cpp stores the gain
        out[name] = t
    return out


def _family_key(family: str) -> str:
    return "llama3" if family == "llama" else family


@pytest.fixture(scope="module")
def tok(small_tokenizer):
    return small_tokenizer


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_tensor_is_what_llama_cpp_expects(tmp_path, tok, family: str, dtype: str) -> None:
    model = tiny_model(family, n_layers=2)  # two layers show every per-layer rule; four cost twice the time
    path = to_gguf(model, tmp_path / "m.gguf", tok, dtype=dtype)
    tensors, fields = read(path)
    arch = LLAMA_CPP_ARCH[family]
    assert fields["general.architecture"] == arch

    want = expected_tensors(model)
    assert sorted(tensors) == sorted(want)
    # Every name is one gguf's table lists for the architecture (its MODEL_TENSORS, llama.cpp's LLM_TENSOR_*).
    allowed = {
        gguf.TENSOR_NAMES[t].format(bid=i)
        for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH[arch.upper()]]
        for i in range(model.cfg.n_layers)
    }
    for name, t in tensors.items():
        assert name.rsplit(".", 1)[0] in allowed, name
        got, ref = as_float(t), want[name]
        assert got.shape == ref.shape, name
        # Norms, biases and the MoE router stay float32 in every file, as llama.cpp's converter keeps them.
        keep_f32 = ref.dim() == 1 or name.endswith(("norm.weight", "ffn_gate_inp.weight"))
        stored = gguf.GGMLQuantizationType.F32 if keep_f32 else GGML_TYPE[dtype]
        if stored == gguf.GGMLQuantizationType.Q8_0 and ref.shape[-1] % 32:
            stored = gguf.GGMLQuantizationType.F16  # rows that are not whole 32-blocks
        assert t.tensor_type == stored, name
        if stored == gguf.GGMLQuantizationType.F32:
            assert torch.equal(got, ref), name
        elif stored == gguf.GGMLQuantizationType.F16:
            torch.testing.assert_close(got, ref, rtol=2**-11, atol=2**-24, msg=name)
        elif stored == gguf.GGMLQuantizationType.BF16:
            torch.testing.assert_close(got, ref, rtol=2**-8, atol=1e-38, msg=name)
        else:  # q8_0: 32 values share one scale, max|x| / 127 stored in f16; each is off by half a step
            # plus up to 127 times the scale's f16 rounding (2^-11 relative): under 0.57 steps.
            blocks_ref, blocks_got = ref.reshape(-1, 32), got.reshape(-1, 32)
            step = blocks_ref.abs().amax(dim=1, keepdim=True) / 127
            assert ((blocks_got - blocks_ref).abs() <= step * 0.57 + 1e-7).all(), name


@pytest.mark.parametrize("family", FAMILIES)
def test_metadata_llama_cpp_requires(tmp_path, tok, family: str) -> None:
    model = tiny_model(family)
    cfg = model.cfg
    _, f = read(to_gguf(model, tmp_path / "m.gguf", tok, dtype="f32"))
    a = LLAMA_CPP_ARCH[family]
    required = {
        f"{a}.context_length": cfg.max_seq_len,
        f"{a}.embedding_length": cfg.d_model,
        f"{a}.block_count": cfg.n_layers,
        f"{a}.feed_forward_length": cfg.ffn_dim,
        f"{a}.attention.head_count": cfg.n_heads,
        f"{a}.attention.head_count_kv": cfg.n_kv_heads,
        f"{a}.attention.key_length": cfg.head_dim,
        f"{a}.attention.value_length": cfg.head_dim,
        f"{a}.rope.dimension_count": int(cfg.head_dim * cfg.rotary_fraction),
        f"{a}.vocab_size": VOCAB,
        "general.file_type": int(gguf.LlamaFileType.ALL_F32),
    }
    for key, value in required.items():
        assert f[key] == value, key
    assert f[f"{a}.rope.freq_base"] == pytest.approx(cfg.rope_theta, rel=1e-7)
    assert f[f"{a}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps, rel=1e-6)
    assert len(f["tokenizer.ggml.tokens"]) == VOCAB
    if cfg.is_moe:
        assert (f[f"{a}.expert_count"], f[f"{a}.expert_used_count"]) == (cfg.moe.num_experts, cfg.moe.top_k)
    if family == "qwen3_moe":
        assert f[f"{a}.expert_feed_forward_length"] == cfg.ffn_dim
    if family == "glm4":
        assert f[f"{a}.rope.dimension_count"] == cfg.head_dim // 2  # partial RoPE: half of each head
    if family == "gemma2":
        assert f[f"{a}.attn_logit_softcapping"] == 50.0 and f[f"{a}.final_logit_softcapping"] == 30.0
        assert f[f"{a}.attention.sliding_window"] == cfg.sliding_window
        assert f[f"{a}.attention.sliding_window_pattern"] == [True, False, True, False]  # local, global, ..
    if family == "gemma3":
        assert f[f"{a}.attention.sliding_window"] == cfg.sliding_window
        assert f[f"{a}.attention.sliding_window_pattern"] == [True] * 4  # every 6th is global: none of 4
        assert f[f"{a}.rope.freq_base_swa"] == 10000.0 and f[f"{a}.rope.freq_base"] == 1e6
        assert f"{a}.final_logit_softcapping" not in f


def test_llama3_rope_scaling_travels_as_rope_freqs_and_linear_as_keys(tmp_path, tok) -> None:
    scaling = dict(
        kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=64
    )
    model = tiny_model("llama3", rope_scaling=tuple(scaling.items()))
    tensors, f = read(to_gguf(model, tmp_path / "m.gguf", tok, dtype="f16"))
    # Llama 3.1's rule, stated per frequency: keep the fast ones, divide the slow ones by factor, blend between.
    dim, base = model.cfg.head_dim, model.cfg.rope_theta
    want = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < 64 / 4.0:
            want.append(1.0)
        elif wavelen > 64 / 1.0:
            want.append(8.0)
        else:
            smooth = (64 / wavelen - 1.0) / (4.0 - 1.0)
            want.append(1 / ((1 - smooth) / 8.0 + smooth))
    got = as_float(tensors["rope_freqs.weight"])
    assert tensors["rope_freqs.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=0)
    assert "llama.rope.scaling.type" not in f

    gemma3 = tiny_model("gemma3", rope_scaling=(("kind", "linear"), ("factor", 8.0)))
    _, f = read(to_gguf(gemma3, tmp_path / "g.gguf", tok, dtype="f16"))
    assert f["gemma3.rope.scaling.type"] == "linear" and f["gemma3.rope.scaling.factor"] == 8.0


def test_tokenizer_is_embedded_as_llama_cpp_reads_it(tmp_path, gpt2_dir) -> None:
    from forge_lm.data.tokenizer import load_tokenizer

    gpt2 = load_tokenizer(gpt2_dir)
    model = Decoder.build(preset("llama3_tiny", vocab_size=50304, d_model=64, n_layers=1, n_heads=2), seed=0)
    _, f = read(to_gguf(model, tmp_path / "m.gguf", gpt2, dtype="q8_0"))
    vocab = json.loads((Path(gpt2_dir) / "encoder.json").read_text(encoding="utf-8"))
    merges = (Path(gpt2_dir) / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
    assert f["tokenizer.ggml.model"] == "gpt2"
    # GPT-2's byte-level regex split: llama.cpp's LLAMA_VOCAB_PRE_TYPE_GPT2.
    assert f["tokenizer.ggml.pre"] == "gpt-2"
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 50304  # padded to the model's embedding rows
    assert tokens[:50257] == sorted(vocab, key=vocab.get)
    assert tokens[50257:] == [f"[PAD{i}]" for i in range(50257, 50304)]
    assert types[50256] == gguf.TokenType.CONTROL and types[50257] == gguf.TokenType.UNUSED
    assert set(types[:50256]) == {gguf.TokenType.NORMAL}
    assert f["tokenizer.ggml.merges"] == [m for m in merges if m]
    assert f["tokenizer.ggml.eos_token_id"] == 50256 and "tokenizer.ggml.bos_token_id" not in f
    assert f["tokenizer.ggml.add_bos_token"] is False and f["tokenizer.ggml.add_eos_token"] is False
    assert "tokenizer.chat_template" not in f


def test_qwen_tokenizer_keeps_its_pre_tokenizer_chat_template_and_pad(qwen3_dir) -> None:
    from forge_lm.data.tokenizer import load_tokenizer

    qwen = load_tokenizer(qwen3_dir)
    config = json.loads((Path(qwen3_dir) / "tokenizer_config.json").read_text(encoding="utf-8"))
    extras = read_tokenizer_extras(qwen3_dir)
    assert extras.chat_template == config["chat_template"] and extras.pad_token == "<|endoftext|>"
    keys = tokenizer_metadata(qwen, 151936, extras)
    assert keys["tokenizer.ggml.pre"] == "qwen2"
    assert keys["tokenizer.chat_template"] == config["chat_template"]
    assert keys["tokenizer.ggml.padding_token_id"] == qwen.backend.token_to_id("<|endoftext|>")
    im_end = qwen.backend.token_to_id("<|im_end|>")
    assert keys["tokenizer.ggml.tokens"][im_end] == "<|im_end|>"
    assert keys["tokenizer.ggml.token_type"][im_end] == gguf.TokenType.CONTROL
    with pytest.raises(GGUFExportError, match=r"ids up to \d+ but the model's vocabulary holds 1024"):
        tokenizer_metadata(qwen, 1024, TokenizerExtras())


@pytest.mark.parametrize(
    ("family", "change", "words"),
    [
        ("gemma2", dict(attn_softcap=None), "model.attn_softcap=None"),
        ("gemma2", dict(query_pre_attn_scalar=128.0), "query_pre_attn_scalar=128"),
        ("gemma3", dict(attn_softcap=50.0), "model.attn_softcap=50.0"),
        ("gemma", dict(tie_embeddings=False), "model.tie_embeddings=False"),
        ("qwen3_moe", dict(moe=(("renormalize", False),)), "model.moe.renormalize=False"),
        ("qwen3_moe", dict(moe=(("balance", "bias"),)), "model.moe.balance=bias"),
        ("mixtral", dict(sliding_window=64), "model.sliding_window=64"),
        ("qwen3", dict(rope_scaling=(("kind", "llama3"), ("factor", 8.0))), "'llama3'"),
        ("llama3", dict(qk_norm="head"), "model.qk_norm='head'"),
    ],
)
def test_what_llama_cpp_would_run_differently_is_refused(tmp_path, tok, family, change, words) -> None:
    model = tiny_model(family, **change)
    with pytest.raises(GGUFExportError, match=f"cannot export .*{re.escape(words)}") as e:
        to_gguf(model, tmp_path / "m.gguf", tok)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


# ---- the command ----------------------------------------------------------------------------------------------


def _checkpoint(root: Path, model: Decoder, tokenizer_path: str | None) -> Path:
    opt = build_optimizer(model, TrainerConfig(max_steps=2, warmup_steps=1))
    extra = {"model_config": dataclasses.asdict(model.cfg), "tokenizer_path": tokenizer_path}
    return ckpt.Checkpointer(root).save(1, [model], [opt], {"extra": extra})


CHAT_TEMPLATE = "{% for m in messages %}<|endoftext|>{{ m.role }}: {{ m.content }}\n{% endfor %}"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, small_tokenizer_dir) -> Path:
    """A run directory holding one real checkpoint of a tiny Qwen3, with the tokenizer it records (whose
    tokenizer_config.json has a chat template)."""
    tokenizer_dir = tmp_path_factory.mktemp("tok") / "bpe"
    shutil.copytree(small_tokenizer_dir, tokenizer_dir)
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    (tokenizer_dir / "tokenizer_config.json").write_text(
        json.dumps({**config, "chat_template": CHAT_TEMPLATE})
    )
    run = tmp_path_factory.mktemp("run") / "tiny-qwen3"
    model = Decoder.build(preset("qwen3_tiny", vocab_size=VOCAB, d_model=64, n_layers=2, head_dim=16), seed=0)
    _checkpoint(run / "checkpoints", model, str(tokenizer_dir))
    return run


def test_forge_export_writes_a_gguf_from_a_checkpoint_or_a_run(tmp_path, run_dir, capsys) -> None:
    checkpoint = ckpt.latest_checkpoint(run_dir / "checkpoints").path
    assert (
        export_main([str(checkpoint), str(tmp_path / "a.gguf"), "--format", "gguf", "--dtype", "q8_0"]) == 0
    )
    tensors, f = read(tmp_path / "a.gguf")
    assert f["general.name"] == "tiny-qwen3" and f["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert (
        f["tokenizer.chat_template"] == CHAT_TEMPLATE
    )  # from the recorded tokenizer's tokenizer_config.json
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    # A run directory (its latest checkpoint) into a directory: model-<dtype>.gguf, f16 by default.
    assert export_main([str(run_dir), str(tmp_path / "out"), "--format", "gguf"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model-f16.gguf"]
    _, f = read(tmp_path / "out" / "model-f16.gguf")
    assert f["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)
    assert f"to {tmp_path / 'out' / 'model-f16.gguf'}" in capsys.readouterr().out


def _refused(argv: list[str], capsys) -> str:
    assert export_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line, no traceback
    return err


def test_bad_exports_fail_in_one_line_and_leave_no_file(
    tmp_path, run_dir, small_tokenizer_dir, capsys
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    err = _refused([str(run_dir), str(out / "m.gguf"), "--format", "gguf", "--dtype", "q4_k"], capsys)
    assert "--dtype q4_k" in err and "f32, f16, bf16, q8_0" in err
    err = _refused([str(tmp_path / "nowhere"), str(out / "m.gguf"), "--format", "gguf"], capsys)
    assert "nowhere: no such checkpoint" in err
    err = _refused([str(run_dir), str(out / "m.gguf"), "--format", "ggml"], capsys)
    assert "--format ggml: choose one of hf, gguf" in err
    err = _refused([str(run_dir), str(out / "hf"), "--dtype", "q8_0"], capsys)
    assert "Hugging Face export takes one of f32, f16, bf16" in err
    # A family configuration llama.cpp cannot run: Gemma 2 without soft-capping.
    gemma2 = Decoder.build(preset("gemma2_tiny", vocab_size=VOCAB, d_model=64, n_layers=2, attn_softcap=None))
    bad = _checkpoint(tmp_path / "gemma2" / "checkpoints", gemma2, small_tokenizer_dir)
    err = _refused([str(bad), str(out / "m.gguf"), "--format", "gguf"], capsys)
    assert "cannot export family 'gemma2' to GGUF" in err and "attn_softcap=None" in err
    assert list(out.iterdir()) == []


def test_interrupted_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path, tok, monkeypatch) -> None:
    model = tiny_model("qwen3")
    target = tmp_path / "m.gguf"
    to_gguf(model, target, tok, dtype="f16")
    before = target.read_bytes()

    def fail(self, *args, **kwargs):  # the disk fills up half-way through the tensors
        raise OSError("No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError, match="No space left"):
        to_gguf(model, target, tok, dtype="f32")
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"] and target.read_bytes() == before
