"""llama.cpp itself runs our GGUF exports: the same greedy tokens as our Generator, the same logits within
float rounding, the same token ids for the same text.

Opt-in: needs llama-cpp-python (`pip install llama-cpp-python`, a C++ build of several minutes), and is
skipped, saying so, without it. Models are each family's tiny preset, random (seeded) with weights large
enough that greedy decoding does not collapse onto one token, exported in f32; llama.cpp keeps its KV
cache in f32 too, so the only differences left are its kernels' rounding.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python builds llama.cpp)"
)

from forge_lm.data.config import SourceConfig  # noqa: E402
from forge_lm.data.sources import iter_documents  # noqa: E402
from forge_lm.data.tokenizer import Tokenizer, load_tokenizer, train_bpe  # noqa: E402
from forge_lm.trainer.hub.gguf import read_tokenizer_extras, to_gguf  # noqa: E402
from forge_lm.trainer.inference import Generator, SamplingParams  # noqa: E402
from forge_lm.trainer.model import Decoder  # noqa: E402
from forge_lm.trainer.model.families import FAMILY_KNOBS, preset  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHAKESPEARE = REPO / "data" / "corpora" / "shakespeare.jsonl.zst"
GPT2 = REPO / "tests" / "assets" / "tokenizers" / "gpt2"
QWEN3 = REPO / "tests" / "assets" / "tokenizers" / "qwen3"
GGML_TYPE_F32 = 0
PROMPT = "ROMEO.\nBut soft, what light"
TEXTS = [
    PROMPT,
    "ROMEO. But soft! What light through yonder window breaks?\n\n\tIt is the east, and Juliet is the sun.",
    "x = [1, 22, 333, 4444, 55555]  # numbers, 3.14159 and    spaces\r\n",
    "Ünïcödé — “quotes”, emoji 🦙🚀, 日本語のテキスト, and <|endoftext|> as plain text.",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    """A byte-level BPE of 1024 tokens trained on ~200 KB of the Shakespeare corpus (what `forge prepare`
    makes for a model trained from scratch); small, so that the models here are quick on a CPU."""
    texts, chars = [], 0
    for doc in iter_documents(SourceConfig(name="shakespeare", paths=[str(SHAKESPEARE)])):
        texts.append(doc.text)
        chars += len(doc.text)
        if chars > 200_000:
            break
    out = tmp_path_factory.mktemp("bpe") / "tokenizer"
    return train_bpe(texts, vocab_size=1024, out_dir=str(out), show_progress=False)


def random_model(family: str, **overrides) -> Decoder:
    """The tiny preset, seeded; weights ~N(0, 0.2) and norm gains 1 +- 0.3 (or 0 +- 0.3 for 1 + w norms).

    Gemma multiplies its embeddings by sqrt(d_model): left at N(0, 0.2) they would swamp the residual stream
    and, tied to the output, make every step predict its input token again. They are scaled back to match.
    """
    model = Decoder.build(preset(f"{family}_tiny", vocab_size=1024, init_std=0.2, **overrides), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
        if model.cfg.scale_embeddings:
            model.tok_embeddings.weight.div_(model.cfg.d_model**0.5)
    return model.eval()


def llama(path: str | Path, **kwargs) -> llama_cpp.Llama:
    # One thread: an idle OpenMP pool of a previous model would spin against torch's threads.
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=128, n_batch=128, n_threads=1, n_threads_batch=1, logits_all=True,
        type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False, **kwargs,
    )  # fmt: skip


def llama_cpp_greedy(llm: llama_cpp.Llama, prompt: list[int], n: int) -> tuple[np.ndarray, list[int]]:
    """The prompt's logits [T, vocab], then n tokens each the argmax of llama.cpp's next-token logits."""
    llm.reset()
    llm.eval(prompt)
    prompt_logits = np.array(llm.scores[: len(prompt)])
    tokens = []
    for _ in range(n):
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([tokens[-1]])
    return prompt_logits, tokens


# Llama 3, Qwen3 and Gemma 3 must agree on all 32 tokens outright (their greedy paths here have no ties).
EXACT = ("llama3", "qwen3", "gemma3")


@pytest.mark.parametrize("family", list(FAMILY_KNOBS))
def test_llama_cpp_generates_our_greedy_tokens(tmp_path, tok, family: str) -> None:
    model = random_model(family)
    path = to_gguf(model, tmp_path / f"{family}.gguf", tok, dtype="f32")
    prompt = tok.encode(PROMPT)
    [ours] = Generator(model).generate([prompt], 32, SamplingParams(temperature=0))
    with torch.no_grad():
        our_logits = model(torch.tensor([prompt]))[0].numpy()
        # Our logits along our own greedy path, to tell a real difference from a tie within rounding.
        path_logits = model(torch.tensor([prompt + ours.token_ids]))[0, len(prompt) - 1 :].numpy()

    llm = llama(path)
    logits, tokens = llama_cpp_greedy(llm, prompt, 32)
    llm.close()
    # Gemma's GELU runs through a float16 table in ggml: logits ~1e-3 off; every other family ~1e-5.
    tol = 3e-3 if family.startswith("gemma") else 1e-4
    scale = np.abs(our_logits).max()
    assert np.abs(logits - our_logits).max() <= tol * scale, family
    assert len(set(ours.token_ids)) > 1, ours.token_ids  # a real sequence, not one token repeated
    if family in EXACT:
        assert tokens == ours.token_ids
        return
    # Elsewhere a divergence is accepted only where our two best logits are closer than the rounding.
    differ = next((i for i, (a, b) in enumerate(zip(tokens, ours.token_ids)) if a != b), None)
    if differ is not None:
        top2 = np.sort(path_logits[differ])[-2:]
        assert top2[1] - top2[0] <= 2 * tol * scale, f"{family}: token {differ} differs without a tie"


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_smaller_dtypes_are_what_llama_cpps_own_quantizer_writes(tmp_path, tok, dtype: str) -> None:
    """Our f16 / bf16 / q8_0 tensors are byte for byte what llama.cpp's llama_model_quantize makes of our f32
    file, and the type of every tensor is the one it picks."""
    model = random_model("qwen3")
    f32 = to_gguf(model, tmp_path / "f32.gguf", tok, dtype="f32")
    ours = to_gguf(model, tmp_path / f"{dtype}.gguf", tok, dtype=dtype)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"f16": 1, "bf16": 32, "q8_0": 7}[dtype]  # LLAMA_FTYPE_MOSTLY_*
    theirs = str(tmp_path / "theirs.gguf")
    assert llama_cpp.llama_model_quantize(f32.encode(), theirs.encode(), ctypes.byref(params)) == 0
    a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type, name
        assert np.array_equal(np.asarray(a[name].data), np.asarray(b[name].data)), name


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_smaller_dtypes_run_in_llama_cpp_close_to_fp32(tmp_path, tok, monkeypatch, dtype: str) -> None:
    if dtype == "q8_0":
        # llama.cpp's extra CPU buffer types (AMX / repacked Q8_0 kernels) crash on some x86 machines, on any
        # Q8_0 file, its own quantizer's too: load with the plain CPU kernels, as `--no-repack` does.
        plain = llama_cpp.llama_cpp.llama_model_default_params

        def without_extra_buffers():
            params = plain()
            params.use_extra_bufts = False
            return params

        monkeypatch.setattr(llama_cpp.llama.llama_cpp, "llama_model_default_params", without_extra_buffers)
    model = random_model("llama3")
    prompt = tok.encode(PROMPT)
    with torch.no_grad():
        our_logits = model(torch.tensor([prompt]))[0].numpy()
    llm = llama(to_gguf(model, tmp_path / "m.gguf", tok, dtype=dtype))
    logits, _ = llama_cpp_greedy(llm, prompt, 1)
    llm.close()
    # Weights rounded to 11 (f16) or 8 (bf16) significant bits, or to 8-bit blocks (q8_0, whose activations
    # llama.cpp also quantizes to 8 bits), in a random 4-layer model without QK-norm: errors compound, so
    # q8_0 is held to the direction of the logits only (its tensors are llama.cpp's own bytes: test above).
    cosine = (
        (logits * our_logits).sum(-1) / np.linalg.norm(logits, axis=-1) / np.linalg.norm(our_logits, axis=-1)
    )
    assert cosine.min() > {"f16": 0.9999, "bf16": 0.99, "q8_0": 0.9}[dtype], cosine.min()
    if dtype != "q8_0":
        err = np.abs(logits - our_logits).max() / np.abs(our_logits).max()
        assert err < {"f16": 2e-2, "bf16": 1e-1}[dtype], err


@pytest.mark.parametrize("tokenizer_dir", [GPT2, QWEN3], ids=["gpt-2", "qwen2"])
def test_llama_cpp_tokenizes_text_as_we_do(tmp_path, tokenizer_dir: Path) -> None:
    real = load_tokenizer(str(tokenizer_dir))
    rows = -(-real.vocab_size // 64) * 64
    model = Decoder.build(preset("qwen3_tiny", vocab_size=rows, d_model=64, n_layers=1, head_dim=16), seed=0)
    extras = read_tokenizer_extras(tokenizer_dir)
    path = to_gguf(model, tmp_path / "m.gguf", real, dtype="q8_0", extras=extras)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == real.encode(text), text
    assert llm.token_eos() == real.eos_id
    if extras.chat_template:
        assert llm.metadata["tokenizer.chat_template"] == extras.chat_template
    llm.close()
