"""Will this layout fit, and how fast will it go? `forge plan <overrides> launch.nodes=... ...`

Starts no process group and needs no GPU: the model is built on the meta device (exact parameter shapes, no
memory), the parallel layout is the one the job will get (validated exactly as `forge_lm.trainer.train` validates it,
with WORLD_SIZE = nodes * gpus_per_node), and each rank's share is worked out the way the trainer shards:

    forge plan model=llama3_8b data.seq_len=8192 model.max_seq_len=8192 \\
        trainer.global_batch_tokens=1048576 trainer.micro_batch_size=1 launch.gpus_per_node=8 launch.gpu=h100

It prints the mesh, the derived micro-batch and accumulation, parameters and FLOPs per token, a per-rank
memory estimate (parameters, gradients, optimizer state, activations, buffers) and the step time and MFU
implied by `launch.assumed_mfu` and the device's peak. A layout that does not fit is refused (exit 1) with
the changes that would make it fit; a config the trainer would reject is refused (exit 2) with its error.

How each rank's bytes are counted (torch backend; `docs/launch.md` has the derivation):

- parameters: fp32 master weights. The pipeline stage decides which tensors a rank holds (embedding on the
  first stage, final norm and output on the last, layers split as `forge_lm.trainer.parallel.pipeline` splits them);
  tensor parallelism splits q/k/v, MLP up/gate and the embedding/output by rows, attention out and MLP
  down by columns (norms are replicated); FSDP2 then splits dim 0 of that over dp_shard, each shard padded
  to ceil(rows / dp_shard) rows. HSDP replicas (dp_replicate) hold the same shard.
- gradients: the same shapes, fp32 (FSDP2 reduces in fp32 into the fp32 sharded parameters), except the
  tensor-parallel embedding without FSDP2: its gradient comes back whole (replicated) from DTensor.
- optimizer state: AdamW exp_avg + exp_avg_sq, fp32, the local (unpadded) shapes, plus one 4-byte `step`
  per parameter tensor.
- activations: see `activation_bytes_per_token`. One micro-batch in flight without pipelining; with it,
  GPipe and LoopedBFS hold every micro-batch, 1F1B min(n, pp - pp_rank), the interleaved, zero-bubble and
  V schedules min(n, pp) per local stage (an upper-ish estimate).
- buffers: with FSDP2, the gathered (param_dtype) root parameters (embedding, final norm, output: kept
  gathered from forward to backward) plus two gathered blocks (current + prefetched) plus one block's
  unsharded gradients; without FSDP2 under bf16 autocast, the bf16 copies of the weights that autocast
  keeps for backward.

Peak = parameters + optimizer state + max(forward/backward: activations + buffers (+ gradients when they
accumulate over several micro-batches), optimizer step: gradients + one fp32 temporary per parameter).
DeepSpeed ZeRO is estimated from its stages (1: optimizer state sharded, 2: + gradients, 3: + parameters).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

from forge_lm.trainer.config import PP_SCHEDULES, Config, ConfigError, ParallelConfig

GIB = 2**30


@dataclass(frozen=True)
class Gpu:
    name: str
    """Substring of torch.cuda.get_device_name(), matched by trainer.metrics.peak_flops for the bf16 peak."""
    memory_gib: float
    """Total device memory as the driver reports it (nvidia-smi / rocm-smi), GiB."""


GPUS: dict[str, Gpu] = {
    "h100": Gpu("H100 SXM", 79.6),
    "h100_pcie": Gpu("H100 PCIe", 79.6),
    "h100_nvl": Gpu("H100 NVL", 93.6),
    "h800": Gpu("H800", 79.6),
    "h200": Gpu("H200", 140.4),
    "a100": Gpu("A100-SXM4-80GB", 80.0),
    "a100_40gb": Gpu("A100-SXM4-40GB", 40.0),
    "a800": Gpu("A800", 80.0),
    "b200": Gpu("B200", 179.1),
    "gb200": Gpu("GB200", 184.0),
    "l40s": Gpu("L40S", 45.0),
    "mi300x": Gpu("MI300X", 192.0),
    "cpu": Gpu("cpu", 0.0),  # memory: this machine's RAM; no peak FLOP/s (no step-time estimate)
}


def _host_memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError, AttributeError):
        return 16.0


# ---------------------------------------------------------------------------------------------------------
# Which tensors each rank holds
# ---------------------------------------------------------------------------------------------------------

_TP_ROWS = re.compile(
    r"(^tok_embeddings\.weight$|^output\.weight$|attention\.w[qkv]\.(weight|bias)$|feed_forward\.w[13]\.weight$)"
)
_TP_COLS = re.compile(r"(attention\.wo\.weight$|feed_forward\.w2\.weight$)")
# MoE experts, [E, hidden, d] (w1, w3) and [E, d, hidden] (w2): split along the hidden size; the router is whole.
_TP_EXPERTS = re.compile(r"feed_forward\.experts\.w([123])$")
# Under expert parallelism the same tensors are split along the experts (dim 0) over ep, then FSDP-sharded over
# the ranks holding the same experts (dp_shard / ep) instead of all of dp_shard.
_LAYER = re.compile(r"^layers\.(\d+)\.")


def _chunk(n: int, k: int, i: int) -> int:
    """Size of torch.chunk(range(n), k)[i] (0 past the end): how DTensor and FSDP2 split a dimension."""
    c = -(-n // k)
    return max(0, min(c, n - i * c))


@dataclass
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    stage: int
    """Pipeline stage holding it (0 without pipelining)."""
    in_block: bool
    """Part of a transformer block (its own FSDP2 unit) rather than the root (embedding, final norm, output)."""
    layer: int = -1


_SPECS: dict[str, list[ParamSpec]] = {}


def param_specs(model_cfg, n_stages: int) -> list[ParamSpec]:
    """Every distinct parameter of the model (a tied matrix once), with the pipeline stage that holds it."""
    key = f"{model_cfg!r}/{n_stages}"
    if key not in _SPECS:
        _SPECS[key] = _param_specs(model_cfg, n_stages)
    return _SPECS[key]


def _param_specs(model_cfg, n_stages: int) -> list[ParamSpec]:
    import torch

    from forge_lm.trainer.model import Decoder
    from forge_lm.trainer.parallel.pipeline import split_layers

    with torch.device("meta"):
        model = Decoder(model_cfg)
    stage_of_layer = {}
    for s, layers in enumerate(split_layers(model_cfg.n_layers, n_stages)):
        for i in layers:
            stage_of_layer[i] = s
    specs = []
    for name, p in model.named_parameters():  # tied parameters appear once
        m = _LAYER.match(name)
        if m:
            layer = int(m.group(1))
            specs.append(ParamSpec(name, tuple(p.shape), stage_of_layer[layer], True, layer))
        elif name.startswith("tok_embeddings."):
            specs.append(ParamSpec(name, tuple(p.shape), 0, False))
        else:  # final norm, output projection
            specs.append(ParamSpec(name, tuple(p.shape), n_stages - 1, False))
    return specs


def _tp_local_shape(spec: ParamSpec, tp: int, tp_rank: int) -> tuple[int, ...]:
    shape = list(spec.shape)
    if tp > 1:
        expert = _TP_EXPERTS.search(spec.name)
        if expert:
            hidden_dim = 2 if expert.group(1) == "2" else 1
            shape[hidden_dim] = _chunk(shape[hidden_dim], tp, tp_rank)
        elif _TP_ROWS.search(spec.name) and shape:
            shape[0] = _chunk(shape[0], tp, tp_rank)
        elif _TP_COLS.search(spec.name) and len(shape) > 1:
            shape[1] = _chunk(shape[1], tp, tp_rank)
    return tuple(shape)


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape) if shape else 1


@dataclass
class RankState:
    """Parameter, gradient and optimizer-state bytes one rank holds (torch backend)."""

    rank: int
    pp_rank: int
    dp_shard_rank: int
    tp_rank: int
    params: int
    grads: int
    optimizer: int
    n_tensors: int
    block_unsharded: int = 0
    """Elements of this rank's largest transformer block before FSDP2 sharding (after TP): one all-gather."""
    root_unsharded: int = 0
    """Elements of this rank's root FSDP2 unit (embedding, final norm, output) before sharding (after TP)."""
    local_unsharded: int = 0
    """Elements of all parameters this rank's stages hold, after TP, before FSDP2 sharding."""
    experts: int = 0
    """Of params + grads + optimizer: the bytes of the MoE experts this rank holds (after ep and FSDP2)."""
    layers: list[int] = field(default_factory=list)
    """Transformer layers this rank runs, in order."""
    has_head: bool = False
    stage_ids: list[int] = field(default_factory=list)


def _uses_fsdp(p: ParallelConfig) -> bool:
    # trainer.parallel.parallelize.uses_fsdp: distributed and more than one data-parallel rank
    return p.world_size > 1 and p.dp_size > 1


def rank_coords(p: ParallelConfig, rank: int) -> tuple[int, int, int, int]:
    """(pp, dp_replicate, dp_shard, tp) coordinates of a global rank in the mesh (row-major, as init_device_mesh)."""
    tp_i = rank % p.tp
    rest = rank // p.tp
    dps_i = rest % p.dp_shard
    rest //= p.dp_shard
    dpr_i = rest % p.dp_replicate
    return rest // p.dp_replicate, dpr_i, dps_i, tp_i


def rank_state(cfg: Config, rank: int, specs: Optional[list[ParamSpec]] = None) -> RankState:
    """Exact parameter / gradient / optimizer bytes of `rank` under cfg's layout (torch backend, fp32 master)."""
    from forge_lm.trainer.parallel.pipeline import split_layers, stage_ids_for_rank

    p = cfg.parallel
    n_stages = p.pp * p.stages_per_rank
    specs = specs if specs is not None else param_specs(cfg.model, n_stages)
    pp_i, _, dps_i, tp_i = rank_coords(p, rank)
    stages = stage_ids_for_rank(p, pp_i) if p.pp > 1 else [0]
    fsdp = _uses_fsdp(p)
    shard = p.dp_shard if fsdp else 1
    params = grads = optim = n_tensors = root = local = experts = 0
    blocks: dict[int, int] = {}
    for spec in specs:
        if spec.stage not in stages:
            continue
        shape = _tp_local_shape(spec, p.tp, tp_i)
        expert = _TP_EXPERTS.search(spec.name) is not None
        # dp_shard = expert_dp x ep, row-major (trainer.parallel.mesh): this rank's experts, then their shard.
        spec_shard, spec_dps = (shard // p.ep, dps_i // p.ep) if expert and fsdp else (shard, dps_i)
        if expert and p.ep > 1:
            shape = (_chunk(shape[0], p.ep, dps_i % p.ep), *shape[1:])
        full = _numel(shape)
        local += full
        if spec.in_block:
            blocks[spec.layer] = blocks.get(spec.layer, 0) + full
        else:
            root += full
        if fsdp and shape:
            rows = shape[0]
            padded = _chunk(rows, spec_shard, 0) * _numel(shape[1:])  # every shard is padded to the first's size
            held = _chunk(rows, spec_shard, spec_dps) * _numel(shape[1:])
        else:
            padded = held = full
        params += 4 * padded
        grads += 4 * padded
        if p.tp > 1 and not fsdp and spec.name == "tok_embeddings.weight":
            # DTensor's embedding backward leaves the row-sharded embedding with a replicated (whole) gradient
            grads += 4 * (_numel(spec.shape) - padded)
        optim += 2 * 4 * held + 4  # exp_avg, exp_avg_sq (fp32) and the step counter
        if expert:
            experts += 2 * 4 * padded + 2 * 4 * held + 4
        n_tensors += 1
    layer_split = split_layers(cfg.model.n_layers, n_stages)
    layers = [i for s in stages for i in layer_split[s]]
    return RankState(
        rank,
        pp_i,
        dps_i,
        tp_i,
        params,
        grads,
        optim,
        n_tensors,
        experts=experts,
        block_unsharded=max(blocks.values(), default=0),
        root_unsharded=root,
        local_unsharded=local,
        layers=layers,
        has_head=(n_stages - 1) in stages,
        stage_ids=list(stages),
    )


# ---------------------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------------------


def activation_bytes_per_token(cfg: Config, act_bytes: int) -> tuple[float, float, float]:
    """(full layer, checkpointed layer, head) bytes saved for backward per token of a micro-batch, per rank.

    A layer keeps, per token (h = d_model, q = n_heads * head_dim, kv = n_kv_heads * head_dim, f = ffn_dim,
    t = tp; "/t*" means divided by t only with sequence parallelism):
      2h /t*        the residual stream entering each sublayer (inputs of the two pre-norms)
      2h            the normalised inputs of q/k/v and of the MLP up/gate (gathered under sequence parallel)
      (3q + 2kv)/t  q, k, v after RoPE, the attention output (kept by SDPA) and its reshaped copy (input of wo)
      4f/t          MLP gate and up outputs, the activation of the gate and the product (input of down);
                    for MoE top_k times that, plus router logits
      2h /t* more   with post-norms (their inputs)
    plus 4-byte statistics: one per norm and token, one per head (log-sum-exp). A checkpointed layer keeps
    only its input (h /t*). The head (last stage) keeps the final norm's input and output (2h /t*) and the
    fp32 log-probabilities of the loss, plus the logits and their fp32 copy while the loss is computed:
    vocab/t * (act_bytes + 8).
    """
    m, p = cfg.model, cfg.parallel
    t = p.tp
    sp = t > 1 and p.sequence_parallel
    h, q, kv, f = m.d_model, m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim, m.ffn_dim
    resid = h / t if sp else h
    mlp = 4 * f
    if m.is_moe:
        mlp = 4 * f * m.moe.top_k + m.moe.num_experts
    n_norms = 2 * (int(m.pre_norm) + int(m.post_norm))
    elems = 2 * resid + 2 * h + (3 * q + 2 * kv) / t + mlp / t + (2 * resid if m.post_norm else 0)
    stats = 4 * (n_norms + m.n_heads / t)
    full = elems * act_bytes + stats
    checkpointed = resid * act_bytes
    head = 2 * resid * act_bytes + (m.vocab_size / t) * (act_bytes + 8)
    return full, checkpointed, head


def micro_batches_in_flight(p: ParallelConfig, n_micro: int, pp_rank: int) -> int:
    """Micro-batches whose activations a pipeline rank holds at once, per local stage."""
    if p.pp == 1:
        return 1
    if p.pp_schedule in ("GPipe", "LoopedBFS"):
        return n_micro
    if p.pp_schedule == "1F1B":
        return min(n_micro, p.pp - pp_rank)
    return min(n_micro, p.pp)


# ---------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Memory:
    params: float
    grads: float
    optimizer: float
    activations: float
    buffers: float
    step_temp: float
    accumulating: bool

    @property
    def forward_backward(self) -> float:
        return (
            self.params
            + self.optimizer
            + self.activations
            + self.buffers
            + (self.grads if self.accumulating else 0)
        )

    @property
    def optimizer_step(self) -> float:
        return self.params + self.optimizer + self.grads + self.step_temp

    @property
    def peak(self) -> float:
        return max(self.forward_backward, self.optimizer_step)


@dataclass
class Plan:
    cfg: Config
    launch: object
    gpu: Gpu
    n_params: int
    n_params_no_embed: int
    flops_per_token: int
    precision: str
    grad_accum: int
    worst: RankState
    memory: Memory
    usable_bytes: float
    device_bytes: float
    peak_flops: Optional[float]
    vocab_note: str = ""
    notes: list[str] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.memory.peak <= self.usable_bytes

    @property
    def world_size(self) -> int:
        return self.cfg.parallel.world_size

    @property
    def step_time_s(self) -> Optional[float]:
        if not self.peak_flops:
            return None
        flops = self.flops_per_token * self.cfg.trainer.global_batch_tokens
        return flops / (self.world_size * self.peak_flops * self.launch.assumed_mfu)


def _precision(cfg: Config, gpu_key: str) -> str:
    want = cfg.trainer.precision
    if want == "auto":
        device = cfg.trainer.device
        on_gpu = device == "cuda" or (device == "auto" and gpu_key != "cpu")
        return "bf16" if on_gpu else "fp32"
    return want


def _fill_vocab(cfg: Config) -> str:
    """model.vocab_size null means "from the tokenizer": read it if the tokenizer exists, else estimate."""
    if cfg.model.vocab_size is not None:
        return ""
    from forge_lm.data.tokenizer import has_tokenizer, load_tokenizer

    path = cfg.data.tokenizer.path
    if has_tokenizer(path):
        cfg.model.with_vocab(load_tokenizer(path).vocab_size)
        return f"vocab {cfg.model.vocab_size} from the tokenizer at {path}"
    cfg.model.with_vocab(cfg.data.tokenizer.vocab_size)
    return (
        f"vocab {cfg.model.vocab_size} estimated from data.tokenizer.vocab_size (no tokenizer at {path} yet)"
    )


def estimate(cfg: Config, launch, worst_only: bool = True) -> Plan:
    """The plan for `cfg` on `launch` (a LaunchConfig). Does not suggest fixes (see `plan`)."""
    from forge_lm.trainer.metrics import peak_flops

    gpu = GPUS[launch.gpu]
    vocab_note = _fill_vocab(cfg)
    p, t = cfg.parallel, cfg.trainer
    n_params, n_params_no_embed, flops = _model_counts(cfg.model, cfg.data.seq_len)
    precision = _precision(cfg, launch.gpu)
    act_bytes = 2 if precision == "bf16" else 4
    accum = cfg.grad_accum_steps
    n_stages = p.pp * p.stages_per_rank
    specs = param_specs(cfg.model, n_stages)
    # Ranks differ only by their (pp, dp_shard, tp) coordinates, and the first dp_shard and tp shards are the
    # largest (torch.chunk): the worst rank is one of the pipeline ranks' first.
    reps = [pp_i * p.dp_replicate * p.dp_shard * p.tp for pp_i in range(p.pp)]
    best: Optional[tuple[float, RankState, Memory]] = None
    fsdp = _uses_fsdp(p)
    full_layer, ckpt_layer, head = activation_bytes_per_token(cfg, act_bytes)
    tokens = t.micro_batch_size * cfg.data.seq_len
    for r in reps:
        st = rank_state(cfg, r, specs)
        params, grads, optim = float(st.params), float(st.grads), float(st.optimizer)
        if t.backend == "deepspeed":
            params, grads, optim = _deepspeed_bytes(st, p.dp_size, t.deepspeed.zero_stage, precision)
        # activations
        in_flight = micro_batches_in_flight(p, accum, st.pp_rank)
        n = len(st.layers)
        if p.activation_checkpointing == "full":
            per_mb = n * ckpt_layer
            recompute = full_layer if n else 0.0
        elif p.activation_checkpointing == "selective":
            n_ckpt = (n + 1) // 2 if p.pp == 1 else sum((len(ids) + 1) // 2 for ids in _stage_layers(cfg, st))
            per_mb = n_ckpt * ckpt_layer + (n - n_ckpt) * full_layer
            recompute = full_layer if n_ckpt else 0.0
        else:
            per_mb, recompute = n * full_layer, 0.0
        activations = tokens * (per_mb * in_flight + recompute + (head if st.has_head else 0.0))
        # buffers
        pbytes = 2 if precision == "bf16" else 4
        if t.backend == "deepspeed":
            buffers = 0.0
        elif fsdp:
            gathered = st.root_unsharded + 2 * st.block_unsharded
            buffers = gathered * pbytes + st.block_unsharded * (pbytes + (4 if pbytes != 4 else 0))
            if not p.reshard_after_forward:  # blocks stay gathered from forward to backward
                buffers += (st.local_unsharded - st.root_unsharded - 2 * st.block_unsharded) * pbytes
        else:
            buffers = st.local_unsharded * 2 if precision == "bf16" else 0.0
        step_temp = optim / 2  # foreach AdamW: one fp32 temporary the size of the local parameters
        mem = Memory(params, grads, optim, activations, buffers, step_temp, accumulating=accum > 1)
        if best is None or mem.peak > best[0]:
            best = (mem.peak, st, mem)
    assert best is not None
    _, worst, memory = best
    device_gib = launch.gpu_memory_gib or (gpu.memory_gib if launch.gpu != "cpu" else _host_memory_gib())
    device_bytes = device_gib * GIB
    plan = Plan(
        cfg=cfg,
        launch=launch,
        gpu=gpu,
        n_params=n_params,
        n_params_no_embed=n_params_no_embed,
        flops_per_token=flops,
        precision=precision,
        grad_accum=accum,
        worst=worst,
        memory=memory,
        usable_bytes=device_bytes * launch.memory_fraction,
        device_bytes=device_bytes,
        peak_flops=peak_flops(gpu.name) if launch.gpu != "cpu" else None,
        vocab_note=vocab_note,
    )
    if p.tp > launch.gpus_per_node:
        plan.notes.append(
            f"parallel.tp={p.tp} spans nodes (launch.gpus_per_node={launch.gpus_per_node}): tensor parallelism "
            "communicates every layer; keep tp within a node."
        )
    return plan


_COUNTS: dict[str, tuple[int, int, int]] = {}


def _model_counts(model_cfg, seq_len: int) -> tuple[int, int, int]:
    """(parameters, parameters without the input embedding, training FLOPs per token), from a meta model."""
    key = f"{model_cfg!r}/{seq_len}"
    if key not in _COUNTS:
        import torch

        from forge_lm.trainer.model import Decoder

        with torch.device("meta"):
            model = Decoder(model_cfg)
        _COUNTS[key] = (
            model.num_params(),
            model.num_params(exclude_embeddings=True),
            model.flops_per_token(seq_len),
        )
    return _COUNTS[key]


def _stage_layers(cfg: Config, st: RankState) -> list[list[int]]:
    from forge_lm.trainer.parallel.pipeline import split_layers

    split = split_layers(cfg.model.n_layers, cfg.parallel.pp * cfg.parallel.stages_per_rank)
    return [split[s] for s in st.stage_ids]


def _deepspeed_bytes(st: RankState, dp: int, stage: int, precision: str) -> tuple[float, float, float]:
    """ZeRO: bf16 keeps bf16 weights and gradients with fp32 master, momentum and variance in the optimizer."""
    n = st.local_unsharded
    if precision == "bf16":
        params, grads, optim = 2.0 * n, 2.0 * n, 12.0 * n
    else:
        params, grads, optim = 4.0 * n, 4.0 * n, 8.0 * n
    optim /= dp
    if stage >= 2:
        grads /= dp
    if stage >= 3:
        params /= dp
    return params, grads, optim


# ---------------------------------------------------------------------------------------------------------
# Fixes: other settings that would fit
# ---------------------------------------------------------------------------------------------------------


def _variant(
    cfg: Config,
    launch,
    parallel: Optional[dict] = None,
    trainer: Optional[dict] = None,
    nodes: Optional[int] = None,
):
    """A validated copy of (cfg, launch) with some fields changed, or None if the trainer would refuse it."""
    from forge_lm.launch.config import _world_size

    launch2 = dataclasses.replace(launch, nodes=nodes) if nodes else launch
    try:
        with _world_size(launch2.world_size):
            par = dataclasses.replace(cfg.parallel, **(parallel or {}))
            tr = dataclasses.replace(cfg.trainer, **(trainer or {}))
            model = dataclasses.replace(cfg.model)
            new = dataclasses.replace(cfg, parallel=par, trainer=tr, model=model)
    except ConfigError:
        return None
    if new.parallel.world_size != launch2.world_size:
        return None
    return new, launch2


def suggest_fixes(plan: Plan, max_fixes: int = 6, max_nodes_factor: int = 64) -> list[str]:
    """Changes, each checked with the same estimate, that make a refused layout fit.

    Single changes first (activation checkpointing, a smaller micro-batch, more tensor / pipeline
    parallelism, more nodes), then a memory saving combined with more sharding; for more nodes only the
    fewest that fit.
    """
    cfg, launch = plan.cfg, plan.launch
    p, t = cfg.parallel, cfg.trainer
    saving: list[tuple[str, dict, dict]] = [("", {}, {})]
    if p.activation_checkpointing == "none":
        saving.append(
            ("parallel.activation_checkpointing=selective", {"activation_checkpointing": "selective"}, {})
        )
    if p.activation_checkpointing != "full":
        saving.append(("parallel.activation_checkpointing=full", {"activation_checkpointing": "full"}, {}))
    mbs = t.micro_batch_size // 2
    while mbs >= 1:
        saving.append((f"trainer.micro_batch_size={mbs}", {}, {"micro_batch_size": mbs}))
        mbs = 0 if mbs == 1 else mbs // 2
    if p.activation_checkpointing != "full" and t.micro_batch_size > 1:
        saving.append(
            (
                "parallel.activation_checkpointing=full trainer.micro_batch_size=1",
                {"activation_checkpointing": "full"},
                {"micro_batch_size": 1},
            )
        )
    sharding: list[tuple[str, dict, Optional[int]]] = [("", {}, None)]
    if p.dp_replicate > 1:  # HSDP -> shard over the replicas too
        sharding.append(
            (
                f"parallel.dp_replicate=1 parallel.dp_shard={p.dp_shard * p.dp_replicate}",
                {"dp_replicate": 1, "dp_shard": p.dp_shard * p.dp_replicate},
                None,
            )
        )
    for tp in (p.tp * 2, p.tp * 4, p.tp * 8):
        if tp <= launch.gpus_per_node:
            sharding.append((f"parallel.tp={tp} parallel.dp_shard=-1", {"tp": tp, "dp_shard": -1}, None))
    if not cfg.model.tie_embeddings:
        for pp in (p.pp * 2, p.pp * 4):
            sharding.append((f"parallel.pp={pp} parallel.dp_shard=-1", {"pp": pp, "dp_shard": -1}, None))
    factor = 2
    while factor <= max_nodes_factor:
        nodes = launch.nodes * factor
        sharding.append((f"launch.nodes={nodes} parallel.dp_shard=-1", {"dp_shard": -1}, nodes))
        factor *= 2

    fixes: list[str] = []
    order = [(s, a) for s in sharding[:1] for a in saving[1:]] + [
        (s, a) for s in sharding[1:] for a in saving[:1]
    ]
    order += [(s, a) for s in sharding[1:] for a in saving[1:]]
    done_nodes: set[str] = set()
    for (s_text, s_par, nodes), (a_text, a_par, a_tr) in order:
        if len(fixes) >= max_fixes:
            break
        if nodes is not None and a_text in done_nodes:
            continue  # already found fewer nodes with this saving
        variant = _variant(cfg, launch, {**s_par, **a_par}, a_tr, nodes)
        if variant is None:
            continue
        other = estimate(*variant)
        if other.fits:
            text = " ".join(x for x in (s_text, a_text) if x)
            fixes.append(f"{text}  -> peak {other.memory.peak / GIB:.1f} GiB")
            if nodes is not None:
                done_nodes.add(a_text)
    return fixes


def plan(cfg: Config, launch) -> Plan:
    result = estimate(cfg, launch)
    if not result.fits:
        result.fixes = suggest_fixes(result)
    return result


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / GIB:8.2f} GiB"


def _count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def render(pl: Plan) -> str:
    cfg, launch, p, t = pl.cfg, pl.launch, pl.cfg.parallel, pl.cfg.trainer
    m = pl.memory
    w = pl.worst
    device = "CPU process" if launch.gpu == "cpu" else launch.gpu.upper()
    peak = f", {pl.peak_flops / 1e12:,.0f} TFLOP/s bf16 peak" if pl.peak_flops else ""
    lines = [
        f"plan for '{cfg.name}': {launch.nodes} node(s) x {launch.gpus_per_node} {device} "
        f"({pl.device_bytes / GIB:.1f} GiB each{peak}) = {pl.world_size} ranks",
        f"  mesh        pp={p.pp} x dp_replicate={p.dp_replicate} x dp_shard={p.dp_shard} x tp={p.tp}"
        + (f" (ep={p.ep}: experts split over {p.ep} of the dp_shard ranks)" if p.ep > 1 else "")
        + (f"  ({p.pp_schedule}, {p.stages_per_rank} stage(s) per rank)" if p.pp > 1 else "")
        + ("  FSDP2" if _uses_fsdp(p) and t.backend == "torch" else "")
        + (f"  DeepSpeed ZeRO-{t.deepspeed.zero_stage}" if t.backend == "deepspeed" else ""),
        f"  batch       {t.global_batch_tokens:,} tokens/step = micro-batch {t.micro_batch_size} x seq_len "
        f"{cfg.data.seq_len} x accumulation {pl.grad_accum} x data-parallel {p.dp_size}",
        f"  model       {pl.n_params:,} parameters ({_count(pl.n_params)}; {_count(pl.n_params_no_embed)} without the "
        f"input embedding), {pl.flops_per_token / 1e9:,.3f} GFLOPs per token (training, 6N + attention)",
    ]
    if pl.vocab_note:
        lines.append(f"              {pl.vocab_note}")
    where = f"rank {w.rank} (pp={w.pp_rank}, dp_shard={w.dp_shard_rank}, tp={w.tp_rank})"
    lines += [
        f"  memory per rank, worst: {where}; {pl.precision}, activation checkpointing "
        f"{p.activation_checkpointing}, {len(w.layers)} layer(s){' + output head' if w.has_head else ''}",
        f"    parameters       {_gib(m.params)}   fp32 master weights",
        f"    gradients        {_gib(m.grads)}",
        f"    optimizer state  {_gib(m.optimizer)}   AdamW exp_avg + exp_avg_sq",
        *([f"    experts' share   {_gib(w.experts)}   of the three above: {cfg.model.moe.num_experts // p.ep} of "
           f"{cfg.model.moe.num_experts} experts per layer on this rank (parallel.ep={p.ep})"]
          if cfg.model.is_moe else []),
        f"    activations      {_gib(m.activations)}   {t.micro_batch_size * cfg.data.seq_len:,} tokens per micro-batch",
        f"    buffers          {_gib(m.buffers)}   {'gathered parameters and unsharded gradients (FSDP2)' if _uses_fsdp(p) else 'autocast weight copies' if pl.precision == 'bf16' else 'none'}",
        f"    peak (estimate)  {_gib(m.peak)}   of {pl.usable_bytes / GIB:.1f} GiB usable "
        f"({launch.memory_fraction:.0%} of {pl.device_bytes / GIB:.1f}): {'fits' if pl.fits else 'DOES NOT FIT'}",
    ]
    if pl.step_time_s is not None:
        tok_s = t.global_batch_tokens / pl.step_time_s
        lines.append(
            f"  speed       at an assumed MFU of {launch.assumed_mfu:.0%}: {pl.step_time_s:.2f} s/step, "
            f"{tok_s:,.0f} tokens/s ({tok_s / pl.world_size:,.0f} per GPU)"
        )
    else:
        lines.append("  speed       no peak FLOP/s for this device: no step-time estimate")
    lines += [f"  note: {n}" for n in pl.notes]
    if not pl.fits:
        lines.append(
            f"refused: this layout needs ~{m.peak / GIB:.1f} GiB per rank, more than the {pl.usable_bytes / GIB:.1f} GiB usable."
        )
        if pl.fixes:
            lines.append("  changes that fit (each checked with this estimate):")
            lines += [f"    {f}" for f in pl.fixes]
        else:
            lines.append(
                "  nothing tried fits: shard more (more nodes, parallel.tp / parallel.pp), checkpoint activations, or shrink the model."
            )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from forge_lm.launch.config import compose

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        cfg, launch = compose(args)
        result = plan(cfg, launch)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(render(result))
    return 0 if result.fits else 1


__all__ = ["GPUS", "PP_SCHEDULES", "Plan", "estimate", "main", "plan", "rank_state", "render"]

if __name__ == "__main__":
    sys.exit(main())
