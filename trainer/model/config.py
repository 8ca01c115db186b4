"""The decoder's configuration: every knob the model has, documented where it is declared.

The knobs are exactly the real differences between the open-weight families (Llama, Qwen, Mixtral, Gemma,
GLM, OLMo); their defaults give a plain Llama. Family presets (trainer/model/families.py) are a few of these
values; docs/architectures.md says which family uses which knob and why.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field, the value and the fix."""


FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe", "mixtral", "gemma", "gemma2", "gemma3", "glm4", "olmo2")
"""Values of ModelConfig.family: the Hugging Face architecture a model is exported as (trainer/hub)."""

ACTIVATIONS = ("silu", "gelu_tanh")
QK_NORMS = ("none", "head", "full")
ROPE_SCALINGS = ("none", "linear", "llama3")
INIT_SCHEMES = ("depth_scaled", "normal", "truncated_normal")
ATTENTION_BACKENDS = ("auto", "sdpa", "flex")


@dataclass
class RopeScalingConfig:
    """Stretching RoPE to contexts longer than pre-training's (all layers but those with rope_local_theta)."""

    kind: str = "none"
    """'none'; 'linear' (every frequency / factor: Gemma 3 4B+); 'llama3' (low frequencies / factor,
    high ones kept, a smooth ramp in between: Llama 3.1 / 3.2)."""
    factor: float = 1.0
    """How much longer the context gets (Llama 3.1: 8, Llama 3.2: 32, Gemma 3: 8)."""
    low_freq_factor: float = 1.0
    """llama3 only: wavelengths above original_max_seq_len / low_freq_factor are fully scaled."""
    high_freq_factor: float = 4.0
    """llama3 only: wavelengths below original_max_seq_len / high_freq_factor are left alone."""
    original_max_seq_len: int = 8192
    """llama3 only: the context length of the original pre-training."""

    def __post_init__(self) -> None:
        if self.kind not in ROPE_SCALINGS:
            raise ConfigError(
                f"model.rope_scaling.kind={self.kind!r} is not supported: choose one of {list(ROPE_SCALINGS)}."
            )
        if self.kind != "none" and self.factor < 1.0:
            raise ConfigError(
                f"model.rope_scaling.factor={self.factor} must be >= 1 (it stretches the context), "
                "or set model.rope_scaling.kind=none."
            )
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ConfigError(
                f"model.rope_scaling.high_freq_factor={self.high_freq_factor} must be larger than "
                f"model.rope_scaling.low_freq_factor={self.low_freq_factor}."
            )


@dataclass
class MoEConfig:
    """Mixture of experts in place of the MLP: a softmax router picks top_k of num_experts per token."""

    num_experts: int = 0
    """Experts per layer; 0 means a dense MLP (every layer). Each expert is a gated MLP of width ffn_dim."""
    top_k: int = 2
    """Experts each token is sent to (Mixtral: 2 of 8, Qwen3-MoE: 8 of 128)."""
    renormalize: bool = True
    """Divide the top-k router probabilities by their sum (Mixtral always; Qwen3-MoE's norm_topk_prob)."""
    load_balance_coef: float = 0.01
    """Weight of the load-balancing loss in `Decoder.aux_loss()` (HF router_aux_loss_coef; Mixtral 0.02)."""
    router_z_coef: float = 0.0
    """Weight of the router z-loss (mean squared logsumexp of router logits, ST-MoE) in `aux_loss()`."""
    balance: str = "aux_loss"
    """How expert load is balanced. 'aux_loss': the load-balancing loss, weighted by load_balance_coef.
    'bias' (DeepSeek-V3's auxiliary-loss-free balancing): a per-expert bias added to the router probabilities
    for choosing experts only (the mixing weights stay the probabilities), nudged after every optimizer step
    by bias_update_rate towards the experts that got fewer than the mean number of tokens in the global
    batch; the load-balancing loss is then left out of the training loss (it is still logged)."""
    bias_update_rate: float = 1e-3
    """With balance='bias': how far each step moves an expert's bias (DeepSeek-V3's gamma)."""

    def __post_init__(self) -> None:
        if self.balance not in ("aux_loss", "bias"):
            raise ConfigError(f"model.moe.balance={self.balance!r}: use 'aux_loss' or 'bias'.")
        if self.bias_update_rate < 0:
            raise ConfigError(f"model.moe.bias_update_rate={self.bias_update_rate} must be >= 0.")
        if self.num_experts < 0:
            raise ConfigError(f"model.moe.num_experts={self.num_experts} must be >= 0 (0: dense MLP).")
        if self.num_experts and not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(
                f"model.moe.top_k={self.top_k} must be between 1 and model.moe.num_experts={self.num_experts}."
            )
        for name in ("load_balance_coef", "router_z_coef"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.moe.{name}={getattr(self, name)} must be >= 0.")


@dataclass
class ModelConfig:
    """A decoder-only transformer. The defaults are a Llama (pre-norm, RoPE, GQA, SwiGLU)."""

    family: str = "llama"
    """Hugging Face architecture this model is exported as: one of FAMILIES (see trainer/hub/families.py)."""
    vocab_size: Optional[int] = None
    """Embedding rows. None: taken from the tokenizer at start (rounded up to `pad_vocab_to`)."""
    pad_vocab_to: int = 64
    """When `vocab_size` is taken from the tokenizer, round it up to a multiple of this (fast matmuls)."""
    d_model: int = 256
    """Hidden size (width of the residual stream)."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention (query) heads."""
    n_kv_heads: Optional[int] = None
    """Key/value heads for grouped-query attention. None: same as `n_heads` (multi-head attention)."""
    head_dim: Optional[int] = None
    """Width of one attention head. None: d_model / n_heads. Qwen3 and Gemma decouple it (e.g. 128, 256)."""
    ffn_dim: Optional[int] = None
    """Hidden size of the gated MLP (of each expert, for MoE). None: 8/3 * d_model rounded up to `ffn_multiple_of`."""
    ffn_multiple_of: int = 64
    """Rounding for the derived `ffn_dim`."""
    activation: str = "silu"
    """Gate activation of the MLP: 'silu' (SwiGLU: Llama, Qwen, GLM, OLMo) or 'gelu_tanh' (GeGLU: Gemma)."""
    max_seq_len: int = 2048
    """Longest sequence the model is built for (recorded as max_position_embeddings on export)."""

    # ---- rotary position embeddings ----
    rope_theta: float = 10000.0
    """RoPE base frequency (of the full-attention layers when `rope_local_theta` is set)."""
    rope_local_theta: Optional[float] = None
    """RoPE base of the sliding-window layers, which then also skip rope_scaling (Gemma 3: 10000 while global
    layers use 1e6 and, from 4B, linear scaling). None: all layers share rope_theta and rope_scaling."""
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    """Context-extension scaling of the RoPE frequencies (full-attention layers)."""
    rotary_fraction: float = 1.0
    """Fraction of each head's dimensions that are rotated; the rest carry no position (GLM-4: 0.5)."""
    rope_interleaved: bool = False
    """Rotate adjacent pairs (x0, x1), (x2, x3).. (GLM-4, GPT-J) instead of the two halves (Llama)."""

    # ---- attention ----
    qkv_bias: bool = False
    """Bias on the q, k and v projections, not on the output (Qwen2, GLM-4)."""
    qk_norm: str = "none"
    """RMSNorm on queries and keys before RoPE: 'none'; 'head' (over each head: Qwen3, Gemma 3);
    'full' (over all heads' width at once: OLMo 2)."""
    query_pre_attn_scalar: Optional[float] = None
    """The softmax scale is query_pre_attn_scalar^-1/2 (Gemma 2/3). None: head_dim^-1/2."""
    attn_softcap: Optional[float] = None
    """Soft-cap attention scores: cap * tanh(score / cap) (Gemma 2: 50). None: off."""
    sliding_window: Optional[int] = None
    """Local layers attend to the last `sliding_window` tokens (the token itself included). None: all global."""
    full_attention_every: int = 0
    """With a sliding window, layer i attends globally when (i + 1) % full_attention_every == 0 (Gemma 2: 2,
    i.e. alternating; Gemma 3: 6, five local then one global); 0: every layer uses the window (Mistral)."""
    attention_backend: str = "auto"
    """'sdpa' (boolean masks; an explicit softmax for soft-capping), 'flex' (FlexAttention block masks) or
    'auto': flex on CUDA when a mask beyond plain causal is needed (documents, windows, soft-capping), else sdpa."""

    # ---- normalisation ----
    norm_eps: float = 1e-5
    """Epsilon of RMSNorm."""
    norm_unit_offset: bool = False
    """RMSNorm gain is (1 + w), w initialised to 0 (Gemma), instead of w initialised to 1."""
    pre_norm: bool = True
    """Normalise each sublayer's input: x + f(norm(x)). False with post_norm gives OLMo 2's x + norm(f(x))."""
    post_norm: bool = False
    """Normalise each sublayer's output before the residual add. With pre_norm: the "sandwich" of Gemma 2/3, GLM-4."""

    # ---- embeddings and output ----
    tie_embeddings: bool = False
    """Share the input embedding matrix with the output projection."""
    scale_embeddings: bool = False
    """Multiply the embeddings by sqrt(d_model) (Gemma)."""
    final_softcap: Optional[float] = None
    """Soft-cap the output logits: cap * tanh(logit / cap) (Gemma 2: 30). None: off."""

    # ---- mixture of experts ----
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Experts instead of the dense MLP when moe.num_experts > 0 (Mixtral, Qwen3-MoE)."""

    # ---- initialisation ----
    init_std: float = 0.02
    """Standard deviation of the normal initialisation."""
    init_scheme: str = "depth_scaled"
    """'depth_scaled': N(0, init_std), the residual output projections (wo, w2) N(0, init_std / sqrt(2 n_layers));
    'normal': N(0, init_std) everywhere (transformers' own init); 'truncated_normal': N(0, init_std) cut at
    3 sigma everywhere (OLMo 2). Norm gains start at 1, biases at 0."""

    def __post_init__(self) -> None:
        # Built from a plain dict (a checkpoint's recorded config), nested configs arrive as dicts.
        if isinstance(self.rope_scaling, Mapping):
            self.rope_scaling = RopeScalingConfig(**self.rope_scaling)
        if isinstance(self.moe, Mapping):
            self.moe = MoEConfig(**self.moe)
        head_dim_derived = self.head_dim is None
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_dim is None:
            hidden = int(8 * self.d_model / 3)
            m = self.ffn_multiple_of
            self.ffn_dim = m * ((hidden + m - 1) // m)
        for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be positive.")
        if head_dim_derived:
            if self.d_model % self.n_heads != 0:
                raise ConfigError(
                    f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model}: "
                    f"choose n_heads among the divisors of d_model (e.g. {_divisors_near(self.d_model, self.n_heads)}), "
                    "or set model.head_dim explicitly."
                )
            self.head_dim = self.d_model // self.n_heads
        if self.head_dim <= 0:
            raise ConfigError(
                f"model.head_dim={self.head_dim} must be positive (or null: d_model / n_heads)."
            )
        if self.n_heads % self.n_kv_heads != 0:
            raise ConfigError(
                f"model.n_kv_heads={self.n_kv_heads} does not divide model.n_heads={self.n_heads}: "
                "grouped-query attention needs n_heads to be a multiple of n_kv_heads."
            )
        if self.head_dim % 2 != 0:
            where = (
                f"model.d_model / model.n_heads = {self.head_dim}"
                if head_dim_derived
                else f"model.head_dim={self.head_dim}"
            )
            raise ConfigError(f"{where} is odd: RoPE needs an even head dimension.")
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise ConfigError(
                f"model.vocab_size={self.vocab_size} must be positive (or null to take it from the tokenizer)."
            )
        self._check_choice("family", FAMILIES)
        self._check_choice("activation", ACTIVATIONS)
        self._check_choice("qk_norm", QK_NORMS)
        self._check_choice("init_scheme", INIT_SCHEMES)
        self._check_choice("attention_backend", ATTENTION_BACKENDS)
        rotated = self.head_dim * self.rotary_fraction
        if not 0.0 < self.rotary_fraction <= 1.0 or rotated != int(rotated) or int(rotated) % 2 != 0:
            raise ConfigError(
                f"model.rotary_fraction={self.rotary_fraction} must be in (0, 1] and rotate a whole, even number "
                f"of dimensions (head_dim={self.head_dim} * fraction = {rotated}); e.g. 0.5 or 1.0."
            )
        if not (self.pre_norm or self.post_norm):
            raise ConfigError(
                "model.pre_norm=false and model.post_norm=false leaves the blocks without normalisation: "
                "set at least one of them to true."
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(
                f"model.sliding_window={self.sliding_window} must be positive (or null: no window)."
            )
        if self.full_attention_every < 0:
            raise ConfigError(f"model.full_attention_every={self.full_attention_every} must be >= 0.")
        for name in ("attn_softcap", "final_softcap", "query_pre_attn_scalar", "rope_local_theta"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"model.{name}={value} must be positive (or null: off).")
        if self.init_std <= 0:
            raise ConfigError(f"model.init_std={self.init_std} must be positive.")

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        if getattr(self, name) not in choices:
            raise ConfigError(
                f"model.{name}={getattr(self, name)!r} is not supported; choose one of {list(choices)}."
            )

    # ---- derived quantities ----

    @property
    def rotary_dim(self) -> int:
        """How many dimensions of each head RoPE rotates."""
        return int(self.head_dim * self.rotary_fraction)

    @property
    def attn_scale(self) -> float:
        """The factor applied to q.k before the softmax."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def is_moe(self) -> bool:
        return self.moe.num_experts > 0

    def is_sliding(self, layer: int) -> bool:
        """Whether layer `layer` (0-based) attends through the sliding window."""
        if self.sliding_window is None:
            return False
        return self.full_attention_every == 0 or (layer + 1) % self.full_attention_every != 0

    def with_vocab(self, tokenizer_vocab_size: int) -> ModelConfig:
        """Fill in (or check) the vocabulary size against the tokenizer's."""
        if self.vocab_size is None:
            m = self.pad_vocab_to
            self.vocab_size = m * ((tokenizer_vocab_size + m - 1) // m)
        elif self.vocab_size < tokenizer_vocab_size:
            raise ConfigError(
                f"model.vocab_size={self.vocab_size} is smaller than the tokenizer's vocabulary "
                f"({tokenizer_vocab_size}): set model.vocab_size to at least {tokenizer_vocab_size}, or null."
            )
        return self


def _divisors_near(n: int, near: int) -> list[int]:
    divs = [d for d in range(1, n + 1) if n % d == 0]
    return sorted(divs, key=lambda d: abs(d - near))[:3]
