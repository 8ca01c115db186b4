"""Translation between our model and Hugging Face checkpoints: config.json and tensor names.

The per-family conventions live in trainer/hub/families.py; this module applies them, and handles what all
families share: the size fields, RoPE (base, scaling, partial rotation), the activation, special tokens.

No file I/O here: see export.py (writing) and load.py (reading).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from forge_lm.trainer.hub.families import GLOBAL_NAMES, HF_FAMILIES, HFFamily, check_expressible, hf_family
from forge_lm.trainer.model.config import ModelConfig, RopeScalingConfig
from forge_lm.trainer.model.decoder import Decoder
from forge_lm.trainer.model.families import FAMILY_KNOBS

_HF_ACTIVATION = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}
_OUR_ACTIVATION = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}

IGNORED_HF_NAMES = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)
"""HF tensors that carry no weights: transformers < 4.31 saved the (derived) RoPE frequencies."""

# transformers 5.x holds MoE experts fused in memory (what `model.state_dict()` returns); on disk it writes
# the per-expert layout of the Hub checkpoints. Both are read. HF name in a layer -> our names, split on dim 1.
_TRANSFORMERS5_MOE = {
    "mlp.experts.gate_up_proj": ("feed_forward.experts.w1", "feed_forward.experts.w3"),
    "mlp.experts.down_proj": ("feed_forward.experts.w2",),
    "mlp.gate.weight": ("feed_forward.router.weight",),
}


# ---- config ---------------------------------------------------------------------------------------------------------


def rope_to_hf(theta: float, scaling: RopeScalingConfig, rotary_fraction: float = 1.0) -> dict[str, Any]:
    """A transformers 5.x `rope_parameters` dict."""
    params: dict[str, Any] = {
        "rope_type": "default" if scaling.kind == "none" else scaling.kind,
        "rope_theta": theta,
    }
    if scaling.kind != "none":
        params["factor"] = float(scaling.factor)
    if scaling.kind == "llama3":
        params["low_freq_factor"] = float(scaling.low_freq_factor)
        params["high_freq_factor"] = float(scaling.high_freq_factor)
        params["original_max_position_embeddings"] = scaling.original_max_seq_len
    if rotary_fraction != 1.0:
        params["partial_rotary_factor"] = rotary_fraction
    return params


def rope_from_hf(d: Mapping[str, Any]) -> tuple[float, RopeScalingConfig, float]:
    """(base, scaling, rotary fraction) of the (full-attention) layers, from a 4.x or 5.x config.json.

    4.x: rope_theta + rope_scaling (null, or {"rope_type"/"type", "factor", ...}); 5.x: rope_parameters
    {"rope_type", "rope_theta", ...}, nested by layer type for Gemma 3. Like 5.x, a non-null rope_scaling wins.
    """
    params = d.get("rope_scaling") or d.get("rope_parameters") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"{d.get('model_type')} config: rope parameters {params!r} are not a dict.")
    if "full_attention" in params:  # nested by layer type (Gemma 3, transformers 5.x)
        params = params["full_attention"] or {}
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    fraction = float(params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        scaling = RopeScalingConfig()
    elif rope_type == "linear" and "factor" in params:
        scaling = RopeScalingConfig(kind="linear", factor=float(params["factor"]))
    elif rope_type == "llama3":
        absent = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in params]
        if absent:
            raise ValueError(
                f"{d.get('model_type')} config: llama3 RoPE scaling without {absent}: {dict(params)}."
            )
        scaling = RopeScalingConfig(
            kind="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_seq_len=int(
                params.get("original_max_position_embeddings", d.get("max_position_embeddings", 8192))
            ),
        )
    else:
        raise ValueError(
            f"{d.get('model_type')} config: RoPE with rope_type={rope_type!r} is not supported (supported: "
            f"default, linear, llama3); got {dict(params)}."
        )
    return theta, scaling, fraction


def model_config_to_hf(
    cfg: ModelConfig, bos_id: int | None, eos_id: int | None, torch_dtype: str
) -> dict[str, Any]:
    """config.json contents for `cfg`, loadable by transformers 5.x. torch_dtype: e.g. "bfloat16".

    Raises ValueError when `cfg` uses a knob its family's transformers class does not have.
    """
    if cfg.vocab_size is None:
        raise ValueError("cannot export a config with vocab_size=None: fill it from the tokenizer first.")
    fam = hf_family(cfg.family)
    check_expressible(cfg, fam)
    rope = rope_to_hf(cfg.rope_theta, cfg.rope_scaling, cfg.rotary_fraction)
    legacy_scaling = (
        {k: v for k, v in rope.items() if k != "rope_theta"} if cfg.rope_scaling.kind != "none" else None
    )
    if cfg.family == "gemma3":  # separate RoPE for the local layers, nested by layer type
        local_theta = cfg.rope_local_theta or cfg.rope_theta
        rope = {
            "full_attention": rope,
            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
        }
    return {
        "architectures": [fam.architecture],
        "model_type": fam.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        fam.activation_key: _HF_ACTIVATION[cfg.activation],
        # The RoPE base is written twice, on purpose: transformers 4.x reads the top-level `rope_theta` (and
        # `rope_scaling`); 5.x moved both into `rope_parameters`, falling back to the top-level keys.
        "rope_theta": cfg.rope_theta,
        "rope_scaling": legacy_scaling,
        "rope_parameters": rope,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        **fam.write_config(cfg),
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,  # several families default to an id beyond a small vocabulary
        "torch_dtype": torch_dtype,  # transformers 4.x name
        "dtype": torch_dtype,  # transformers 5.x name
    }


def hf_config_to_model_config(d: Mapping[str, Any]) -> ModelConfig:
    """Our ModelConfig from a config.json dict; ValueError for unsupported families or features."""
    model_type = d.get("model_type")
    by_type = {f.model_type: (name, f) for name, f in HF_FAMILIES.items()}
    if model_type not in by_type:
        hint = (
            " (for Gemma 3, export its text model: model_type gemma3_text)" if model_type == "gemma3" else ""
        )
        raise ValueError(
            f"Hugging Face model_type {model_type!r} is not supported{hint}; supported model types: {sorted(by_type)}."
        )
    name, fam = by_type[model_type]
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in required if d.get(k) is None]
    if missing:
        raise ValueError(f"{model_type} config: missing required fields {missing}.")
    act = d.get(fam.activation_key, d.get("hidden_act", d.get("hidden_activation", "silu")))
    if fam.model_type == "gemma" and act == "gelu":
        act = "gelu_pytorch_tanh"  # Gemma 1's released configs say "gelu" and mean the tanh approximation
    if act not in _OUR_ACTIVATION:
        raise ValueError(
            f"{model_type} config: {fam.activation_key}={act!r} is not supported by our decoder "
            f"(supported: {sorted(_OUR_ACTIVATION)})."
        )
    theta, scaling, fraction = rope_from_hf(d)
    if fraction != 1.0 and "rotary_fraction" not in fam.configurable:
        raise ValueError(
            f"{model_type} config: partial_rotary_factor={fraction} is not supported (only 1.0)."
        )
    hidden, n_heads = int(d["hidden_size"]), int(d["num_attention_heads"])
    common: dict[str, Any] = dict(
        family=name,
        vocab_size=int(d["vocab_size"]),
        d_model=hidden,
        n_layers=int(d["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(d.get("num_key_value_heads") or n_heads),
        head_dim=int(d.get("head_dim") or hidden // n_heads),
        ffn_dim=int(d["intermediate_size"]),
        activation=_OUR_ACTIVATION[act],
        max_seq_len=int(d.get("max_position_embeddings", 2048)),
        rope_theta=theta,
        rope_scaling=scaling,
        rotary_fraction=fraction,
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        init_std=float(d.get("initializer_range", 0.02)),
    )
    kwargs = {**common, **_nest(fam.fixed), **_preset_init(name)}
    for key, value in fam.read_config(d, common).items():
        if isinstance(value, Mapping) and isinstance(kwargs.get(key), Mapping):
            value = {**kwargs[key], **value}  # e.g. a fixed moe.renormalize and the moe fields read
        kwargs[key] = value
    return ModelConfig(**kwargs)


def _preset_init(family: str) -> dict[str, Any]:
    """config.json does not record how a model was initialised: use the family preset's scheme (OLMo 2)."""
    for knobs in FAMILY_KNOBS.values():
        if knobs["family"] == family and "init_scheme" in knobs:
            return {"init_scheme": knobs["init_scheme"]}
    return {}


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"moe.renormalize": True, "qk_norm": "head"} -> {"moe": {"renormalize": True}, "qk_norm": "head"}."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if "." in key:
            outer, inner = key.split(".", 1)
            out.setdefault(outer, {})[inner] = value
        else:
            out[key] = value
    return out


# ---- tensor names -----------------------------------------------------------------------------------------------

_OUR_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.device == b.device and a.data_ptr() == b.data_ptr())


def to_hf_state_dict(
    model_sd: Mapping[str, torch.Tensor], tie_embeddings: bool | None = None, family: str = "llama"
) -> dict[str, torch.Tensor]:
    """Our state dict -> HF tensor names, in the layout of the family's Hub checkpoints (tensors not copied,
    except where HF fuses two of ours into one).

    With tied embeddings the output matrix is dropped: HF stores it once, as the embedding, and
    safetensors refuses tensors that share memory anyway. tie_embeddings=None: detect the tie by memory.
    """
    fam = hf_family(family)
    if tie_embeddings is None:
        out, emb = model_sd.get("output.weight"), model_sd.get("tok_embeddings.weight")
        tie_embeddings = out is None or (emb is not None and _shares_memory(out, emb))
    fused_part = {ours: (theirs, i) for theirs, parts in fam.fused.items() for i, ours in enumerate(parts)}
    hf_sd: dict[str, torch.Tensor] = {}
    fused: dict[str, list[torch.Tensor | None]] = {}
    unknown = []
    for name, tensor in model_sd.items():
        if tie_embeddings and name == "output.weight":
            continue
        if name in GLOBAL_NAMES:
            hf_sd[GLOBAL_NAMES[name]] = tensor
            continue
        m = _OUR_LAYER.fullmatch(name)
        layer, suffix = (m.group(1), m.group(2)) if m else (None, name)
        prefix = f"model.layers.{layer}."
        if layer is not None and suffix in fam.layer_names:
            hf_sd[prefix + fam.layer_names[suffix]] = tensor
        elif layer is not None and suffix in fam.experts:
            for e in range(tensor.shape[0]):
                hf_sd[prefix + fam.experts[suffix].format(e=e)] = tensor[e]
        elif layer is not None and suffix in fused_part:
            theirs, i = fused_part[suffix]
            fused.setdefault(prefix + theirs, [None] * len(fam.fused[theirs]))[i] = tensor
        else:
            unknown.append(name)
    for hf_name, parts in fused.items():
        if any(p is None for p in parts):
            unknown.append(f"(incomplete parts of {hf_name})")
        else:
            hf_sd[hf_name] = torch.cat(parts, dim=0)
    if unknown:
        raise ValueError(f"no Hugging Face ({fam.architecture}) name for: {unknown}")
    return hf_sd


def from_hf_state_dict(hf_sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensors -> a state dict that `Decoder(cfg).load_state_dict(..., strict=True)` accepts.

    Raises ValueError listing missing and unexpected tensors, or tensors of the wrong shape.
    With tied embeddings `output.weight` is the embedding tensor (an lm_head in the file is ignored).
    """
    fam = hf_family(cfg.family)
    global_ours = {theirs: ours for ours, theirs in GLOBAL_NAMES.items()}
    layer_ours = {theirs: ours for ours, theirs in fam.layer_names.items()}
    expert_patterns = {
        re.compile(re.escape(theirs).replace(r"\{e\}", r"(\d+)")): ours
        for ours, theirs in fam.experts.items()
    }
    sd: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    unexpected = []
    for hf_name, tensor in hf_sd.items():
        if any(re.fullmatch(p, hf_name) for p in IGNORED_HF_NAMES):
            continue
        if hf_name in global_ours:
            name = global_ours[hf_name]
            if not (cfg.tie_embeddings and name == "output.weight"):
                sd[name] = tensor
            continue
        m = _HF_LAYER.fullmatch(hf_name)
        if m is None:
            unexpected.append(hf_name)
            continue
        ours, theirs = f"layers.{m.group(1)}.", m.group(2)
        if theirs in layer_ours:
            sd[ours + layer_ours[theirs]] = tensor
        elif theirs in fam.fused:
            for name, part in zip(fam.fused[theirs], tensor.chunk(len(fam.fused[theirs]), dim=0)):
                sd[ours + name] = part
        elif cfg.is_moe and theirs in _TRANSFORMERS5_MOE:
            names = _TRANSFORMERS5_MOE[theirs]
            for name, part in zip(names, tensor.chunk(len(names), dim=1 if tensor.dim() == 3 else 0)):
                sd[ours + name] = part
        elif any(p.fullmatch(theirs) for p in expert_patterns):
            pattern = next(p for p in expert_patterns if p.fullmatch(theirs))
            e = int(pattern.fullmatch(theirs).group(1))
            experts.setdefault(ours + expert_patterns[pattern], {})[e] = tensor
        else:
            unexpected.append(hf_name)
    if cfg.tie_embeddings and "tok_embeddings.weight" in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"]

    missing_experts = []
    for name, by_index in experts.items():
        absent = [e for e in range(cfg.moe.num_experts) if e not in by_index]
        if absent:
            missing_experts.append(f"{name}: experts {absent}")
        else:
            sd[name] = torch.stack([by_index[e] for e in range(cfg.moe.num_experts)])

    # The expected names and shapes, from a model on the meta device (costs no memory).
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Decoder(cfg).state_dict().items()}
    missing = [_hf_display_name(k, fam) for k in expected if k not in sd] + missing_experts
    wrong_shape = [
        f"{_hf_display_name(k, fam)}: {tuple(v.shape)} in checkpoint, {tuple(expected[k])} expected"
        for k, v in sd.items()
        if k in expected and v.shape != expected[k]
    ]
    unexpected += [k for k in sd if k not in expected]
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


def _hf_display_name(name: str, fam: HFFamily) -> str:
    """The HF name of one of our tensors, for error messages."""
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    m = _OUR_LAYER.fullmatch(name)
    if m and m.group(2) in fam.layer_names:
        return f"model.layers.{m.group(1)}.{fam.layer_names[m.group(2)]}"
    if m and m.group(2) in fam.experts:
        return f"model.layers.{m.group(1)}.{fam.experts[m.group(2)]}"
    for theirs, parts in fam.fused.items():
        if m and m.group(2) in parts:
            return f"model.layers.{m.group(1)}.{theirs}"
    return name


def _preview(items: list[str], n: int = 10) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")
