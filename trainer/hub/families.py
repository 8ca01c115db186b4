"""The Hugging Face side of every supported family, in one place: class, config.json fields, tensor names.

An HFFamily says
  * which of our knobs its transformers class hard-codes (`fixed`: e.g. Qwen2 always has q/k/v biases),
  * which knobs its config.json can express (`configurable`) and how (`write_config` / `read_config`);
    every other architecture knob must keep its default, or the export is refused (a model transformers
    would silently run differently is worse than an error),
  * how its tensors are named (`layer_names`, plus `fused` tensors split/concatenated on the way and
    per-expert tensors stacked into our 3-D expert weights).

The fields every family shares (sizes, RoPE, activation, ...) are written and read by trainer/hub/convert.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from forge_lm.trainer.model.config import ModelConfig

ARCHITECTURE_KNOBS = (
    "rope_local_theta",
    "rotary_fraction",
    "rope_interleaved",
    "qkv_bias",
    "qk_norm",
    "query_pre_attn_scalar",
    "attn_softcap",
    "sliding_window",
    "full_attention_every",
    "norm_unit_offset",
    "pre_norm",
    "post_norm",
    "scale_embeddings",
    "final_softcap",
    "moe.num_experts",
    "moe.top_k",
    "moe.renormalize",
)
"""Knobs that change what the network computes and that not every HF class can express. (Sizes, RoPE base
and scaling, activation, norm epsilon and tying are expressible by all families: see convert.py.)"""


@dataclass(frozen=True)
class HFFamily:
    architecture: str
    """HF class written into config.json's "architectures" (what AutoModelForCausalLM instantiates)."""
    model_type: str
    """HF config "model_type"."""
    fixed: Mapping[str, Any]
    """Our knob (dotted for nested: "moe.renormalize") -> the value this HF class hard-codes."""
    configurable: frozenset[str]
    """Architecture knobs carried by this family's config.json (written and read by the two functions below)."""
    write_config: Callable[[ModelConfig], dict[str, Any]]
    """The family's own config.json fields."""
    read_config: Callable[[Mapping[str, Any], dict[str, Any]], dict[str, Any]]
    """(config.json, the common ModelConfig kwargs read so far) -> the family's own kwargs; ValueError for
    anything our decoder cannot reproduce exactly."""
    layer_names: Mapping[str, str]
    """Our name inside `layers.{i}.` -> HF name inside `model.layers.{i}.` (a superset: only the names the
    model has are used, e.g. biases only with qkv_bias)."""
    activation_key: str = "hidden_act"
    """config.json key of the MLP activation (Gemma 2/3 call it hidden_activation)."""
    fused: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """HF layer tensor -> our layer tensors it concatenates along dim 0 (GLM-4's gate_up_proj = [w1; w3])."""
    experts: Mapping[str, str] = field(default_factory=dict)
    """Our 3-D expert weight inside `layers.{i}.` -> the HF name of expert {e}'s 2-D slice."""


GLOBAL_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
"""Outside the layer stack: the same for every family."""

_ATTENTION = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.wq.bias": "self_attn.q_proj.bias",
    "attention.wk.bias": "self_attn.k_proj.bias",
    "attention.wv.bias": "self_attn.v_proj.bias",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
}
_MLP = {
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
# Careful: "post_attention_layernorm" is the *pre-MLP* norm in Llama-style layers, but the norm of the
# attention *output* in Gemma 2/3 and OLMo 2. GLM-4 names its four norms differently again.
_PRE_NORMS = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_GEMMA2_NORMS = {
    "attention_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffn_norm.weight": "post_feedforward_layernorm.weight",
}
_GLM4_NORMS = {
    "attention_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_self_attn_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "post_ffn_norm.weight": "post_mlp_layernorm.weight",
}
_OLMO2_NORMS = {
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffn_norm.weight": "post_feedforward_layernorm.weight",
}


# ---- family-specific config.json fields ------------------------------------------------------------------------


_FOUR_BIASES = "it puts biases on q, k, v and o; our decoder has q/k/v biases only"


def _refuse(family: str, d: Mapping[str, Any], key: str, allowed: Any, why: str) -> None:
    value = d.get(key, allowed)
    if value != allowed and not (allowed is False and value is None):
        raise ValueError(f"{family} config: {key}={value!r} is not supported ({why}).")


def _no_window(cfg: ModelConfig) -> dict[str, Any]:
    # Qwen's use_sliding_window / max_window_layers (window on the *upper* layers) is never used by the
    # released checkpoints; we write it off.
    return {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layers}


def _read_no_window(family: str, d: Mapping[str, Any]) -> None:
    if d.get("use_sliding_window"):
        raise ValueError(
            f"{family} config: use_sliding_window=True (a window on layers >= max_window_layers) is not supported."
        )


def _llama_write(cfg: ModelConfig) -> dict[str, Any]:
    return {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}


def _llama_read(d: Mapping[str, Any], common: dict[str, Any]) -> dict[str, Any]:
    _refuse("llama", d, "attention_bias", False, _FOUR_BIASES)
    _refuse("llama", d, "mlp_bias", False, "our MLP has no biases")
    return {}


def _qwen2_write(cfg: ModelConfig) -> dict[str, Any]:
    return _no_window(cfg)


def _qwen2_read(d: Mapping[str, Any], common: dict[str, Any]) -> dict[str, Any]:
    _read_no_window("qwen2", d)
    return {}


def _qwen3_write(cfg: ModelConfig) -> dict[str, Any]:
    return {"attention_bias": False, **_no_window(cfg)}


def _qwen3_read(d: Mapping[str, Any], common: dict[str, Any]) -> dict[str, Any]:
    _refuse("qwen3", d, "attention_bias", False, _FOUR_BIASES)
    _read_no_window("qwen3", d)
    return {}


def _qwen3_moe_write(cfg: ModelConfig) -> dict[str, Any]:
    if not cfg.is_moe:
        raise ValueError("family qwen3_moe needs model.moe.num_experts > 0 (a dense Qwen3 is family qwen3).")
    return {
        **_qwen3_write(cfg),
        "num_experts": cfg.moe.num_experts,
        "num_experts_per_tok": cfg.moe.top_k,
        "norm_topk_prob": cfg.moe.renormalize,
        "moe_intermediate_size": cfg.ffn_dim,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "router_aux_loss_coef": float(cfg.moe.load_balance_coef),
        "output_router_logits": False,
    }


def _qwen3_moe_read(d: Mapping[str, Any], common: dict[str, Any]) -> dict[str, Any]:
    _qwen3_read(d, common)
    _refuse("qwen3_moe", d, "decoder_sparse_step", 1, "every layer must be a MoE layer")
    if d.get("mlp_only_layers"):
        raise ValueError(
            f"qwen3_moe config: mlp_only_layers={d['mlp_only_layers']} is not supported (dense layers)."
        )
    return {
        "ffn_dim": int(d.get("moe_intermediate_size", 768)),
        "moe": {
            # transformers 5.x writes num_experts under its internal name num_local_experts
            "num_experts": int(d.get("num_experts", d.get("num_local_experts", 128))),
            "top_k": int(d.get("num_experts_per_tok", 8)),
            "renormalize": bool(d.get("norm_topk_prob", False)),
            "load_balance_coef": float(d.get("router_aux_loss_coef", 0.001)),
        },
    }


def _mixtral_write(cfg: ModelConfig) -> dict[str, Any]:
    if not cfg.is_moe:
        raise ValueError(
            "family mixtral needs model.moe.num_experts > 0 (a dense Mixtral is a Mistral / Llama)."
        )
    return {
        "num_local_experts": cfg.moe.num_experts,
        "num_experts_per_tok": cfg.moe.top_k,
        "router_aux_loss_coef": float(cfg.moe.load_balance_coef),
        "router_jitter_noise": 0.0,
        "output_router_logits": False,
        "sliding_window": cfg.sliding_window,  # on every layer (full_attention_every stays 0)
    }


def _mixtral_read(d: Mapping[str, Any], common: dict[str, Any]) -> dict[str, Any]:
    # router_jitter_noise only perturbs routing in training; it does not change the model.
    return {
        "sliding_window": d.get("sliding_window"),
        "moe": {
            "num_experts": int(d.get("num_local_experts", 8)),
            "top_k": int(d.get("num_experts_per_tok", 2)),
            "renormalize": True,
            "load_balance_coef": float(d.get("router_aux_loss_coef", 0.001)),
        },
    }


def _gemma_write(cfg: ModelConfig) -> dict[str, Any]:
    return {"attention_bias": False}


def _gemma_read(d: Mapping[str, Any], common: dict[str, Any]) -> dict[str, Any]:
    _refuse(d.get("model_type", "gemma"), d, "attention_bias", False, _FOUR_BIASES)
    if d.get("use_bidirectional_attention"):
        raise ValueError(f"{d.get('model_type')} config: use_bidirectional_attention=True is not supported.")
    return {}


def _layer_types(cfg: ModelConfig) -> list[str]:
    return ["sliding_attention" if cfg.is_sliding(i) else "full_attention" for i in range(cfg.n_layers)]


def _gemma2_write(cfg: ModelConfig) -> dict[str, Any]:
    return {
        **_gemma_write(cfg),
        "query_pre_attn_scalar": _number(cfg.query_pre_attn_scalar or cfg.head_dim),
        # transformers builds a sliding mask even when no layer uses it: give it a harmless size.
        "sliding_window": cfg.sliding_window or cfg.max_seq_len,
        "layer_types": _layer_types(cfg),
        "attn_logit_softcapping": _float_or_none(cfg.attn_softcap),
        "final_logit_softcapping": _float_or_none(cfg.final_softcap),
    }


def _gemma2_read(d: Mapping[str, Any], common: dict[str, Any], default_every: int = 2) -> dict[str, Any]:
    _gemma_read(d, common)
    n_layers = common["n_layers"]
    layer_types = d.get("layer_types") or [
        "sliding_attention" if (i + 1) % default_every else "full_attention" for i in range(n_layers)
    ]
    sliding = [t == "sliding_attention" for t in layer_types]
    unknown = set(layer_types) - {"sliding_attention", "full_attention"}
    if unknown or len(layer_types) != n_layers:
        raise ValueError(f"{d.get('model_type')} config: layer_types={layer_types} is not supported.")
    window, every = None, 0
    if any(sliding):
        window = int(d["sliding_window"])
        every = _pattern_period(sliding, default_every)
        if every is None:
            raise ValueError(
                f"{d.get('model_type')} config: layer_types={layer_types} is not a periodic pattern "
                "(every N-th layer global) that model.full_attention_every can express."
            )
    scalar = d.get("query_pre_attn_scalar", 256)
    return {
        "query_pre_attn_scalar": None if scalar == common["head_dim"] else float(scalar),
        "attn_softcap": _float_or_none(d.get("attn_logit_softcapping")),
        "final_softcap": _float_or_none(d.get("final_logit_softcapping")),
        "sliding_window": window,
        "full_attention_every": every,
    }


def _pattern_period(sliding: list[bool], preferred: int) -> int | None:
    """The full_attention_every value whose pattern is `sliding` (the family's own period tried first)."""
    n = len(sliding)
    for every in (preferred, 0, *range(2, n + 1)):
        if [every == 0 or (i + 1) % every != 0 for i in range(n)] == sliding:
            return every
    return None


def _gemma3_write(cfg: ModelConfig) -> dict[str, Any]:
    out = _gemma2_write(cfg)
    if cfg.full_attention_every:  # transformers 4.x reads this, not layer_types
        out["sliding_window_pattern"] = cfg.full_attention_every
    return out


def _gemma3_read(d: Mapping[str, Any], common: dict[str, Any]) -> dict[str, Any]:
    out = _gemma2_read(d, common, default_every=int(d.get("sliding_window_pattern", 6)))
    # The local layers' RoPE: transformers 5.x nests it under rope_parameters["sliding_attention"],
    # 4.x wrote rope_local_base_freq. (The global layers' RoPE is read like every family's, in convert.py.)
    local = (d.get("rope_parameters") or {}).get("sliding_attention") or {}
    rope_type = local.get("rope_type", local.get("type", "default"))
    if rope_type != "default":
        raise ValueError(
            f"gemma3 config: sliding_attention rope_type={rope_type!r} is not supported (only default)."
        )
    if out["sliding_window"] is not None:
        out["rope_local_theta"] = float(local.get("rope_theta", d.get("rope_local_base_freq", 10000.0)))
    return out


def _glm4_write(cfg: ModelConfig) -> dict[str, Any]:
    return {"attention_bias": cfg.qkv_bias, "partial_rotary_factor": cfg.rotary_fraction}


def _glm4_read(d: Mapping[str, Any], common: dict[str, Any]) -> dict[str, Any]:
    return {"qkv_bias": bool(d.get("attention_bias", True))}  # rotary_fraction: read with RoPE (convert.py)


def _olmo2_write(cfg: ModelConfig) -> dict[str, Any]:
    return {"attention_bias": False}


def _olmo2_read(d: Mapping[str, Any], common: dict[str, Any]) -> dict[str, Any]:
    _refuse("olmo2", d, "attention_bias", False, _FOUR_BIASES)
    return {}


def _number(x: float) -> int | float:
    """Integral values as int: transformers' strict configs refuse 256.0 for an int field."""
    return int(x) if float(x).is_integer() else float(x)


def _float_or_none(x: Any) -> float | None:
    return None if x is None else float(x)


# ---- the table ----------------------------------------------------------------------------------------------------

_GEMMA_FIXED = {"norm_unit_offset": True, "scale_embeddings": True}
_GEMMA2_CONFIGURABLE = frozenset(
    {"query_pre_attn_scalar", "attn_softcap", "final_softcap", "sliding_window", "full_attention_every"}
)
_MOE_CONFIGURABLE = frozenset({"moe.num_experts", "moe.top_k"})

HF_FAMILIES: dict[str, HFFamily] = {
    "llama": HFFamily(
        architecture="LlamaForCausalLM",
        model_type="llama",
        fixed={},
        configurable=frozenset(),
        write_config=_llama_write,
        read_config=_llama_read,
        layer_names={**_PRE_NORMS, **_ATTENTION, **_MLP},
    ),
    "qwen2": HFFamily(
        architecture="Qwen2ForCausalLM",
        model_type="qwen2",
        fixed={"qkv_bias": True},
        configurable=frozenset(),
        write_config=_qwen2_write,
        read_config=_qwen2_read,
        layer_names={**_PRE_NORMS, **_ATTENTION, **_MLP},
    ),
    "qwen3": HFFamily(
        architecture="Qwen3ForCausalLM",
        model_type="qwen3",
        fixed={"qk_norm": "head"},
        configurable=frozenset(),
        write_config=_qwen3_write,
        read_config=_qwen3_read,
        layer_names={**_PRE_NORMS, **_ATTENTION, **_MLP},
    ),
    "qwen3_moe": HFFamily(
        architecture="Qwen3MoeForCausalLM",
        model_type="qwen3_moe",
        fixed={"qk_norm": "head"},
        configurable=_MOE_CONFIGURABLE | {"moe.renormalize"},
        write_config=_qwen3_moe_write,
        read_config=_qwen3_moe_read,
        layer_names={**_PRE_NORMS, **_ATTENTION, "feed_forward.router.weight": "mlp.gate.weight"},
        experts={
            "feed_forward.experts.w1": "mlp.experts.{e}.gate_proj.weight",
            "feed_forward.experts.w3": "mlp.experts.{e}.up_proj.weight",
            "feed_forward.experts.w2": "mlp.experts.{e}.down_proj.weight",
        },
    ),
    "mixtral": HFFamily(
        architecture="MixtralForCausalLM",
        model_type="mixtral",
        fixed={"moe.renormalize": True},
        configurable=_MOE_CONFIGURABLE | {"sliding_window"},
        write_config=_mixtral_write,
        read_config=_mixtral_read,
        layer_names={
            **_PRE_NORMS,
            **_ATTENTION,
            "feed_forward.router.weight": "block_sparse_moe.gate.weight",
        },
        experts={
            "feed_forward.experts.w1": "block_sparse_moe.experts.{e}.w1.weight",
            "feed_forward.experts.w3": "block_sparse_moe.experts.{e}.w3.weight",
            "feed_forward.experts.w2": "block_sparse_moe.experts.{e}.w2.weight",
        },
    ),
    "gemma": HFFamily(
        architecture="GemmaForCausalLM",
        model_type="gemma",
        fixed=_GEMMA_FIXED,
        configurable=frozenset(),
        write_config=_gemma_write,
        read_config=_gemma_read,
        layer_names={**_PRE_NORMS, **_ATTENTION, **_MLP},
    ),
    "gemma2": HFFamily(
        architecture="Gemma2ForCausalLM",
        model_type="gemma2",
        fixed={**_GEMMA_FIXED, "post_norm": True},
        configurable=_GEMMA2_CONFIGURABLE,
        write_config=_gemma2_write,
        read_config=_gemma2_read,
        layer_names={**_GEMMA2_NORMS, **_ATTENTION, **_MLP},
        activation_key="hidden_activation",
    ),
    "gemma3": HFFamily(
        architecture="Gemma3ForCausalLM",
        model_type="gemma3_text",
        fixed={**_GEMMA_FIXED, "post_norm": True, "qk_norm": "head"},
        configurable=_GEMMA2_CONFIGURABLE | {"rope_local_theta"},
        write_config=_gemma3_write,
        read_config=_gemma3_read,
        layer_names={**_GEMMA2_NORMS, **_ATTENTION, **_MLP},
        activation_key="hidden_activation",
    ),
    "glm4": HFFamily(
        architecture="Glm4ForCausalLM",
        model_type="glm4",
        fixed={"post_norm": True, "rope_interleaved": True},
        configurable=frozenset({"qkv_bias", "rotary_fraction"}),
        write_config=_glm4_write,
        read_config=_glm4_read,
        layer_names={**_GLM4_NORMS, **_ATTENTION, "feed_forward.w2.weight": "mlp.down_proj.weight"},
        fused={"mlp.gate_up_proj.weight": ("feed_forward.w1.weight", "feed_forward.w3.weight")},
    ),
    "olmo2": HFFamily(
        architecture="Olmo2ForCausalLM",
        model_type="olmo2",
        fixed={"pre_norm": False, "post_norm": True, "qk_norm": "full"},
        configurable=frozenset(),
        write_config=_olmo2_write,
        read_config=_olmo2_read,
        layer_names={**_OLMO2_NORMS, **_ATTENTION, **_MLP},
    ),
}
"""Our family name (ModelConfig.family) -> its Hugging Face conventions."""


def hf_family(name: str) -> HFFamily:
    if name not in HF_FAMILIES:
        raise ValueError(
            f"model family {name!r} has no Hugging Face mapping; supported: {sorted(HF_FAMILIES)}."
        )
    return HF_FAMILIES[name]


def knob(cfg: ModelConfig, name: str) -> Any:
    """A (possibly dotted, e.g. "moe.top_k") knob's value."""
    value: Any = cfg
    for part in name.split("."):
        value = getattr(value, part)
    return value


def check_expressible(cfg: ModelConfig, fam: HFFamily) -> None:
    """Raise ValueError if `cfg` uses a knob that `fam`'s transformers class does not have."""
    default = ModelConfig()
    problems = []
    for name in ARCHITECTURE_KNOBS:
        value = knob(cfg, name)
        if name in fam.fixed:
            if value != fam.fixed[name]:
                problems.append(
                    f"model.{name}={value!r} (the {fam.architecture} class always has {fam.fixed[name]!r})"
                )
        elif name not in fam.configurable and value != knob(default, name):
            problems.append(
                f"model.{name}={value!r} ({fam.architecture} cannot express it; default {knob(default, name)!r})"
            )
    if problems:
        raise ValueError(
            f"cannot export as family {cfg.family!r}: " + "; ".join(problems) + ". Pick the family whose "
            "architecture this is (trainer/model/families.py lists the presets) or change those knobs."
        )
