"""Translation between our model and Hugging Face checkpoints: config fields and tensor names.

This is the one place that knows each architecture family's HF conventions. A family is an entry in
FAMILIES: its HF class and model_type, how to write and read its config.json, and how its tensor names
map to ours. Only Llama is supported today; Qwen, Mistral, Gemma etc. become new entries (with their
own config readers that refuse what our decoder cannot represent, e.g. Qwen2's q/k/v biases).

No file I/O here: see export.py (writing) and load.py (reading).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from trainer.model.config import ModelConfig
from trainer.model.decoder import Decoder


@dataclass(frozen=True)
class Family:
    """Everything that differs between HF architectures that our decoder can represent."""

    architecture: str
    """HF class written into config.json's "architectures" (what AutoModelForCausalLM instantiates)."""
    model_type: str
    """HF config "model_type"."""
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]
    """The architecture fields of config.json (the fields common to all families are added by the caller)."""
    config_from_hf: Callable[[Mapping[str, Any]], ModelConfig]
    """Read config.json; raise ValueError for anything our decoder cannot reproduce exactly."""
    global_names: Mapping[str, str]
    """Our parameter name -> HF name, outside the layer stack."""
    layer_names: Mapping[str, str]
    """Our name inside `layers.{i}.` -> HF name inside `model.layers.{i}.`."""
    ignored_hf_names: tuple[str, ...] = ()
    """Regexes of HF tensors that carry no weights of ours and are dropped on import."""


# ---- Llama ----------------------------------------------------------------------------------------------------


def _llama_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # The RoPE base is written twice, on purpose. transformers 4.x reads the top-level `rope_theta`
        # (and `rope_scaling`, which must stay null). transformers 5.x moved it into `rope_parameters` and
        # gives that dict priority, falling back to the top-level key only when the dict lacks it.
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "pretraining_tp": 1,
        "use_cache": True,
    }


def _llama_rope_theta(d: Mapping[str, Any]) -> float:
    """The RoPE base of a Llama config written by transformers 4.x or 5.x; refuse any RoPE scaling."""
    # 4.x: rope_theta + rope_scaling (null, or a dict for llama3/yarn/linear/dynamic scaling).
    # 5.x: rope_parameters {"rope_type", "rope_theta", ...}; 5.x also reads rope_scaling as its old name.
    theta = d.get("rope_theta", 10000.0)
    for key in ("rope_scaling", "rope_parameters"):  # later wins, as in 5.x
        params = d.get(key)
        if params is None:
            continue
        if not isinstance(params, Mapping):
            raise ValueError(f"llama config: {key}={params!r} is not a dict.")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise ValueError(
                f"llama config: {key} with rope_type={rope_type!r} is not supported (only plain RoPE, "
                f"rope_type 'default'); got {dict(params)}."
            )
        partial = params.get("partial_rotary_factor", 1.0)
        if partial != 1.0:
            raise ValueError(f"llama config: partial_rotary_factor={partial} is not supported (only 1.0).")
        theta = params.get("rope_theta", theta)
    if d.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(
            f"llama config: partial_rotary_factor={d['partial_rotary_factor']} is not supported."
        )
    return float(theta)


def _llama_config_from_hf(d: Mapping[str, Any]) -> ModelConfig:
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in required if d.get(k) is None]
    if missing:
        raise ValueError(f"llama config: missing required fields {missing}.")
    # Defaults are LlamaConfig's, for keys that old or hand-written configs may omit.
    unsupported = {
        "hidden_act": (d.get("hidden_act", "silu"), "silu"),
        "attention_bias": (bool(d.get("attention_bias", False)), False),
        "mlp_bias": (bool(d.get("mlp_bias", False)), False),
    }
    for key, (value, ours) in unsupported.items():
        if value != ours:
            raise ValueError(
                f"llama config: {key}={value!r} is not supported by our decoder (only {ours!r})."
            )
    hidden, n_heads = int(d["hidden_size"]), int(d["num_attention_heads"])
    head_dim = d.get("head_dim")
    if head_dim is not None and int(head_dim) * n_heads != hidden:
        raise ValueError(
            f"llama config: head_dim={head_dim} differs from hidden_size/num_attention_heads="
            f"{hidden}/{n_heads}; a decoupled head_dim is not supported."
        )
    return ModelConfig(
        family="llama",
        vocab_size=int(d["vocab_size"]),
        d_model=hidden,
        n_layers=int(d["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(d.get("num_key_value_heads") or n_heads),
        ffn_dim=int(d["intermediate_size"]),
        max_seq_len=int(d.get("max_position_embeddings", 2048)),
        rope_theta=_llama_rope_theta(d),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        init_std=float(d.get("initializer_range", 0.02)),
    )


FAMILIES: dict[str, Family] = {
    "llama": Family(
        architecture="LlamaForCausalLM",
        model_type="llama",
        config_to_hf=_llama_config_to_hf,
        config_from_hf=_llama_config_from_hf,
        global_names={
            "tok_embeddings.weight": "model.embed_tokens.weight",
            "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight",
        },
        layer_names={
            "attention_norm.weight": "input_layernorm.weight",
            "attention.wq.weight": "self_attn.q_proj.weight",
            "attention.wk.weight": "self_attn.k_proj.weight",
            "attention.wv.weight": "self_attn.v_proj.weight",
            "attention.wo.weight": "self_attn.o_proj.weight",
            "ffn_norm.weight": "post_attention_layernorm.weight",
            "feed_forward.w1.weight": "mlp.gate_proj.weight",
            "feed_forward.w3.weight": "mlp.up_proj.weight",
            "feed_forward.w2.weight": "mlp.down_proj.weight",
        },
        # Checkpoints from transformers < 4.31 saved the (derived) RoPE frequencies.
        ignored_hf_names=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),
    ),
}
"""Our family name (ModelConfig.family) -> its HF conventions."""


def _family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"model family {name!r} has no Hugging Face mapping; supported: {sorted(FAMILIES)}.")
    return FAMILIES[name]


# ---- config -----------------------------------------------------------------------------------------------------


def model_config_to_hf(
    cfg: ModelConfig, bos_id: int | None, eos_id: int | None, torch_dtype: str
) -> dict[str, Any]:
    """config.json contents for `cfg`, loadable by transformers 4.4x and 5.x. torch_dtype: e.g. "bfloat16"."""
    if cfg.vocab_size is None:
        raise ValueError("cannot export a config with vocab_size=None: fill it from the tokenizer first.")
    family = _family(cfg.family)
    return {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        **family.config_to_hf(cfg),
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": torch_dtype,  # transformers 4.x name
        "dtype": torch_dtype,  # transformers 5.x name
    }


def hf_config_to_model_config(d: Mapping[str, Any]) -> ModelConfig:
    """Our ModelConfig from a config.json dict; ValueError for unsupported families or features."""
    model_type = d.get("model_type")
    supported = {f.model_type: f for f in FAMILIES.values()}
    if model_type not in supported:
        raise ValueError(
            f"Hugging Face model_type {model_type!r} is not supported; supported model types: {sorted(supported)}."
        )
    return supported[model_type].config_from_hf(d)


# ---- tensor names -----------------------------------------------------------------------------------------------

_OUR_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _hf_name(name: str, family: Family) -> str | None:
    if name in family.global_names:
        return family.global_names[name]
    m = _OUR_LAYER.fullmatch(name)
    if m and m.group(2) in family.layer_names:
        return f"model.layers.{m.group(1)}.{family.layer_names[m.group(2)]}"
    return None


def _our_name(hf_name: str, family: Family) -> str | None:
    for ours, theirs in family.global_names.items():
        if hf_name == theirs:
            return ours
    m = _HF_LAYER.fullmatch(hf_name)
    if m:
        for ours, theirs in family.layer_names.items():
            if m.group(2) == theirs:
                return f"layers.{m.group(1)}.{ours}"
    return None


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.device == b.device and a.data_ptr() == b.data_ptr())


def to_hf_state_dict(
    model_sd: Mapping[str, torch.Tensor], tie_embeddings: bool | None = None, family: str = "llama"
) -> dict[str, torch.Tensor]:
    """Our state dict -> HF tensor names (the tensors themselves are not copied).

    With tied embeddings the output matrix is dropped: HF stores it once, as the embedding, and
    safetensors refuses tensors that share memory anyway. tie_embeddings=None: detect the tie by memory.
    """
    fam = _family(family)
    if tie_embeddings is None:
        out, emb = model_sd.get("output.weight"), model_sd.get("tok_embeddings.weight")
        tie_embeddings = out is None or (emb is not None and _shares_memory(out, emb))
    hf_sd: dict[str, torch.Tensor] = {}
    unknown = []
    for name, tensor in model_sd.items():
        if tie_embeddings and name == "output.weight":
            continue
        hf_name = _hf_name(name, fam)
        if hf_name is None:
            unknown.append(name)
        else:
            hf_sd[hf_name] = tensor
    if unknown:
        raise ValueError(f"no Hugging Face ({fam.architecture}) name for: {unknown}")
    return hf_sd


def from_hf_state_dict(hf_sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensors -> a state dict that `Decoder(cfg).load_state_dict(..., strict=True)` accepts.

    Raises ValueError listing missing and unexpected tensors, or tensors of the wrong shape.
    With tied embeddings `output.weight` is the embedding tensor (an lm_head in the file is ignored).
    """
    fam = _family(cfg.family)
    sd: dict[str, torch.Tensor] = {}
    unexpected = []
    for hf_name, tensor in hf_sd.items():
        if any(re.fullmatch(p, hf_name) for p in fam.ignored_hf_names):
            continue
        name = _our_name(hf_name, fam)
        if name is None:
            unexpected.append(hf_name)
        elif not (cfg.tie_embeddings and name == "output.weight"):
            sd[name] = tensor
    if cfg.tie_embeddings and "tok_embeddings.weight" in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"]

    # The expected names and shapes, from a model on the meta device (costs no memory).
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Decoder(cfg).state_dict().items()}
    missing = [_hf_name(k, fam) or k for k in expected if k not in sd]
    wrong_shape = [
        f"{_hf_name(k, fam)}: {tuple(v.shape)} in checkpoint, {tuple(expected[k])} expected"
        for k, v in sd.items()
        if k in expected and v.shape != expected[k]
    ]
    if missing or unexpected or wrong_shape:
        problems = []
        if missing:
            problems.append(f"missing tensors ({len(missing)}): {_preview(missing)}")
        if unexpected:
            problems.append(f"unexpected tensors ({len(unexpected)}): {_preview(unexpected)}")
        if wrong_shape:
            problems.append(f"wrong shapes ({len(wrong_shape)}): {_preview(wrong_shape)}")
        raise ValueError(f"checkpoint does not match the {fam.architecture} config: " + "; ".join(problems))
    return sd


def _preview(items: list[str], n: int = 10) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")
