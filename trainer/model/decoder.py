"""The decoder-only transformer: token embedding, a stack of pre-norm blocks, final norm, output projection.

Module names are stable and plain (nn.Linear / nn.Embedding, no fused projections): parallelism plans
(FSDP2, tensor parallel) are applied from outside by name, and the HF converter maps names one to one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from trainer.model.attention import Attention
from trainer.model.config import ConfigError, ModelConfig
from trainer.model.layers import RMSNorm, SwiGLU, rope_cos_sin, rope_frequencies


class Block(nn.Module):
    """One transformer layer: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.feed_forward = SwiGLU(cfg.d_model, cfg.ffn_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        x = x + self.feed_forward(self.ffn_norm(x))
        return x


class Decoder(nn.Module):
    """A Llama-style causal language model. `forward(input_ids) -> logits`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ConfigError(
                "model.vocab_size is null: set it, or fill it from the tokenizer with cfg.with_vocab(n) "
                "before building the model."
            )
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # Non-persistent: derived from the config, so it is neither saved nor expected when loading.
        self.register_buffer("inv_freq", rope_frequencies(cfg.head_dim, cfg.rope_theta), persistent=False)
        self.init_buffers()

    # ---- forward --------------------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] (long) -> logits [B, T, vocab_size].

        position_ids [B, T] only change RoPE (e.g. positions restarting per packed document); the attention
        mask stays plain causal over the T tokens. Default: 0 .. T-1 for every row.
        """
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        h = self.tok_embeddings(input_ids)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids, dtype=h.dtype)  # shared by all layers
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.output(self.norm(h))

    def forward_stage(self, x: torch.Tensor, layers: list[nn.Module], embed: bool, head: bool) -> torch.Tensor:
        """Run part of the model, for pipeline parallelism: [embedding] -> `layers` -> [final norm + output].

        x is token ids when `embed`, else hidden states from the previous stage. Positions are 0..T-1.
        """
        h = self.tok_embeddings(x) if embed else x
        B, T = h.shape[:2]
        position_ids = torch.arange(T, device=h.device).expand(B, T)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids, dtype=h.dtype)
        for layer in layers:
            h = layer(h, cos, sin)
        return self.output(self.norm(h)) if head else h

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

    def init_buffers(self) -> None:
        """Recreate what the state dict does not hold: the RoPE frequencies and the embedding/output tie.

        Needed after `to_empty()`, which leaves buffers uninitialised and gives each module its own fresh
        tensor, silently untying shared weights. Loading a state dict after this is enough to restore a model.
        """
        if self.cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        device = self.tok_embeddings.weight.device
        # Assigned rather than copied so it is float32 even if the model was cast to bf16 before to_empty.
        self.inv_freq = rope_frequencies(self.cfg.head_dim, self.cfg.rope_theta, device=device)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Initialise every parameter (and buffer) in place; with a seed the result is reproducible.

        Embeddings and linears ~ N(0, init_std). The two projections that write into the residual stream
        (attention wo, MLP w2) get init_std / sqrt(2 * n_layers), so the residual's variance does not grow
        with depth (GPT-2). Norm gains start at 1.
        """
        self.init_buffers()
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.tok_embeddings.weight.device).manual_seed(seed)

        def normal(w: torch.Tensor, s: float) -> None:
            nn.init.normal_(w, mean=0.0, std=s, generator=generator)

        normal(self.tok_embeddings.weight, std)
        for layer in self.layers:
            attn, mlp = layer.attention, layer.feed_forward
            for w in (attn.wq.weight, attn.wk.weight, attn.wv.weight, mlp.w1.weight, mlp.w3.weight):
                normal(w, std)
            normal(attn.wo.weight, residual_std)
            normal(mlp.w2.weight, residual_std)
            layer.attention_norm.reset_parameters()
            layer.ffn_norm.reset_parameters()
        self.norm.reset_parameters()
        if not self.cfg.tie_embeddings:
            normal(self.output.weight, std)

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

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward) at sequence length `seq_len`.

        6 * N for the weight matmuls (2 forward, 4 backward per multiply-add), N excluding the input lookup
        table, plus 12 * n_layers * n_heads * head_dim * seq_len for the attention scores and weighted sum
        (counted without the causal halving, the usual convention for MFU).
        """
        cfg = self.cfg
        n = self.num_params(exclude_embeddings=True)
        return 6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
