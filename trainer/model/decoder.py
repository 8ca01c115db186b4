"""The decoder-only transformer: token embedding, a stack of blocks, final norm, output projection.

Module names are stable and plain (nn.Linear / nn.Embedding, no fused projections): parallelism plans
(FSDP2, tensor parallel) are applied from outside by name, and the HF converter maps names one to one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from forge_lm.trainer.kernels import linear_cross_entropy, linear_log_probs
from forge_lm.trainer.model.attention import Attention

if TYPE_CHECKING:
    from forge_lm.trainer.inference.cache import KVCache
from forge_lm.trainer.model.config import ConfigError, ModelConfig
from forge_lm.trainer.model.layers import GatedMLP, RMSNorm
from forge_lm.trainer.model.masks import Mask, flex_block_mask, positions_in_documents, sdpa_mask
from forge_lm.trainer.model.moe import GroupedExperts, MoE, moe_aux_losses, weighted_aux_loss
from forge_lm.trainer.model.rope import rope_cos_sin, rope_frequencies

# Per forward pass, what each kind of layer ("full" or "sliding" attention) needs: RoPE cos, sin and its mask.
AttentionInputs = dict[str, tuple[torch.Tensor, torch.Tensor, Optional[Mask]]]


class Block(nn.Module):
    """One transformer layer: x + post_norm(attention(pre_norm(x))), then the same with the MLP.

    Llama uses only the pre-norms, OLMo 2 only the post-norms, Gemma 2/3 and GLM-4 both ("sandwich");
    an absent norm is an identity.
    """

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()

        def norm(present: bool) -> nn.Module:
            return RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_unit_offset) if present else nn.Identity()

        self.layer_id = layer_id
        self.kind = "sliding" if cfg.is_sliding(layer_id) else "full"
        self.attention_norm = norm(cfg.pre_norm)
        self.attention = Attention(cfg)
        self.post_attention_norm = norm(cfg.post_norm)
        self.ffn_norm = norm(cfg.pre_norm)
        self.feed_forward = MoE(cfg) if cfg.is_moe else GatedMLP(cfg.d_model, cfg.ffn_dim, cfg.activation)
        self.post_ffn_norm = norm(cfg.post_norm)

    def forward(
        self, x: torch.Tensor, inputs: AttentionInputs, cache: Optional[KVCache] = None
    ) -> torch.Tensor:
        cos, sin, mask = inputs[self.kind]
        layer_cache = cache.layers[self.layer_id] if cache is not None else None
        x = x + self.post_attention_norm(
            self.attention(self.attention_norm(x), cos, sin, mask=mask, cache=layer_cache)
        )
        x = x + self.post_ffn_norm(self.feed_forward(self.ffn_norm(x)))
        return x


class Decoder(nn.Module):
    """A causal language model. `forward(input_ids, position_ids=None, document_ids=None) -> logits`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ConfigError(
                "model.vocab_size is null: set it, or fill it from the tokenizer with cfg.with_vocab(n) "
                "before building the model."
            )
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_unit_offset)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # RoPE frequencies, non-persistent: derived from the config, so neither saved nor expected on load.
        # Sliding-window layers get their own when they use another base (Gemma 3).
        self.register_buffer("inv_freq", self._frequencies("full"), persistent=False)
        if self._local_rope:
            self.register_buffer("inv_freq_local", self._frequencies("sliding"), persistent=False)
        self.init_buffers()

    # ---- forward --------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        document_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
    ) -> torch.Tensor:
        """input_ids [B, T] (long) -> logits [B, T, vocab_size], or with `labels` the per-token losses.

        position_ids [B, T]: RoPE positions. Default 0 .. T-1, or each token's index within its document
        when document_ids are given.
        document_ids [B, T] (int): for packed rows, the document each token belongs to (contiguous runs);
        attention then stays within a document, so each document gets the logits it would get alone.
        labels [B, T]: next-token targets (-100 = ignore). The forward then returns the cross-entropy per
        token [B, T] in fp32 (0 where ignored) from the fused linear + cross-entropy, never holding the
        full [B, T, vocab] logits where the fused kernel runs. Sharded models (FSDP) must be called through
        forward, so the loss lives here rather than in a method of its own.
        cache: generation (trainer/inference). Keys and values are stored in it and read back, and positions
        and masks come from it (left-padded rows); position_ids and document_ids are then not used, and
        only the last position's logits are returned, [B, 1, vocab_size].
        After a forward, MoE models expose their auxiliary losses through `aux_losses()` / `aux_loss()`.
        """
        T = input_ids.shape[1]
        if cache is not None:
            position_ids, document_ids = cache.positions(T), None
        elif position_ids is None and document_ids is not None:
            position_ids = positions_in_documents(document_ids)
        h = self.run_layers(self.embed(input_ids), self.layers, position_ids, document_ids, cache)
        if labels is not None:
            return self.token_losses(h, labels)
        if cache is not None:
            h = h[:, -1:]  # generation only needs the next token's logits: skip the rest of the vocab matmul
        return self.head(h)

    def forward_stage(
        self,
        x: torch.Tensor,
        layers: list[nn.Module],
        embed: bool,
        head: bool,
        position_ids: Optional[torch.Tensor] = None,
        document_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Run part of the model, for pipeline parallelism: [embedding] -> `layers` -> [final norm + output].

        x is token ids when `embed`, else hidden states from the previous stage. position_ids and
        document_ids mean what they mean in `forward`; every stage gets them, so each masks and rotates
        exactly as the whole model would.
        """
        if position_ids is None and document_ids is not None:
            position_ids = positions_in_documents(document_ids)
        h = self.run_layers(self.embed(x) if embed else x, layers, position_ids, document_ids)
        return self.head(h) if head else h

    def run_layers(
        self,
        h: torch.Tensor,
        layers: Iterable[nn.Module],
        position_ids: Optional[torch.Tensor] = None,
        document_ids: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
    ) -> torch.Tensor:
        """The one loop over blocks that every path runs (training, pipeline stages, scoring, decoding):
        hidden states h [B, T, d] through `layers`, positions 0..T-1 unless given."""
        if position_ids is None:
            B, T = h.shape[:2]
            position_ids = torch.arange(T, device=h.device).expand(B, T)
        inputs = self.attention_inputs(position_ids, document_ids, h.dtype, cache)
        for layer in layers:
            h = layer(h, inputs, cache=cache)  # a keyword: tensor-parallel plans see two inputs
        return h

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(input_ids)
        if self.cfg.scale_embeddings:
            # The factor is rounded to the activation dtype first (sqrt(3072) becomes 55.5 in bf16), as in Gemma.
            h = h * torch.tensor(self.cfg.d_model**0.5, dtype=h.dtype)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.output(self.norm(h))
        cap = self.cfg.final_softcap
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        return logits

    def token_losses(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy per token [B, T] of the last hidden states h [B, T, d] against labels [B, T]."""
        losses = linear_cross_entropy(
            self.norm(h).flatten(0, 1), self.output.weight, labels.flatten(), self.cfg.final_softcap
        )
        return losses.view(labels.shape)

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For evaluation on an unsharded model: log p(targets[b, t] | input_ids[b, :t+1]) [B, T] fp32, and
        whether each target is the most likely token [B, T] bool (lm_eval's is_greedy)."""
        B, T = input_ids.shape
        h = self.run_layers(self.embed(input_ids), self.layers)
        logprobs, greedy = linear_log_probs(
            self.norm(h).flatten(0, 1), self.output.weight, targets.flatten(), self.cfg.final_softcap
        )
        return logprobs.view(B, T), greedy.view(B, T)

    def attention_inputs(
        self,
        position_ids: torch.Tensor,
        document_ids: Optional[torch.Tensor],
        dtype: torch.dtype,
        cache: Optional[KVCache] = None,
    ) -> AttentionInputs:
        """RoPE tables and masks, computed once per forward for each kind of layer the model has."""
        cfg = self.cfg
        B, T = position_ids.shape
        device = position_ids.device
        use_flex = cfg.attention_backend == "flex" or (
            cfg.attention_backend == "auto"
            and device.type == "cuda"
            and (document_ids is not None or cfg.sliding_window is not None or cfg.attn_softcap is not None)
        )
        inputs: AttentionInputs = {}
        for kind in ("full", "sliding"):
            if not any(layer_kind == kind for layer_kind in self._layer_kinds):
                continue
            inv_freq = self.inv_freq_local if kind == "sliding" and self._local_rope else self.inv_freq
            cos, sin = rope_cos_sin(inv_freq, position_ids, dtype, cfg.rope_interleaved)
            window = cfg.sliding_window if kind == "sliding" else None
            if cache is not None:
                mask: Optional[Mask] = cache.mask(kind, T)
            elif use_flex:
                mask = flex_block_mask(B, T, device, document_ids, window)
            else:
                mask = sdpa_mask(T, device, document_ids, window)
            inputs[kind] = (cos, sin, mask)
        return inputs

    # ---- auxiliary losses (mixture of experts) ---------------------------------------------------------------

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """The unweighted auxiliary losses of the last forward: {'moe_load_balance', 'moe_router_z'} for MoE
        models (scalars, differentiable), {} for dense ones. Log them as training metrics."""
        return moe_aux_losses(self)

    def aux_loss(self) -> torch.Tensor:
        """What to add to the language-modelling loss after a forward: load_balance_coef * load-balancing
        loss + router_z_coef * z-loss (a zero scalar for dense models)."""
        total = weighted_aux_loss(self.aux_losses(), self.cfg.moe)
        return torch.as_tensor(total, device=self.tok_embeddings.weight.device)

    # ---- construction and initialisation --------------------------------------------------------------------

    @classmethod
    def build(cls, cfg: ModelConfig, device: torch.device | str = "cpu", seed: int | None = None) -> Decoder:
        """Build on the meta device (no memory, no wasted random init), materialise on `device`, initialise.

        This is the same sequence a sharded run uses, with the sharding applied between the two steps.
        """
        with torch.device("meta"):
            model = cls(cfg)
        model.to_empty(device=device)
        model.init_weights(seed)
        return model

    @property
    def _layer_kinds(self) -> list[str]:
        return ["sliding" if self.cfg.is_sliding(i) else "full" for i in range(self.cfg.n_layers)]

    @property
    def _local_rope(self) -> bool:
        """Whether sliding-window layers use RoPE frequencies of their own."""
        return self.cfg.rope_local_theta is not None and "sliding" in self._layer_kinds

    def _frequencies(self, kind: str, device: torch.device | str | None = None) -> torch.Tensor:
        cfg = self.cfg
        if kind == "sliding" and self._local_rope:  # local layers: own base, never context-scaled
            return rope_frequencies(cfg.rotary_dim, cfg.rope_local_theta, None, device)
        return rope_frequencies(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling, device)

    def init_buffers(self) -> None:
        """Recreate what the state dict does not hold: the RoPE frequencies and the embedding/output tie.

        Needed after `to_empty()`, which leaves buffers uninitialised and gives each module its own fresh
        tensor, silently untying shared weights. Loading a state dict after this is enough to restore a model.
        """
        if self.cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        device = self.tok_embeddings.weight.device
        # Assigned rather than copied so they are float32 even if the model was cast to bf16 before to_empty.
        self.inv_freq = self._frequencies("full", device)
        if self._local_rope:
            self.inv_freq_local = self._frequencies("sliding", device)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Initialise every parameter (and buffer) in place; with a seed the result is reproducible.

        Schemes (cfg.init_scheme; docs/architectures.md says which family uses which):
          depth_scaled      weights ~ N(0, init_std); the projections that write into the residual stream
                            (attention wo, MLP / expert w2) ~ N(0, init_std / sqrt(2 * n_layers)), so the
                            residual's variance does not grow with depth (GPT-2). The default.
          normal            every weight ~ N(0, init_std): what transformers' _init_weights does.
          truncated_normal  every weight ~ N(0, init_std) truncated at +-3 init_std (OLMo 2).
        Biases start at 0, norm gains at 1 (w = 0 for the 1 + w norms of Gemma).
        """
        self.init_buffers()
        cfg = self.cfg
        std = cfg.init_std
        residual_std = std / math.sqrt(2 * cfg.n_layers) if cfg.init_scheme == "depth_scaled" else std
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.tok_embeddings.weight.device).manual_seed(seed)

        def normal(w: torch.Tensor, s: float) -> None:
            if cfg.init_scheme == "truncated_normal":
                nn.init.trunc_normal_(w, mean=0.0, std=s, a=-3 * s, b=3 * s, generator=generator)
            else:
                nn.init.normal_(w, mean=0.0, std=s, generator=generator)

        residual_outputs = {"attention.wo", "feed_forward.w2", "feed_forward.experts"}
        for name, module in self.named_modules():
            if isinstance(module, RMSNorm):
                module.reset_parameters()
            elif isinstance(module, nn.Embedding):
                normal(module.weight, std)
            elif isinstance(module, nn.Linear):
                if name == "output" and cfg.tie_embeddings:
                    continue  # the embedding matrix, already initialised
                is_residual = any(name.endswith(suffix) for suffix in residual_outputs)
                normal(module.weight, residual_std if is_residual else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, GroupedExperts):
                normal(module.w1, std)
                normal(module.w3, std)
                normal(module.w2, residual_std)
            elif isinstance(module, MoE):
                module.reset_parameters()  # the routing bias (balance='bias') starts at zero

    # ---- accounting -----------------------------------------------------------------------------------------

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (a tied matrix counts once).

        exclude_embeddings leaves out the input lookup table, which does no arithmetic. With tied embeddings
        nothing is left out: the shared matrix is still the output projection, a real matmul.
        """
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and not self.cfg.tie_embeddings:
            n -= self.tok_embeddings.weight.numel()
        return n

    def num_active_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters one token is multiplied by: for MoE, only top_k of the num_experts experts count."""
        n = self.num_params(exclude_embeddings)
        moe = self.cfg.moe
        if moe.num_experts:
            expert = sum(
                p.numel() for m in self.modules() if isinstance(m, MoE) for p in m.experts.parameters()
            )
            n -= expert * (moe.num_experts - moe.top_k) // moe.num_experts
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward) at sequence length `seq_len`.

        6 * N for the weight matmuls (2 forward, 4 backward per multiply-add), N the active parameters
        excluding the input lookup table, plus 12 * n_heads * head_dim * span per layer for the attention
        scores and weighted sum, span = seq_len (min(seq_len, window) for sliding-window layers), counted
        without the causal halving, the usual convention for MFU.
        """
        cfg = self.cfg
        n = self.num_active_params(exclude_embeddings=True)
        spans = [
            min(seq_len, cfg.sliding_window) if cfg.is_sliding(i) else seq_len for i in range(cfg.n_layers)
        ]
        return 6 * n + 12 * cfg.n_heads * cfg.head_dim * sum(spans)
