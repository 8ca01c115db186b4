"""Write a model as one GGUF file that llama.cpp runs: tensors under llama.cpp's names, the metadata its
loader reads, and the tokenizer (byte-level BPE) with its chat template.

    to_gguf(model, "model.gguf", tokenizer, dtype="f16")

What llama.cpp expects differs from a Hugging Face checkpoint in a few places, all handled here:

  * names: `blk.{i}.attn_q.weight` for our `layers.{i}.attention.wq.weight`, and so on (LAYER_TENSOR_NAMES);
    GLM-4's gate and up projections travel fused as one `ffn_up` (gate rows first), experts as 3-D tensors;
  * RoPE layout: llama.cpp's "llama" architecture rotates adjacent pairs (x0, x1), (x2, x3).., while our model
    (like transformers) rotates the two halves of each head. The rows of W_q and W_k are reordered so that
    the same dimensions pair up (`interleave_rotary_rows`); the other architectures rotate halves too;
  * Gemma's RMSNorm gain is (1 + w): llama.cpp stores the gain itself, so every norm weight gets +1;
  * tied embeddings: no `output.weight`, llama.cpp reuses `token_embd` (except OLMo 2, which needs both);
  * Llama 3.1 RoPE scaling travels as a `rope_freqs` tensor of per-frequency divisors;
  * the vocabulary is padded with unused `[PAD{id}]` tokens up to the model's (padded) embedding rows.

Everything llama.cpp would run differently from our model (a knob its architecture hard-codes otherwise) is
refused before anything is written, with every problem named (`check_gguf_exportable`).
The file is written under a temporary name beside the target and renamed into place when complete.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from forge_lm.trainer.hub.families import check_expressible, hf_family
from forge_lm.trainer.model.config import ModelConfig
from forge_lm.trainer.model.decoder import Decoder
from forge_lm.trainer.model.rope import rope_frequencies

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
"""What the large weight matrices are stored as. Norms, biases, routers and rope_freqs always stay f32."""


class GGUFExportError(ValueError):
    """The model or tokenizer cannot be written as a GGUF file that llama.cpp runs the same way."""


# ---- architectures ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFArch:
    """How llama.cpp names and runs one of our families."""

    name: str
    """llama.cpp architecture (general.architecture; the prefix of the model's metadata keys)."""
    activation: str
    """The MLP activation llama.cpp's graph hard-codes for it (our ModelConfig.activation value)."""
    interleaved_rope: bool = False
    """llama.cpp rotates adjacent pairs (its "norm" RoPE): W_q / W_k rows of a halves-rotating model are
    reordered. (GLM-4 is trained with interleaved pairs already, so its weights are left alone.)"""
    output: str = "optional"
    """The output matrix: "optional" (tied models omit it and llama.cpp reuses token_embd), "required"
    (written even when tied), "never" (llama.cpp always uses token_embd: untied models are refused)."""


GGUF_ARCHS: dict[str, GGUFArch] = {
    "llama": GGUFArch("llama", "silu", interleaved_rope=True),
    # llama.cpp runs Mixtral as a Llama with experts.
    "mixtral": GGUFArch("llama", "silu", interleaved_rope=True),
    "qwen2": GGUFArch("qwen2", "silu"),
    "qwen3": GGUFArch("qwen3", "silu"),
    "qwen3_moe": GGUFArch("qwen3moe", "silu"),
    "gemma": GGUFArch("gemma", "gelu_tanh", output="never"),
    "gemma2": GGUFArch("gemma2", "gelu_tanh", output="never"),
    "gemma3": GGUFArch("gemma3", "gelu_tanh"),
    "glm4": GGUFArch("glm4", "silu"),
    "olmo2": GGUFArch("olmo2", "silu", output="required"),
}
"""Our family (ModelConfig.family) -> its llama.cpp architecture. Every family we have is supported."""

GLOBAL_TENSOR_NAMES = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
}

LAYER_TENSOR_NAMES = {
    "attention_norm.weight": "attn_norm.weight",
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "attention.wq.bias": "attn_q.bias",
    "attention.wk.bias": "attn_k.bias",
    "attention.wv.bias": "attn_v.bias",
    "attention.q_norm.weight": "attn_q_norm.weight",
    "attention.k_norm.weight": "attn_k_norm.weight",
    "post_attention_norm.weight": "post_attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
    "post_ffn_norm.weight": "post_ffw_norm.weight",
    "feed_forward.router.weight": "ffn_gate_inp.weight",
    "feed_forward.experts.w1": "ffn_gate_exps.weight",
    "feed_forward.experts.w3": "ffn_up_exps.weight",
    "feed_forward.experts.w2": "ffn_down_exps.weight",
}
"""Our name inside `layers.{i}.` -> llama.cpp's inside `blk.{i}.`. The same for every family: our block always
names its norms by position (pre/post attention, pre/post MLP), which is how llama.cpp names them too."""

# Tensors llama.cpp reads only in float32, whatever the file's type (as its own converter writes them).
_ALWAYS_F32 = ("_norm.weight", ".bias", "ffn_gate_inp.weight", "rope_freqs.weight")


def gguf_arch(family: str) -> GGUFArch:
    if family not in GGUF_ARCHS:
        raise GGUFExportError(
            f"model family {family!r} has no llama.cpp architecture; supported: {sorted(GGUF_ARCHS)}."
        )
    return GGUF_ARCHS[family]


def llama_cpp_query_scalar(cfg: ModelConfig) -> float:
    """The query_pre_attn_scalar llama.cpp uses for Gemma 2 / 3: it picks it from the layer count
    (d_model / n_heads for the 27B shapes, 46 or 62 layers; head_dim otherwise), not from the file."""
    big = {"gemma2": 46, "gemma3": 62}.get(cfg.family)
    return cfg.d_model / cfg.n_heads if cfg.n_layers == big else float(cfg.head_dim)


def check_gguf_exportable(cfg: ModelConfig) -> GGUFArch:
    """Raise GGUFExportError naming every knob that llama.cpp would run differently; else the architecture."""
    arch = gguf_arch(cfg.family)
    try:  # what the Hugging Face class cannot express, llama.cpp's architecture (a subset of it) cannot either
        check_expressible(cfg, hf_family(cfg.family))
    except ValueError as e:
        raise GGUFExportError(str(e)) from e
    if cfg.vocab_size is None:
        raise GGUFExportError(
            "cannot export a config with vocab_size=None: fill it from the tokenizer first."
        )
    problems = []
    where = f"llama.cpp's {arch.name} architecture"
    if cfg.activation != arch.activation:
        problems.append(f"model.activation={cfg.activation!r} ({where} always uses {arch.activation!r})")
    if cfg.rope_scaling.kind == "llama3" and arch.name != "llama":
        problems.append(f"model.rope_scaling.kind='llama3' ({where} has no per-frequency RoPE factors)")
    if arch.output == "never" and not cfg.tie_embeddings:
        problems.append(f"model.tie_embeddings=False ({where} always reuses the embedding as output)")
    if cfg.is_moe and not cfg.moe.renormalize:
        problems.append(f"model.moe.renormalize=False ({where} always renormalises the top-k weights)")
    if cfg.is_moe and cfg.moe.balance == "bias":
        problems.append(f"model.moe.balance=bias ({where} chooses experts without a routing bias)")
    if cfg.family == "mixtral" and cfg.sliding_window is not None:
        problems.append(f"model.sliding_window={cfg.sliding_window} ({where} has no sliding window)")
    if cfg.family == "olmo2" and cfg.head_dim * cfg.n_heads != cfg.d_model:
        problems.append(
            f"model.head_dim={cfg.head_dim} ({where} derives the head width as d_model / n_heads = "
            f"{cfg.d_model // cfg.n_heads})"
        )
    if cfg.family == "gemma2":
        for knob in ("attn_softcap", "final_softcap"):
            if getattr(cfg, knob) is None:
                problems.append(f"model.{knob}=None ({where} always soft-caps; give the cap)")
    if cfg.attn_softcap is not None and cfg.family != "gemma2":
        problems.append(f"model.attn_softcap={cfg.attn_softcap} ({where} never soft-caps attention scores)")
    if cfg.family in ("gemma2", "gemma3"):
        ours, theirs = cfg.query_pre_attn_scalar or cfg.head_dim, llama_cpp_query_scalar(cfg)
        if ours != theirs:
            problems.append(
                f"model.query_pre_attn_scalar={ours:g} (llama.cpp uses {theirs:g} for a {cfg.n_layers}-layer "
                f"{arch.name})"
            )
    has_local = any(cfg.is_sliding(i) for i in range(cfg.n_layers))
    if (
        cfg.family == "gemma3"
        and has_local
        and cfg.rope_local_theta is None
        and cfg.rope_scaling.kind != "none"
    ):
        problems.append(
            f"model.rope_local_theta=None with model.rope_scaling.kind={cfg.rope_scaling.kind!r} ({where} never "
            "scales the local layers' RoPE; set model.rope_local_theta)"
        )
    if problems:
        raise GGUFExportError(f"cannot export family {cfg.family!r} to GGUF: " + "; ".join(problems) + ".")
    return arch


# ---- tensors ------------------------------------------------------------------------------------------------------


def interleave_rotary_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the output rows of W_q or W_k (or a bias) from halves-RoPE to interleaved-pairs RoPE.

    Within each head, row i (i < d/2) pairs with row i + d/2 under the halves layout; llama.cpp's "norm"
    RoPE pairs rows 2i and 2i + 1. So new row 2i is old row i and new row 2i + 1 is old row i + d/2.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> llama.cpp's tensors (float32, names, layout and values as llama.cpp reads them)."""
    arch = check_gguf_exportable(cfg)
    sd = {k: v.detach().to(device="cpu", dtype=torch.float32) for k, v in state_dict.items()}
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for name, t in sd.items():
        if name == "output.weight" and cfg.tie_embeddings and arch.output != "required":
            continue  # llama.cpp reuses token_embd
        if name in GLOBAL_TENSOR_NAMES:
            out[GLOBAL_TENSOR_NAMES[name]] = t
            continue
        layer, _, suffix = name.removeprefix("layers.").partition(".")
        if not (name.startswith("layers.") and layer.isdigit() and suffix in LAYER_TENSOR_NAMES):
            unknown.append(name)
            continue
        if arch.interleaved_rope and suffix.startswith(("attention.wq.", "attention.wk.")):
            t = interleave_rotary_rows(t, cfg.n_heads if ".wq." in suffix else cfg.n_kv_heads)
        out[f"blk.{layer}.{LAYER_TENSOR_NAMES[suffix]}"] = t
    if unknown:
        raise GGUFExportError(f"no llama.cpp name for tensors: {unknown}")
    if cfg.norm_unit_offset:  # Gemma: llama.cpp multiplies by the stored gain, ours by (1 + w)
        out = {k: v + 1.0 if k.endswith("norm.weight") else v for k, v in out.items()}
    if cfg.family == "glm4":  # GLM-4's MLP input is one fused [gate; up] projection
        for i in range(cfg.n_layers):
            gate, up = out.pop(f"blk.{i}.ffn_gate.weight"), out.pop(f"blk.{i}.ffn_up.weight")
            out[f"blk.{i}.ffn_up.weight"] = torch.cat([gate, up], dim=0)
    if cfg.rope_scaling.kind == "llama3":
        # llama.cpp divides each base frequency by its factor: factor = unscaled / scaled frequency.
        plain = rope_frequencies(cfg.rotary_dim, cfg.rope_theta)
        out["rope_freqs.weight"] = plain / rope_frequencies(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling)
    return out


def storage_type(name: str, t: torch.Tensor, dtype: str) -> str:
    """The GGML type a tensor is stored as: one of GGUF_DTYPES. 1-D tensors, norms, biases and the MoE router
    stay f32 (llama.cpp's own converter does the same); q8_0 falls back to f16 for rows not a multiple of 32."""
    if dtype not in GGUF_DTYPES:
        raise GGUFExportError(f"unknown GGUF dtype {dtype!r}: choose one of {list(GGUF_DTYPES)}.")
    if t.dim() <= 1 or name.endswith(_ALWAYS_F32):
        return "f32"
    if dtype == "q8_0" and t.shape[-1] % 32 != 0:
        return "f16"
    return dtype


# ---- metadata -----------------------------------------------------------------------------------------------------


def model_metadata(cfg: ModelConfig, dtype: str = "f32") -> dict[str, Any]:
    """The key/values llama.cpp's loader reads for this model (tokenizer keys aside): ints are uint32,
    floats float32, lists arrays."""
    import gguf

    arch = check_gguf_exportable(cfg)
    a = arch.name
    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    keys: dict[str, Any] = {
        "general.file_type": int(file_types[dtype]),
        "general.quantization_version": int(gguf.GGML_QUANT_VERSION),
        f"{a}.vocab_size": cfg.vocab_size,
        f"{a}.context_length": cfg.max_seq_len,
        f"{a}.embedding_length": cfg.d_model,
        f"{a}.block_count": cfg.n_layers,
        f"{a}.feed_forward_length": cfg.ffn_dim,
        f"{a}.attention.head_count": cfg.n_heads,
        f"{a}.attention.head_count_kv": cfg.n_kv_heads,
        f"{a}.attention.key_length": cfg.head_dim,
        f"{a}.attention.value_length": cfg.head_dim,
        f"{a}.attention.layer_norm_rms_epsilon": float(cfg.norm_eps),
        f"{a}.rope.freq_base": float(cfg.rope_theta),
        f"{a}.rope.dimension_count": cfg.rotary_dim,
    }
    if cfg.rope_scaling.kind == "linear":
        keys[f"{a}.rope.scaling.type"] = "linear"
        keys[f"{a}.rope.scaling.factor"] = float(cfg.rope_scaling.factor)
    if cfg.is_moe:
        keys[f"{a}.expert_count"] = cfg.moe.num_experts
        keys[f"{a}.expert_used_count"] = cfg.moe.top_k
        if a == "qwen3moe":
            keys[f"{a}.expert_feed_forward_length"] = cfg.ffn_dim
    if cfg.attn_softcap is not None:
        keys[f"{a}.attn_logit_softcapping"] = float(cfg.attn_softcap)
    if cfg.final_softcap is not None:
        keys[f"{a}.final_logit_softcapping"] = float(cfg.final_softcap)
    if a in ("gemma2", "gemma3") and cfg.sliding_window is not None:
        keys[f"{a}.attention.sliding_window"] = cfg.sliding_window
    if a == "gemma2" or (a == "gemma3" and cfg.sliding_window is not None):
        # Which layers are local, spelled out per layer rather than left to llama.cpp's default period.
        keys[f"{a}.attention.sliding_window_pattern"] = [cfg.is_sliding(i) for i in range(cfg.n_layers)]
        if cfg.rope_local_theta is not None or a == "gemma3":
            keys[f"{a}.rope.freq_base_swa"] = float(cfg.rope_local_theta or cfg.rope_theta)
    return keys


# ---- tokenizer ----------------------------------------------------------------------------------------------------

# Split regexes of byte-level BPE pre-tokenizers -> the llama.cpp pre-tokenizer that implements each.
_KNOWN_SPLITS = {
    # Llama 3
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "llama-bpe",
    # Qwen2, Qwen2.5, Qwen3
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "qwen2",
}

TOKEN_NORMAL, TOKEN_USER_DEFINED, TOKEN_CONTROL, TOKEN_UNUSED = 1, 4, 3, 5
"""llama.cpp's token types (gguf.TokenType)."""


@dataclass
class TokenizerExtras:
    """What llama.cpp takes from a tokenizer folder besides the tokenizer itself (tokenizer_config.json)."""

    chat_template: Optional[Any] = None
    """A Jinja template string, or transformers' list of {"name", "template"} named templates."""
    pad_token: Optional[str] = None


def read_tokenizer_extras(tokenizer_path: Optional[str | os.PathLike[str]]) -> TokenizerExtras:
    """The chat template and pad token beside a tokenizer (its directory, or the directory of its file):
    tokenizer_config.json's `chat_template` / `pad_token`, or a chat_template.jinja file."""
    if tokenizer_path is None:
        return TokenizerExtras()
    folder = Path(tokenizer_path)
    folder = folder if folder.is_dir() else folder.parent
    config: dict[str, Any] = {}
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise GGUFExportError(f"{config_file}: unreadable ({e}): fix or delete it.") from e
    template = config.get("chat_template")
    jinja = folder / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    pad = config.get("pad_token")
    if isinstance(pad, dict):
        pad = pad.get("content")
    return TokenizerExtras(chat_template=template or None, pad_token=pad if isinstance(pad, str) else None)


def tokenizer_pre(tokenizer_json: Mapping[str, Any]) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for a byte-level BPE's pre-tokenizer, or GGUFExportError.

    A bare ByteLevel pre-tokenizer with its built-in regex is GPT-2's split, which llama.cpp calls "gpt-2"
    (the tokenizers our `train_bpe` makes, and GPT-2's own). A Split by a known regex followed by a ByteLevel
    without regex is Llama 3's ("llama-bpe") or Qwen's ("qwen2").
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return "gpt-2"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in _KNOWN_SPLITS:
            return _KNOWN_SPLITS[regex]
    raise GGUFExportError(
        f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) matches none that llama.cpp implements and "
        "forge knows (GPT-2's byte-level split, Llama 3's, Qwen's): export with a byte-level BPE tokenizer "
        "(e.g. one trained by `forge prepare`)."
    )


def tokenizer_metadata(
    tokenizer: Any, vocab_size: int, extras: Optional[TokenizerExtras] = None
) -> dict[str, Any]:
    """tokenizer.* keys for a byte-level BPE `Tokenizer` (data/tokenizer.py) and a model of `vocab_size` rows."""
    extras = extras or TokenizerExtras()
    doc = json.loads(tokenizer.backend.to_str())
    model = doc.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFExportError(
            f"the tokenizer is a {model.get('type')} model: GGUF export supports byte-level BPE tokenizers."
        )
    decoder = doc.get("decoder") or {}
    decoders = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
    if not any(d.get("type") == "ByteLevel" for d in decoders):
        raise GGUFExportError(
            "the tokenizer is not byte-level (no ByteLevel decoder): llama.cpp's gpt2 model needs one."
        )
    pre = tokenizer_pre(doc)

    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types = dict.fromkeys(by_id, TOKEN_NORMAL)
    for added in doc.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = TOKEN_CONTROL if added.get("special") else TOKEN_USER_DEFINED
    if max(by_id) >= vocab_size:
        raise GGUFExportError(
            f"the tokenizer has ids up to {max(by_id)} but the model's vocabulary holds {vocab_size}: export "
            "with the tokenizer the model was trained with."
        )
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    token_types = [types.get(i, TOKEN_UNUSED) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    keys: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": token_types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.eos_token_id": tokenizer.eos_id,
        # Documents were framed in training by the tokenizer's policy: llama.cpp frames prompts the same way.
        "tokenizer.ggml.add_bos_token": bool(tokenizer.add_bos),
        "tokenizer.ggml.add_eos_token": False,
    }
    if tokenizer.bos_id is not None:
        keys["tokenizer.ggml.bos_token_id"] = tokenizer.bos_id
    pad_id = tokenizer.backend.token_to_id(extras.pad_token) if extras.pad_token else None
    if pad_id is not None:
        keys["tokenizer.ggml.padding_token_id"] = pad_id
    # A chat tokenizer (trainer/posttrain/chat.py) carries its template and end-of-turn token itself.
    end_of_turn = getattr(tokenizer, "end_of_turn_id", None)
    if end_of_turn is not None:
        keys["tokenizer.ggml.eot_token_id"] = end_of_turn
    template = getattr(tokenizer, "chat_template", None) or extras.chat_template
    if isinstance(template, str):
        keys["tokenizer.chat_template"] = template
    elif template:  # named templates: "default" is the main one, the others keep their names
        for choice in template:
            suffix = "" if choice.get("name") == "default" else f".{choice['name']}"
            keys[f"tokenizer.chat_template{suffix}"] = choice["template"]
    return keys


# ---- writing ------------------------------------------------------------------------------------------------------


def to_gguf(
    model: Decoder,
    out_path: str | os.PathLike[str],
    tokenizer: Any,
    dtype: str = "f16",
    extras: Optional[TokenizerExtras] = None,
    name: Optional[str] = None,
) -> str:
    """Write `model` and its byte-level BPE `tokenizer` (data/tokenizer.py) to the GGUF file `out_path`.

    dtype: what the weight matrices are stored as (GGUF_DTYPES). The model must hold full (unsharded) tensors.
    The file appears complete or not at all: it is written under a hidden temporary name in the same
    directory and renamed into place, replacing an earlier export.
    """
    import gguf

    cfg = model.cfg
    if dtype not in GGUF_DTYPES:
        raise GGUFExportError(f"unknown GGUF dtype {dtype!r}: choose one of {list(GGUF_DTYPES)}.")
    arch = check_gguf_exportable(cfg)
    keys = {
        "general.name": name or f"forge-lm {cfg.family}",
        **model_metadata(cfg, dtype),
        **tokenizer_metadata(tokenizer, cfg.vocab_size, extras),
    }
    tensors = gguf_tensors(model.state_dict(), cfg)

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # A hidden unique sibling (created by the writer with the usual permissions), renamed when complete.
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        writer = gguf.GGUFWriter(tmp, arch.name)
        for key, value in keys.items():
            _add_key(writer, key, value)
        for tensor_name in list(tensors):
            t = tensors.pop(tensor_name)  # the float32 copy goes as soon as its encoding is held
            kind = storage_type(tensor_name, t, dtype)
            data, qtype = _encode(t.numpy(), kind)
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return str(out)


def _encode(array: np.ndarray, kind: str) -> tuple[np.ndarray, Any]:
    import gguf

    qtype = {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }[kind]
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype), qtype


def _add_key(writer: Any, key: str, value: Any) -> None:
    if isinstance(value, bool):  # before int: a bool is an int to Python
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise GGUFExportError(f"metadata {key}={value} is not finite.")
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list):
        writer.add_array(key, value)
    else:
        raise TypeError(f"metadata {key}: unsupported value type {type(value).__name__}")
