"""Family presets: each open-weight family is a few knob values; each size a few shape values.

    preset("qwen3")           the Qwen3 knobs at the 1b shape          (= preset("qwen3_1b"))
    preset("qwen3_tiny")      the Qwen3 knobs at the tiny shape
    preset("qwen3_0.6b")      the released Qwen3-0.6B, every value from its config.json

A generic size (tiny, 125m, 1b) is the same shape for every family, so two presets of one size differ only
by what really distinguishes the families: that is what `forge arch-diff qwen3 gemma3` prints.
Generic sizes take the vocabulary from the tokenizer (vocab_size null); released ones carry their own.
Every preset is also a Hydra option: configs/model/<name>.yaml, written by
`python -m forge_lm.trainer.model.families --write-configs configs/model` and checked against this file by the tests.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from forge_lm.trainer.model.config import ModelConfig

FAMILY_KNOBS: dict[str, dict[str, Any]] = {
    # Llama 3: the baseline every knob defaults to (pre-norm RMSNorm, RoPE, GQA, SwiGLU), with a larger RoPE base.
    "llama3": dict(family="llama", rope_theta=500000.0),
    # Qwen2 / 2.5: biases on q, k, v.
    "qwen2": dict(family="qwen2", qkv_bias=True, rope_theta=1000000.0, norm_eps=1e-6),
    # Qwen3: no biases, RMSNorm on each query/key head instead.
    "qwen3": dict(family="qwen3", qk_norm="head", rope_theta=1000000.0, norm_eps=1e-6),
    # Qwen3-MoE: Qwen3 attention, 128 experts of which 8 per token (scaled down for the generic sizes).
    "qwen3_moe": dict(
        family="qwen3_moe", qk_norm="head", rope_theta=1000000.0, norm_eps=1e-6,
        moe=dict(num_experts=8, top_k=2, renormalize=True, load_balance_coef=0.001),
    ),
    # Mixtral: a Llama/Mistral with 8 experts, 2 per token.
    "mixtral": dict(family="mixtral", rope_theta=1000000.0, moe=dict(num_experts=8, top_k=2, load_balance_coef=0.02)),
    # Gemma: GeGLU, (1 + w) RMSNorm, embeddings scaled by sqrt(d_model), tied output.
    "gemma": dict(
        family="gemma", activation="gelu_tanh", norm_unit_offset=True, scale_embeddings=True,
        tie_embeddings=True, norm_eps=1e-6,
    ),
    # Gemma 2: + sandwich norms, soft-capped attention scores and logits, local/global layers alternating.
    "gemma2": dict(
        family="gemma2", activation="gelu_tanh", norm_unit_offset=True, scale_embeddings=True,
        tie_embeddings=True, norm_eps=1e-6, post_norm=True, attn_softcap=50.0, final_softcap=30.0,
        sliding_window=4096, full_attention_every=2,
    ),
    # Gemma 3: Gemma 2 without soft-capping, with QK-norm, 5 local layers (own RoPE base) per global one.
    "gemma3": dict(
        family="gemma3", activation="gelu_tanh", norm_unit_offset=True, scale_embeddings=True,
        tie_embeddings=True, norm_eps=1e-6, post_norm=True, qk_norm="head", sliding_window=1024,
        full_attention_every=6, rope_theta=1000000.0, rope_local_theta=10000.0,
    ),
    # GLM-4 (0414): q/k/v biases, sandwich norms, RoPE on half of each head, in interleaved pairs.
    "glm4": dict(family="glm4", qkv_bias=True, post_norm=True, rotary_fraction=0.5, rope_interleaved=True),
    # OLMo 2: norms after each sublayer only, QK-norm over the full width, truncated-normal init.
    "olmo2": dict(
        family="olmo2", pre_norm=False, post_norm=True, qk_norm="full", rope_theta=500000.0, norm_eps=1e-6,
        init_scheme="truncated_normal",
    ),
}  # fmt: skip
"""Family name -> the knob values that make it that family (everything else: ModelConfig defaults)."""

SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=1024, tie_embeddings=True),
    "125m": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, max_seq_len=2048, tie_embeddings=True),
    "1b": dict(d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, max_seq_len=4096, tie_embeddings=True),
}
"""Generic shapes, the same for every family (the 125m one is GPT-3 Small's with GQA, 1b is Llama 3.2 1B's)."""

DEFAULT_SIZE = "1b"


def _llama3_rope(factor: float) -> dict[str, Any]:
    return dict(
        kind="llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192
    )


RELEASED: dict[str, tuple[str, dict[str, Any]]] = {
    "llama3_8b": ("llama3", dict(
        vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
        max_seq_len=8192, norm_eps=1e-5)),
    "llama3.1_8b": ("llama3", dict(
        vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
        max_seq_len=131072, norm_eps=1e-5, rope_scaling=_llama3_rope(8.0))),
    "llama3.2_1b": ("llama3", dict(
        vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
        max_seq_len=131072, norm_eps=1e-5, tie_embeddings=True, rope_scaling=_llama3_rope(32.0))),
    "qwen2.5_0.5b": ("qwen2", dict(
        vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2, ffn_dim=4864,
        max_seq_len=32768, tie_embeddings=True)),
    "qwen2.5_7b": ("qwen2", dict(
        vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, ffn_dim=18944,
        max_seq_len=131072)),
    "qwen3_0.6b": ("qwen3", dict(
        vocab_size=151936, d_model=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128, ffn_dim=3072,
        max_seq_len=32768, tie_embeddings=True)),
    "qwen3_8b": ("qwen3", dict(
        vocab_size=151936, d_model=4096, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=12288,
        max_seq_len=32768)),
    "qwen3_30b_a3b": ("qwen3_moe", dict(
        vocab_size=151936, d_model=2048, n_layers=48, n_heads=32, n_kv_heads=4, head_dim=128, ffn_dim=768,
        max_seq_len=32768, moe=dict(num_experts=128, top_k=8, renormalize=True, load_balance_coef=0.001))),
    "mixtral_8x7b": ("mixtral", dict(
        vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
        max_seq_len=32768, moe=dict(num_experts=8, top_k=2, load_balance_coef=0.02))),
    "gemma_2b": ("gemma", dict(
        vocab_size=256000, d_model=2048, n_layers=18, n_heads=8, n_kv_heads=1, head_dim=256, ffn_dim=16384,
        max_seq_len=8192)),
    "gemma_7b": ("gemma", dict(
        vocab_size=256000, d_model=3072, n_layers=28, n_heads=16, n_kv_heads=16, head_dim=256, ffn_dim=24576,
        max_seq_len=8192)),
    "gemma2_2b": ("gemma2", dict(
        vocab_size=256000, d_model=2304, n_layers=26, n_heads=8, n_kv_heads=4, head_dim=256, ffn_dim=9216,
        max_seq_len=8192, query_pre_attn_scalar=256.0)),
    "gemma2_9b": ("gemma2", dict(
        vocab_size=256000, d_model=3584, n_layers=42, n_heads=16, n_kv_heads=8, head_dim=256, ffn_dim=14336,
        max_seq_len=8192, query_pre_attn_scalar=256.0)),
    "gemma3_1b_pt": ("gemma3", dict(
        vocab_size=262144, d_model=1152, n_layers=26, n_heads=4, n_kv_heads=1, head_dim=256, ffn_dim=6912,
        max_seq_len=32768, query_pre_attn_scalar=256.0, sliding_window=512)),
    "gemma3_4b_pt": ("gemma3", dict(
        vocab_size=262208, d_model=2560, n_layers=34, n_heads=8, n_kv_heads=4, head_dim=256, ffn_dim=10240,
        max_seq_len=131072, query_pre_attn_scalar=256.0, sliding_window=1024,
        rope_scaling=dict(kind="linear", factor=8.0))),
    "glm4_9b_0414": ("glm4", dict(
        vocab_size=151552, d_model=4096, n_layers=40, n_heads=32, n_kv_heads=2, head_dim=128, ffn_dim=13696,
        max_seq_len=32768)),
    "olmo2_0425_1b": ("olmo2", dict(
        vocab_size=100352, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=16, ffn_dim=8192,
        max_seq_len=4096)),
    "olmo2_1124_7b": ("olmo2", dict(
        vocab_size=100352, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008,
        max_seq_len=4096)),
}  # fmt: skip
"""Released checkpoints, named after them: (family, the values that differ from the family's knobs).
Transcribed from each checkpoint's config.json; tests/unit/test_families.py checks the parameter counts."""

RELEASED_SOURCES = {
    "llama3_8b": "meta-llama/Meta-Llama-3-8B",
    "llama3.1_8b": "meta-llama/Llama-3.1-8B",
    "llama3.2_1b": "meta-llama/Llama-3.2-1B",
    "qwen2.5_0.5b": "Qwen/Qwen2.5-0.5B",
    "qwen2.5_7b": "Qwen/Qwen2.5-7B",
    "qwen3_0.6b": "Qwen/Qwen3-0.6B-Base",
    "qwen3_8b": "Qwen/Qwen3-8B-Base",
    "qwen3_30b_a3b": "Qwen/Qwen3-30B-A3B-Base",
    "mixtral_8x7b": "mistralai/Mixtral-8x7B-v0.1",
    "gemma_2b": "google/gemma-2b",
    "gemma_7b": "google/gemma-7b",
    "gemma2_2b": "google/gemma-2-2b",
    "gemma2_9b": "google/gemma-2-9b",
    "gemma3_1b_pt": "google/gemma-3-1b-pt",
    "gemma3_4b_pt": "google/gemma-3-4b-pt (text model)",
    "glm4_9b_0414": "THUDM/GLM-4-9B-0414",
    "olmo2_0425_1b": "allenai/OLMo-2-0425-1B",
    "olmo2_1124_7b": "allenai/OLMo-2-1124-7B",
}


def preset_names() -> list[str]:
    """Every preset name: <family>_<size> for the generic sizes, then the released checkpoints."""
    return [f"{family}_{size}" for family in FAMILY_KNOBS for size in SIZES] + list(RELEASED)


def preset_values(name: str) -> dict[str, Any]:
    """The ModelConfig keyword arguments of preset `name` (a family alone means its DEFAULT_SIZE)."""
    if name in FAMILY_KNOBS:
        name = f"{name}_{DEFAULT_SIZE}"
    if name in RELEASED:
        family, values = RELEASED[name]
        return _merge(FAMILY_KNOBS[family], values)
    for family in FAMILY_KNOBS:
        size = name.removeprefix(f"{family}_")
        if size != name and size in SIZES:
            return _merge(SIZES[size], FAMILY_KNOBS[family])
    raise KeyError(
        f"unknown preset {name!r}: choose a family ({', '.join(FAMILY_KNOBS)}), <family>_<size> with size in "
        f"{list(SIZES)}, or a released model ({', '.join(RELEASED)})."
    )


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The ModelConfig of a preset, with optional overrides (e.g. preset("qwen3_tiny", n_layers=2))."""
    return ModelConfig(**_merge(preset_values(name), overrides))


def family_of(name: str) -> str:
    """The family (key of FAMILY_KNOBS) a preset name belongs to."""
    if name in FAMILY_KNOBS:
        return name
    if name in RELEASED:
        return RELEASED[name][0]
    return max((f for f in FAMILY_KNOBS if name.startswith(f + "_")), key=len)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Later values win; nested dicts (moe, rope_scaling) are merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            value = {**out[key], **value}
        out[key] = value
    return out


# ---- Hydra config files -------------------------------------------------------------------------------------------


def preset_yaml(name: str) -> str:
    """configs/model/<name>.yaml: the preset's values that differ from ModelConfig's defaults."""
    cfg = preset(name)
    default = ModelConfig()
    values = preset_values(name)
    family = family_of(name)
    source = RELEASED_SOURCES.get(name)
    what = (
        f"the released {source}" if source else f"{family} knobs at the generic '{name.split('_')[-1]}' shape"
    )
    lines = [
        f"# Preset {name}: {what}.",
        "# Written by `python -m forge_lm.trainer.model.families --write-configs configs/model` from",
        "# trainer/model/families.py (edit there, not here); docs/architectures.md explains every knob.",
    ]
    vocab = values.get("vocab_size")
    lines.append(f"vocab_size: {vocab}" if vocab else "vocab_size: null  # taken from the tokenizer")
    for f in dataclasses.fields(ModelConfig):
        value, base = getattr(cfg, f.name), getattr(default, f.name)
        explicit = f.name in values or f.name == "family"
        if f.name == "vocab_size" or (f.name in ("n_kv_heads", "ffn_dim", "head_dim") and not explicit):
            continue  # vocab handled above; derived fields stay derived
        if dataclasses.is_dataclass(value):
            given = values.get(f.name) or {}
            nested = [
                f"  {g.name}: {_yaml_scalar(getattr(value, g.name))}"
                for g in dataclasses.fields(value)
                if g.name in given or getattr(value, g.name) != getattr(base, g.name)
            ]
            if nested:
                lines += [f"{f.name}:", *nested]
        elif explicit or value != base:
            lines.append(f"{f.name}: {_yaml_scalar(value)}")
    return "\n".join(lines) + "\n"


def _yaml_scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and "e" in repr(value):
        # YAML 1.1 (PyYAML, hence Hydra) reads 1e-06 as a string: it needs a dot in the mantissa.
        mantissa, exponent = repr(value).split("e")
        return f"{mantissa if '.' in mantissa else mantissa + '.0'}e{int(exponent)}"
    return str(value)


def write_configs(directory: str | Path) -> list[Path]:
    """Write configs/model/<preset>.yaml for every preset; returns the paths."""
    out = []
    for name in preset_names():
        path = Path(directory) / f"{name}.yaml"
        path.write_text(preset_yaml(name))
        out.append(path)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="List the presets, or write their Hydra config files.")
    parser.add_argument("--write-configs", metavar="DIR", help="write DIR/<preset>.yaml for every preset")
    args = parser.parse_args(argv)
    if args.write_configs:
        for path in write_configs(args.write_configs):
            print(path)
    else:
        print("\n".join(preset_names()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
