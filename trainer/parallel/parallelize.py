"""Apply parallelism to a model (or a pipeline stage of it), in one fixed order:

    tensor + sequence parallel  ->  activation checkpointing  ->  torch.compile per block  ->  FSDP2

(the pipeline split happens before, in `pipeline.py`). The model code knows nothing of this: plans
address its plain nn.Linear / nn.Embedding / RMSNorm modules by name.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.distributed.tensor.parallel.style import ParallelStyle

from forge_lm.trainer.config import ParallelConfig
from forge_lm.trainer.kernels import dispatch as kernels_dispatch
from forge_lm.trainer.model.layers import RMSNorm
from forge_lm.trainer.model.moe import MoE
from forge_lm.trainer.parallel.mesh import ParallelDims
from forge_lm.trainer.parallel.moe_parallel import apply_expert_parallel, moe_tensor_parallel_plan


def parallelize(model: nn.Module, dims: ParallelDims, param_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Parallelize `model` in place according to `dims.cfg`; returns it.

    `model` is a Decoder or a pipeline stage of one (same attribute names, some of them None).
    `param_dtype` is the dtype FSDP2 computes in (bf16 for mixed precision); gradients are reduced in fp32.
    """
    cfg = dims.cfg
    if cfg.tp > 1:
        apply_tensor_parallel(model, dims.sub_mesh("tp"), cfg)
    if cfg.ep > 1:
        apply_expert_parallel(model, dims.sub_mesh("ep", "tp") if cfg.tp > 1 else dims.sub_mesh("ep"))
    if cfg.activation_checkpointing != "none":
        apply_activation_checkpointing(model, cfg.activation_checkpointing)
    if cfg.compile:
        # In place (Module.compile), not torch.compile(block): a wrapper would rename every parameter
        # (layers.0._orig_mod....), and checkpoints, export and generation need the model's own names.
        for _, block in _blocks(model):
            block.compile(fullgraph=False)
        compile_loss_head(model)
    if uses_fsdp(dims):
        dp_dims = ("dp_replicate", "dp_shard") if cfg.dp_replicate > 1 else ("dp_shard",)
        expert_dp = dims.sub_mesh("expert_dp") if cfg.ep > 1 else None
        apply_fsdp(model, dims.sub_mesh(*dp_dims), param_dtype, cfg.reshard_after_forward, expert_dp)
    return model


def compile_loss_head(model: nn.Module) -> None:
    """Compile the loss head (final norm, output projection, cross-entropy) where no fused kernel runs it.

    Where the Triton linear + cross-entropy runs (CUDA), it never holds the [tokens, vocab] logits, and
    compiling would trade it for Inductor's reference (which does): it stays eager. Elsewhere the reference
    runs anyway and is, for small models, the largest single piece of a step; compiled, Inductor fuses the
    softmax and its backward. An instance attribute, so no parameter name changes.
    """
    head = getattr(model, "token_losses", None)
    weight = getattr(getattr(model, "output", None), "weight", None)
    if head is None or weight is None or (weight.is_cuda and kernels_dispatch.triton_available()):
        return
    model.token_losses = torch.compile(head)


def uses_fsdp(dims: ParallelDims) -> bool:
    """FSDP2 wraps the model whenever there is data parallelism; it then also does mixed precision
    (parameters cast to bf16 for compute, gradients reduced in fp32). Without it, autocast does."""
    return dims.distributed and dims.dp_size > 1


def _blocks(model: nn.Module):
    layers = model.layers
    items = layers.items() if isinstance(layers, nn.ModuleDict) else enumerate(layers)
    return [(str(k), v) for k, v in items]


def _set_block(model: nn.Module, name: str, block: nn.Module) -> None:
    if isinstance(model.layers, nn.ModuleDict):
        model.layers[name] = block
    else:
        model.layers[int(name)] = block


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, cfg: ParallelConfig) -> None:
    """Megatron-style TP: q/k/v and MLP up/gate split by columns (heads), o and down by rows; in MoE layers
    the same split of every expert's hidden size, with the router replicated (moe_parallel.py).

    With sequence parallelism the residual stream between blocks is split along the sequence, so
    norms run on 1/tp of the tokens, and the all-reduce of plain TP becomes reduce-scatter + all-gather.
    With loss parallelism the output projection leaves logits split along the vocabulary, and the
    cross-entropy (under `loss_parallel()`) never gathers them.
    """
    sp = cfg.sequence_parallel
    residual = Shard(1) if sp else Replicate()
    top_plan = {}
    if getattr(model, "tok_embeddings", None) is not None:
        top_plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=residual)
    if getattr(model, "norm", None) is not None and sp:
        top_plan["norm"] = SequenceParallel()
    if getattr(model, "output", None) is not None:
        top_plan["output"] = ColwiseParallel(
            input_layouts=residual,
            output_layouts=Shard(-1) if cfg.loss_parallel else Replicate(),
            use_local_output=not cfg.loss_parallel,
        )
    tied = getattr(model, "tok_embeddings", None) is not None and getattr(model, "output", None) is not None
    tied = tied and model.output.weight is model.tok_embeddings.weight
    parallelize_module(model, tp_mesh, top_plan)
    if tied:
        # Each module's parameter was distributed separately, which unties them; both are Shard(0) of
        # the same [vocab, d_model] matrix, so sharing one DTensor is exact.
        model.output.weight = model.tok_embeddings.weight

    for _, block in _blocks(model):
        plan = {
            "attention": PrepareModuleInput(
                input_layouts=(residual, None, None), desired_input_layouts=(Replicate(), None, None)
            ),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=residual),
        }
        if isinstance(block.feed_forward, MoE):  # router replicated, each expert's hidden size split
            plan.update(moe_tensor_parallel_plan(residual))
        else:
            plan.update({
                "feed_forward": PrepareModuleInput(input_layouts=(residual,), desired_input_layouts=(Replicate(),)),
                "feed_forward.w1": ColwiseParallel(),
                "feed_forward.w3": ColwiseParallel(),
                "feed_forward.w2": RowwiseParallel(output_layouts=residual),
            })  # fmt: skip
        plan.update(_qk_norm_plan(block.attention))
        if sp:
            for name in ("attention_norm", "ffn_norm"):  # absent (Identity) in post-norm-only families
                if isinstance(getattr(block, name), RMSNorm):
                    plan[name] = SequenceParallel()
            # Sandwich/post norms (Gemma 2/3, GLM-4, OLMo 2) sit on the residual side: their output is
            # added to the local residual shard, so they hand back a plain local tensor.
            for name in ("post_attention_norm", "post_ffn_norm"):
                if isinstance(getattr(block, name), RMSNorm):
                    plan[name] = SequenceParallel(use_local_output=True)
        parallelize_module(block, tp_mesh, plan)


def _qk_norm_plan(attention: nn.Module) -> dict[str, ParallelStyle]:
    """Query/key norms under tensor parallelism, where each rank holds only its own heads' q and k.

    Per-head norms (Qwen3, Gemma 3) normalise over head_dim, so each rank normalises its heads alone: the
    heads dimension (2 of [B, T, heads, head_dim]) is the sharded one, the gain is replicated and its
    gradient summed over the ranks. A norm over the whole projection (OLMo 2) needs the mean of squares
    over every head: its input is the projection's column shard, its gain is split the same way, and the
    mean over the split dimension is reduced across the group (by DTensor).
    """
    mode = getattr(attention, "qk_norm", "none")
    if mode == "head":
        style = SequenceParallel(sequence_dim=2, use_local_output=True)
        return {"attention.q_norm": style, "attention.k_norm": style}
    if mode == "full":
        return {"attention.q_norm": ShardedLastDimNorm(), "attention.k_norm": ShardedLastDimNorm()}
    return {}


class ShardedLastDimNorm(ParallelStyle):
    """A norm over the last dimension of an input that arrives split along it (a column-parallel output)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def shard_gain(_name, mod, mesh):
            for key, param in list(mod.named_parameters(recurse=False)):
                mod.register_parameter(key, nn.Parameter(distribute_tensor(param, mesh, [Shard(0)])))

        def input_as_shards(_mod, inputs, mesh):
            return tuple(
                DTensor.from_local(t, mesh, [Shard(t.dim() - 1)], run_check=False)
                if isinstance(t, torch.Tensor)
                else t
                for t in inputs
            )

        def local_output(_mod, output, _mesh):
            return output.to_local()

        return distribute_module(module, device_mesh, shard_gain, input_as_shards, local_output)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """'full': recompute every block in backward; 'selective': every second block (half the memory
    saving for half the recompute)."""
    for i, (name, block) in enumerate(_blocks(model)):
        if mode == "full" or (mode == "selective" and i % 2 == 0):
            _set_block(model, name, checkpoint_wrapper(block, preserve_rng_state=False))


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    param_dtype: torch.dtype,
    reshard_after_forward: bool,
    expert_dp_mesh: Optional[DeviceMesh] = None,
) -> None:
    """FSDP2: each block is its own unit (gathered just in time, freed after use); the root unit holds
    the embeddings, final norm and output projection. A 2-D mesh (replicate, shard) gives HSDP.

    Under expert parallelism each rank holds other experts than its ep peers: the experts of a block are a unit
    of their own, sharded over `expert_dp_mesh` (the ranks holding the same experts) instead of all of dp."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for _, block in _blocks(model):
        if expert_dp_mesh is not None and isinstance(getattr(block, "feed_forward", None), MoE):
            fully_shard(
                block.feed_forward.experts,
                mesh=expert_dp_mesh,
                mp_policy=mp,
                reshard_after_forward=reshard_after_forward,
            )
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # The root's inputs are token ids, or a previous pipeline stage's hidden states (already in the compute
    # dtype) and MoE router statistics, which are counts and sums that must stay fp32: no input cast.
    root_mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    # The root's parameters are needed again right at the start of backward: keep them gathered.
    fully_shard(model, mesh=dp_mesh, mp_policy=root_mp, reshard_after_forward=False)
