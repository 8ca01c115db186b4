"""The fused Triton kernels (trainer/kernels) against their PyTorch references, and the dispatch rule.

On a CPU machine the kernels run in Triton's interpreter. triton.jit decides between compiling and
interpreting when a kernel is *decorated* (it reads TRITON_INTERPRET then), so setting the variable inside
this process would not help if anything had imported the kernel modules already. The interpreter checks
therefore run in a fresh subprocess (this file run as a script) with TRITON_INTERPRET=1 and
FORGE_KERNELS=triton; each check then calls the public dispatching functions while the references are
replaced by functions that fail, so a silent fallback to the reference cannot pass. One subprocess runs
them all (a few seconds); each check is reported as its own test.

The GPU tests (skipped without CUDA) run the compiled kernels in bf16 and record the peak memory of the
fused against the unfused linear + cross-entropy.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from forge_lm.trainer import kernels
from forge_lm.trainer.kernels import dispatch, reference

REPO = Path(__file__).resolve().parents[2]
TOL = dict(atol=1e-5, rtol=1e-5)  # float32: the kernels differ from the references only by summation order


# ---- checks run under the Triton interpreter (in the subprocess) ---------------------------------------


@contextlib.contextmanager
def _reference_forbidden() -> Iterator[None]:
    """Make every reference raise, so that the public functions must have taken the Triton path."""
    names = ["rms_norm", "apply_rotary", "gated_activation", "linear_cross_entropy", "linear_log_probs"]
    saved = {name: getattr(reference, name) for name in names}

    def fail(*args, **kwargs):
        raise AssertionError("the reference ran where the Triton kernel was expected")

    for name in names:
        setattr(reference, name, fail)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(reference, name, fn)


def _fwd_bwd(fn: Callable, inputs: tuple[torch.Tensor, ...], upstream: torch.Tensor | None = None):
    """fn(*inputs) and the gradients of <fn(*inputs), upstream> w.r.t. the inputs that require grad."""
    out = fn(*inputs)
    if upstream is None:
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return out, torch.autograd.grad(out, leaves, upstream)


def check_interpreter_active() -> None:
    from triton.runtime.interpreter import InterpretedFunction

    from forge_lm.trainer.kernels import triton_cross_entropy, triton_gated, triton_rms_norm, triton_rope

    for kernel in (
        triton_rms_norm._rms_norm_fwd,
        triton_rope._rope_kernel,
        triton_gated._gated_fwd,
        triton_cross_entropy._ce_fwd_tile,
    ):
        assert isinstance(kernel, InterpretedFunction), type(kernel)
    assert dispatch.use_triton(torch.zeros(1))


def check_rms_norm(unit_offset: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    if unit_offset:
        x = torch.randn(3, 5, 37, generator=gen)
    else:  # rows of a wider tensor: a row stride (40) different from the width (37)
        x = torch.randn(3, 5, 40, generator=gen)[..., :37]
    x.requires_grad_()
    w = (torch.randn(37, generator=gen) * 0.3 + (0.0 if unit_offset else 1.0)).requires_grad_()
    expected = _fwd_bwd(lambda a, b: reference.rms_norm(a, b, 1e-5, unit_offset), (x, w))
    with _reference_forbidden():
        got = _fwd_bwd(lambda a, b: kernels.rms_norm(a, b, 1e-5, unit_offset), (x, w))
    torch.testing.assert_close(got[0], expected[0], **TOL)
    torch.testing.assert_close(got[1][0], expected[1][0], **TOL)  # dx
    torch.testing.assert_close(got[1][1], expected[1][1], **TOL)  # dw


def check_rope(interleaved: bool, rotary_dim: int) -> None:
    B, T, H, D = 2, 5, 3, 10
    gen = torch.Generator().manual_seed(0)
    # As the attention passes it: [B, T, H, D] transposed to [B, H, T, D], not contiguous.
    x = torch.randn(B, T, H, D, generator=gen).transpose(1, 2).requires_grad_()
    angles = torch.randn(B, T, rotary_dim // 2, generator=gen) * 3
    angles = angles.repeat_interleave(2, -1) if interleaved else torch.cat((angles, angles), -1)
    cos, sin = angles.cos(), angles.sin()
    expected = _fwd_bwd(lambda a: reference.apply_rotary(a, cos, sin, interleaved), (x,))
    with _reference_forbidden():
        got = _fwd_bwd(lambda a: kernels.apply_rotary(a, cos, sin, interleaved), (x,))
    torch.testing.assert_close(got[0], expected[0], **TOL)
    torch.testing.assert_close(got[1][0], expected[1][0], **TOL)


def check_gated(activation: str) -> None:
    gen = torch.Generator().manual_seed(0)
    gate = (torch.randn(3, 7, 19, generator=gen) * 3).requires_grad_()  # wide enough to reach both tails
    up = torch.randn(3, 7, 19, generator=gen).requires_grad_()
    expected = _fwd_bwd(lambda g, u: reference.gated_activation(g, u, activation), (gate, up))
    with _reference_forbidden():
        got = _fwd_bwd(lambda g, u: kernels.gated_activation(g, u, activation), (gate, up))
    torch.testing.assert_close(got[0], expected[0], **TOL)
    torch.testing.assert_close(got[1][0], expected[1][0], **TOL)  # d gate
    torch.testing.assert_close(got[1][1], expected[1][1], **TOL)  # d up


def _small_tiles() -> None:
    """Shrink the cross-entropy tiles so that V=300 spans 3 vocab chunks (128, 128, 44), N=13 spans 3 row
    chunks (5, 5, 3) and each chunk several kernel blocks of 32 columns. (The subprocess is throwaway.)"""
    from forge_lm.trainer.kernels import triton_cross_entropy

    triton_cross_entropy.VOCAB_CHUNK = 128
    triton_cross_entropy.TILE_ELEMENTS = 128 * 5
    triton_cross_entropy.BLOCK_V = 32


def _materialised_logits(h: torch.Tensor, w: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = (h @ w.T).float()
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def check_cross_entropy(softcap: float | None) -> None:
    _small_tiles()
    N, d, V = 13, 24, 300
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(N, d, generator=gen).requires_grad_()
    w = (torch.randn(V, d, generator=gen) * 0.5).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[[2, 7, 12]] = -100  # ignored: loss 0 and no gradient
    targets[3], targets[4] = 0, V - 1  # the first and the last column
    # Per-token weights for the backward (not only the ones of a sum), with and without a soft-cap.
    # (loss.sum()'s gradient is an expanded, stride-0 view: the kernel must not assume a dense one.)
    upstream = torch.rand(N, generator=gen) if softcap else torch.ones(()).expand(N)

    def materialised(a, b):
        return F.cross_entropy(_materialised_logits(a, b, softcap), targets, reduction="none")

    expected = _fwd_bwd(materialised, (h, w), upstream)
    with _reference_forbidden():
        got = _fwd_bwd(lambda a, b: kernels.linear_cross_entropy(a, b, targets, softcap), (h, w), upstream)
    assert got[0].dtype == torch.float32 and got[0].shape == (N,)
    assert torch.all(got[0][[2, 7, 12]] == 0)
    torch.testing.assert_close(got[0], expected[0], **TOL)
    torch.testing.assert_close(got[1][0], expected[1][0], **TOL)  # d hidden
    torch.testing.assert_close(got[1][1], expected[1][1], **TOL)  # d weight


def check_log_probs(softcap: float | None) -> None:
    _small_tiles()
    N, d, V = 13, 24, 300
    gen = torch.Generator().manual_seed(0)
    # Small integers: the logits are exact, so ties for the maximum really happen, and across chunks:
    # column 250 (third chunk) repeats column 10 (first chunk), and rows 0 and 1 point straight at it.
    h = torch.randint(-2, 3, (N, d), generator=gen).float()
    w = torch.randint(-2, 3, (V, d), generator=gen).float()
    w[250] = w[10]
    h[0] = h[1] = w[10]
    logits = _materialised_logits(h, w, softcap)
    first = logits.argmax(-1)
    last = V - 1 - logits.flip(-1).argmax(-1)
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[0::3], targets[1::3] = first[0::3], last[1::3]  # row 0 -> column 10, row 1 -> column 250
    assert first[1] == 10 and last[1] == 250  # the tie the test is about
    with _reference_forbidden():
        logprobs, is_argmax = kernels.linear_log_probs(h, w, targets, softcap)
    torch.testing.assert_close(
        logprobs, logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1), **TOL
    )
    assert torch.equal(is_argmax, logits.argmax(-1) == targets)
    assert is_argmax[0] and not is_argmax[1]  # torch.argmax keeps the first of tied maxima


CHECKS: dict[str, Callable[[], None]] = {
    "interpreter_active": check_interpreter_active,
    "rms_norm[llama]": lambda: check_rms_norm(unit_offset=False),
    "rms_norm[gemma_unit_offset]": lambda: check_rms_norm(unit_offset=True),
    "rope[half]": lambda: check_rope(interleaved=False, rotary_dim=10),
    "rope[half_partial]": lambda: check_rope(interleaved=False, rotary_dim=6),
    "rope[interleaved]": lambda: check_rope(interleaved=True, rotary_dim=10),
    "rope[interleaved_partial]": lambda: check_rope(interleaved=True, rotary_dim=6),
    "gated[silu]": lambda: check_gated("silu"),
    "gated[gelu_tanh]": lambda: check_gated("gelu_tanh"),
    "cross_entropy[plain]": lambda: check_cross_entropy(softcap=None),
    "cross_entropy[softcap]": lambda: check_cross_entropy(softcap=5.0),
    "log_probs[plain]": lambda: check_log_probs(softcap=None),
    "log_probs[softcap]": lambda: check_log_probs(softcap=30.0),
}


def _run_checks() -> dict[str, str]:
    results = {}
    for name, check in CHECKS.items():
        try:
            check()
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
    return results


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, str]:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", FORGE_KERNELS="triton", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, __file__], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(CHECKS))
def test_triton_kernel_matches_reference(interpreted_results: dict[str, str], name: str) -> None:
    assert interpreted_results[name] == "ok", interpreted_results[name]


# ---- the dispatch rule (in this process) ----------------------------------------------------------------


def test_cpu_tensors_take_the_reference_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default on a CPU run: the reference, bit for bit (the model's numerics do not move)."""
    monkeypatch.delenv(dispatch.ENV, raising=False)
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 16, generator=gen), torch.randn(16, generator=gen)
    assert not dispatch.use_triton(x, w)
    assert torch.equal(kernels.rms_norm(x, w, 1e-6, True), reference.rms_norm(x, w, 1e-6, True))
    assert torch.equal(kernels.gated_activation(x, x, "silu"), F.silu(x) * x)
    q, cos = torch.randn(1, 2, 4, 16, generator=gen), torch.randn(1, 4, 8, generator=gen)
    assert torch.equal(kernels.apply_rotary(q, cos, cos, True), reference.apply_rotary(q, cos, cos, True))
    targets = torch.tensor([1, -100, 3, 0])
    assert torch.equal(
        kernels.linear_cross_entropy(x, w.view(-1, 4).repeat(1, 4), targets),
        F.cross_entropy(x @ w.view(-1, 4).repeat(1, 4).T, targets, reduction="none"),
    )


def test_model_modules_call_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """RMSNorm, GatedMLP and apply_rope go through trainer.kernels (the one place that dispatches)."""
    from forge_lm.trainer.model.layers import GatedMLP, RMSNorm
    from forge_lm.trainer.model.rope import apply_rope

    calls = []
    for name in ("rms_norm", "gated_activation", "apply_rotary"):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    x = torch.randn(2, 3, 8)
    RMSNorm(8)(x)
    GatedMLP(8, 12, "gelu_tanh")(x)
    apply_rope(x[None], torch.ones(1, 3, 8), torch.zeros(1, 3, 8))
    assert calls == ["rms_norm", "gated_activation", "apply_rotary"]


def test_dispatch_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(2)
    monkeypatch.setenv(dispatch.ENV, "reference")
    assert not dispatch.use_triton(x)
    monkeypatch.setenv(dispatch.ENV, "auto")
    assert not dispatch.use_triton(x)  # CPU tensors
    monkeypatch.setenv(dispatch.ENV, "fast")
    with pytest.raises(ValueError, match="FORGE_KERNELS"):
        dispatch.use_triton(x)

    # Forced, but a tensor subclass (as DTensor is) or torch.compile's tracing still gets the reference.
    monkeypatch.setenv(dispatch.ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)

    class Wrapped(torch.Tensor):
        pass

    assert not dispatch.use_triton(x, x.as_subclass(Wrapped))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not dispatch.use_triton(x)


def test_forced_triton_explains_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dispatch.ENV, "triton")
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="does not import"):
        dispatch.use_triton(torch.zeros(1))
    if importlib.util.find_spec("triton") is not None:
        monkeypatch.setattr(dispatch, "triton_available", lambda: True)
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            dispatch.use_triton(torch.zeros(1))


# ---- compiled for a GPU, without one ---------------------------------------------------------------------

# The interpreter runs a kernel as Python, so it cannot catch what only the compiler rejects. Triton
# compiles down to a cubin for a given GPU target without needing the GPU itself (ptxas ships with it).
_I32 = "i32"
_ROPE_STRIDES = {k: _I32 for k in "sx_b sx_h sx_t sy_b sy_h sy_t sc_b sc_t ss_b ss_t T H HALF PASS".split()}
_CE_FWD = dict(
    LOGITS="*bf16", stride_l=_I32, TARGETS="*i64", RUN_MAX="*fp32", RUN_SUM="*fp32", TARGET_LOGIT="*fp32",
    BEST="*fp32", BEST_IDX="*i64", vocab_start=_I32, n_cols=_I32, softcap="fp32",
)  # fmt: skip
_CE_BWD = dict(
    LOGITS="*bf16", stride_l=_I32, TARGETS="*i64", LSE="*fp32", DLOSS="*fp32", vocab_start=_I32,
    n_cols=_I32, softcap="fp32", ignore_index=_I32,
)  # fmt: skip
_RMS_FWD = dict(
    X="*bf16", W="*bf16", Y="*bf16", RSTD="*fp32", stride_x=_I32, stride_y=_I32, D=_I32, eps="fp32"
)
_RMS_BWD = dict(
    DY="*bf16", X="*bf16", W="*fp32", RSTD="*fp32", DX="*bf16", DW_PARTS="*fp32",
    stride_dy=_I32, stride_x=_I32, stride_dx=_I32, N=_I32, D=_I32, rows_per_program=_I32,
)  # fmt: skip
_GATED_FWD = dict(GATE="*bf16", UP="*bf16", OUT="*bf16", n=_I32)
_GATED_BWD = dict(DY="*bf16", GATE="*bf16", UP="*bf16", DGATE="*bf16", DUP="*bf16", n=_I32)
_ROPE = dict(X="*bf16", COS="*bf16", SIN="*bf16", Y="*bf16", **_ROPE_STRIDES)
_ROPE_MIXED = dict(X="*fp32", COS="*bf16", SIN="*bf16", Y="*fp32", **_ROPE_STRIDES)  # autocast: fp32 tables
COMPILE_CASES = {
    "rms_norm_fwd": ("triton_rms_norm", "_rms_norm_fwd", _RMS_FWD, dict(UNIT_OFFSET=False, BLOCK_D=2048)),
    "rms_norm_bwd": ("triton_rms_norm", "_rms_norm_bwd", _RMS_BWD, dict(UNIT_OFFSET=True, BLOCK_D=2048)),
    "rope_fwd_glm": (
        "triton_rope", "_rope_kernel", _ROPE,
        dict(INTERLEAVED=True, BACKWARD=False, BLOCK_H=16, BLOCK_HALF=32, BLOCK_PASS=64),
    ),
    "rope_bwd_mixed": (
        "triton_rope", "_rope_kernel", _ROPE_MIXED,
        dict(INTERLEAVED=False, BACKWARD=True, BLOCK_H=16, BLOCK_HALF=64, BLOCK_PASS=0),
    ),
    "swiglu_fwd": ("triton_gated", "_gated_fwd", _GATED_FWD, dict(ACTIVATION="silu", BLOCK=1024)),
    "swiglu_bwd": ("triton_gated", "_gated_bwd", _GATED_BWD, dict(ACTIVATION="silu", BLOCK=1024)),
    "geglu_fwd": ("triton_gated", "_gated_fwd", _GATED_FWD, dict(ACTIVATION="gelu_tanh", BLOCK=1024)),
    "geglu_bwd": ("triton_gated", "_gated_bwd", _GATED_BWD, dict(ACTIVATION="gelu_tanh", BLOCK=1024)),
    "ce_fwd": (
        "triton_cross_entropy", "_ce_fwd_tile", _CE_FWD,
        dict(HAS_SOFTCAP=False, TRACK_ARGMAX=False, BLOCK_V=2048),
    ),
    "ce_fwd_softcap_argmax": (
        "triton_cross_entropy", "_ce_fwd_tile", _CE_FWD,
        dict(HAS_SOFTCAP=True, TRACK_ARGMAX=True, BLOCK_V=2048),
    ),
    "ce_bwd": ("triton_cross_entropy", "_ce_bwd_tile", _CE_BWD, dict(HAS_SOFTCAP=False, BLOCK_V=2048)),
    "ce_bwd_softcap": ("triton_cross_entropy", "_ce_bwd_tile", _CE_BWD, dict(HAS_SOFTCAP=True, BLOCK_V=2048)),
}  # fmt: skip


@pytest.mark.parametrize("case", list(COMPILE_CASES))
def test_kernel_compiles_for_a_gpu(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every kernel variant compiles to a cubin for an H100-class GPU (sm_90), GPU or not."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    module, name, signature, constexprs = COMPILE_CASES[case]
    kernel = getattr(importlib.import_module(f"forge_lm.trainer.kernels.{module}"), name)
    if not isinstance(kernel, JITFunction):
        pytest.skip("the kernels were decorated for the interpreter (TRITON_INTERPRET=1)")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # compile for real, not from a cache
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said explicitly (no warning)
    source = ASTSource(kernel, {**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8))
    assert compiled.asm["cubin"]


# ---- on a GPU: the compiled kernels in bf16, and the memory the fused cross-entropy saves ---------------

_compiled_triton = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="needs compiled, not interpreted, Triton"
)


def needs_gpu(test):
    return pytest.mark.gpu(_compiled_triton(test))


def _assert_close_bf16(got: torch.Tensor, expected: torch.Tensor, tol: float = 2e-2) -> None:
    """Within `tol` of the reference's largest magnitude: bf16 keeps 8 bits, and sums in another order may
    land a value one rounding step away."""
    scale = expected.float().abs().max().clamp_min(1e-6)
    err = (got.float() - expected.float()).abs().max()
    assert err <= tol * scale, f"max error {err.item():.3g} vs scale {scale.item():.3g}"


@needs_gpu
@pytest.mark.parametrize("kernel", ["rms_norm", "rms_norm_unit", "rope", "rope_glm", "silu", "gelu_tanh"])
def test_bf16_kernels_cuda(kernel: str) -> None:
    torch.manual_seed(0)
    dev, bf16 = "cuda", torch.bfloat16
    if kernel.startswith("rms_norm"):
        unit = kernel == "rms_norm_unit"
        x = torch.randn(4, 256, 2048, device=dev, dtype=bf16, requires_grad=True)
        w = (torch.randn(2048, device=dev) * 0.1 + (0.0 if unit else 1.0)).to(bf16).requires_grad_()
        inputs, call = (x, w), lambda mod, a, b: mod.rms_norm(a, b, 1e-6, unit)
    elif kernel.startswith("rope"):
        glm = kernel == "rope_glm"  # interleaved, half the dimensions rotated
        rd = 64 if glm else 128
        x = torch.randn(2, 1024, 16, 128, device=dev, dtype=bf16).transpose(1, 2).requires_grad_()
        ang = torch.arange(1024, device=dev)[None, :, None] * torch.rand(1, 1, rd // 2, device=dev)
        ang = ang.expand(2, -1, -1)
        ang = ang.repeat_interleave(2, -1) if glm else torch.cat((ang, ang), -1)
        cos, sin = ang.cos().to(bf16), ang.sin().to(bf16)
        inputs, call = (x,), lambda mod, a: mod.apply_rotary(a, cos, sin, glm)
    else:
        gate = torch.randn(4, 512, 5632, device=dev, dtype=bf16, requires_grad=True)
        up = torch.randn(4, 512, 5632, device=dev, dtype=bf16, requires_grad=True)
        inputs, call = (gate, up), lambda mod, a, b: mod.gated_activation(a, b, kernel)
    upstream = torch.randn_like(call(reference, *inputs))
    expected = _fwd_bwd(lambda *a: call(reference, *a), inputs, upstream)
    with _reference_forbidden():
        got = _fwd_bwd(lambda *a: call(kernels, *a), inputs, upstream)
    assert got[0].dtype == expected[0].dtype
    for g, e in zip((got[0], *got[1]), (expected[0], *expected[1])):
        _assert_close_bf16(g, e)


@needs_gpu
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_bf16_cross_entropy_cuda(softcap: float | None) -> None:
    torch.manual_seed(0)
    N, d, V = 4096, 1024, 50000  # several vocab chunks, the last one partial
    h = (torch.randn(N, d, device="cuda") * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(V, d, device="cuda") * 0.05).bfloat16().requires_grad_()
    targets = torch.randint(0, V, (N,), device="cuda")
    targets[::7] = -100
    upstream = torch.rand(N, device="cuda")
    expected = _fwd_bwd(lambda a, b: reference.linear_cross_entropy(a, b, targets, softcap), (h, w), upstream)
    with _reference_forbidden():
        got = _fwd_bwd(lambda a, b: kernels.linear_cross_entropy(a, b, targets, softcap), (h, w), upstream)
    torch.testing.assert_close(got[0], expected[0], atol=2e-2, rtol=1e-2)  # fp32 losses of bf16 logits
    _assert_close_bf16(got[1][0], expected[1][0])
    _assert_close_bf16(got[1][1], expected[1][1])
    logprobs, is_argmax = kernels.linear_log_probs(h, w, targets.clamp_min(0), softcap)
    ref_logprobs, ref_argmax = reference.linear_log_probs(h, w, targets.clamp_min(0), softcap)
    torch.testing.assert_close(logprobs, ref_logprobs, atol=2e-2, rtol=1e-2)
    assert (is_argmax == ref_argmax).float().mean() > 0.99  # bf16 near-ties may resolve differently


@needs_gpu
def test_fused_cross_entropy_peak_memory_cuda(record_property) -> None:
    """Peak memory of forward + backward, fused vs logits materialised (recorded in the test report)."""
    N, d, V = 8192, 2048, 128256
    h = torch.randn(N, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(V, d, device="cuda") * 0.02).bfloat16().requires_grad_()
    targets = torch.randint(0, V, (N,), device="cuda")

    def peak_mib(fn: Callable) -> float:
        h.grad = w.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(h, w, targets).sum().backward()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    fused = peak_mib(kernels.linear_cross_entropy)
    unfused = peak_mib(reference.linear_cross_entropy)
    record_property("ce_peak_mib_fused", round(fused))
    record_property("ce_peak_mib_unfused", round(unfused))
    print(f"linear+CE N={N} d={d} V={V}: peak {fused:.0f} MiB fused vs {unfused:.0f} MiB unfused")
    assert fused < unfused / 4


if __name__ == "__main__":  # the subprocess of interpreted_results: one JSON line of results
    torch.set_num_threads(1)
    print(json.dumps(_run_checks()))
