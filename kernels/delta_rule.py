"""Public entry points: parallel-flow DeltaNet (DESIGN.md §3) with input checks and dispatch.

    S_t = (I − Σ_i β_{t,i} k_{t,i} k_{t,i}ᵀ) S_{t−1} + Σ_i β_{t,i} k_{t,i} v_{t,i}ᵀ,   o_t = scale · S_tᵀ q_t

Shapes: q [B,T,H,K], k [B,T,H,R,K], v [B,T,H,R,V], beta [B,T,H,R]; for R = 1 also k [B,T,H,K],
v [B,T,H,V], beta [B,T,H]. Returns o [B,T,H,V] in the input dtype and the final state [N,H,K,V]
in float32 (float64 for float64 inputs), or None unless output_final_state. Keys are expected at unit
length; with normalize_qk=True every entry point scales q and each key to unit length itself
(x / max(‖x‖, 1e-12), as F.normalize, in float32 at least): inside the recurrent kernel, in PyTorch
(differentiable, fused by torch.compile) before the chunked kernels and the references.
"""

import math
from numbers import Real

import torch
import torch.nn.functional as F

from .naive import naive_recurrence
from .ops import chunk, recurrent
from .reference import reference_chunked
from .utils import interpreting

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_RANK = 4
MAX_DIM = 256
# The widest K and V the compiled kernels take on the GPU, by input dtype; delta_rule runs wider heads through the
# PyTorch reference there (the interpreter runs the kernels up to MAX_DIM). 16-bit tiles of 256 fit a block's 227 KB
# of shared memory at chunk.LAUNCH's D = 256 entries and pass test_wide_heads_compiled on the H200 (2026-12-05,
# kernels/benchmarks/NOTES.md v15); fp32 tiles of 256 spill 1-4 KB a thread and the reverse pass needs 384 KB
# (resources.py --dims 256 --dtype fp32, read on the CPU).
GPU_KERNEL_MAX_DIM = {torch.float16: 256, torch.bfloat16: 256, torch.float32: 128}
# without gradients, sequences up to this long run the recurrent kernel (decoding, short prefill)
RECURRENT_MAX_LEN = 16

__all__ = ["delta_rule", "delta_rule_reference", "delta_rule_naive", "l2_normalize"]


def _check_tensor(name, x, dims):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in dims:
        allowed = " or ".join(str(d) for d in dims)
        raise ValueError(f"{name} must have {allowed} dimensions, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def _check_shape(name, x, expected):
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} to match q, got {tuple(x.shape)}")


def _check_cu_seqlens(cu_seqlens, batch, total):
    """Validate cu_seqlens and return its offsets as a Python list."""
    if isinstance(cu_seqlens, (list, tuple)):
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in cu_seqlens):
            raise ValueError("cu_seqlens must hold integers")
        offsets = list(cu_seqlens)
    elif isinstance(cu_seqlens, torch.Tensor):
        dtype = cu_seqlens.dtype
        if cu_seqlens.dim() != 1 or dtype == torch.bool or dtype.is_floating_point or dtype.is_complex:
            raise ValueError(f"cu_seqlens must be a 1-D integer tensor, got dtype {cu_seqlens.dtype} and shape "
                             f"{tuple(cu_seqlens.shape)}")
        offsets = cu_seqlens.tolist()
    else:
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor or None, got {type(cu_seqlens).__name__}")
    if len(offsets) < 2:
        raise ValueError("cu_seqlens must hold at least two offsets [0, ..., T]")
    if batch != 1:
        raise ValueError(f"with cu_seqlens the batch size B must be 1 (documents packed along T), got B={batch}")
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {offsets[0]}")
    if any(b <= a for a, b in zip(offsets, offsets[1:])):
        raise ValueError("cu_seqlens must be strictly increasing (every document at least one token)")
    if offsets[-1] != total:
        raise ValueError(f"cu_seqlens must end at the total length T={total}, got {offsets[-1]}")
    return offsets


def _prepare(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens, normalize_qk):
    """Check every argument before any work; return canonical (rank-axis) tensors and metadata."""
    _check_tensor("q", q, (4,))
    _check_tensor("k", k, (4, 5))
    rank_axis = k.dim() == 5
    _check_tensor("v", v, (5,) if rank_axis else (4,))
    _check_tensor("beta", beta, (4,) if rank_axis else (3,))
    B, T, H, K = q.shape
    R = k.shape[3] if rank_axis else 1
    V = v.shape[-1]
    if T < 1:
        raise ValueError(f"q must hold at least one token (T >= 1), got T={T}")
    if not 1 <= R <= MAX_RANK:
        raise ValueError(f"k: the rank R (dimension 3) must be between 1 and {MAX_RANK}, got {R}")
    if not 1 <= K <= MAX_DIM:
        raise ValueError(f"q: the key dimension K must be between 1 and {MAX_DIM}, got {K}")
    if not 1 <= V <= MAX_DIM:
        raise ValueError(f"v: the value dimension V must be between 1 and {MAX_DIM}, got {V}")
    if H < 1 or B < 1:
        raise ValueError(f"q must have B >= 1 and H >= 1, got shape {tuple(q.shape)}")
    _check_shape("k", k, (B, T, H, R, K) if rank_axis else (B, T, H, K))
    _check_shape("v", v, (B, T, H, R, V) if rank_axis else (B, T, H, V))
    _check_shape("beta", beta, (B, T, H, R) if rank_axis else (B, T, H))
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
    for name, x in (("k", k), ("v", v), ("beta", beta)):
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}")
    if scale is None:
        scale = K**-0.5
    elif isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite real number or None, got {scale!r}")
    for name, flag in (("output_final_state", output_final_state), ("normalize_qk", normalize_qk)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool, got {flag!r}")
    offsets = None
    if cu_seqlens is not None:
        offsets = _check_cu_seqlens(cu_seqlens, B, T)
    N = B if offsets is None else len(offsets) - 1
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor) or initial_state.dtype not in FLOAT_DTYPES:
            raise ValueError("initial_state must be a floating-point tensor [N,H,K,V] or None")
        _check_shape("initial_state", initial_state, (N, H, K, V))
        if initial_state.device != q.device:
            raise ValueError(f"initial_state must be on q's device {q.device}, got {initial_state.device}")
    if not rank_axis:
        k, v, beta = k.unsqueeze(3), v.unsqueeze(3), beta.unsqueeze(3)
    return q, k, v, beta, float(scale), initial_state, offsets


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x scaled to unit length over its last axis, x / max(‖x‖, 1e-12), worked out in float32 at least and returned
    in x's dtype: what normalize_qk=True does to q and the keys."""
    return F.normalize(x if x.dtype == torch.float64 else x.float(), dim=-1).to(x.dtype)


def _per_document(fn, q, k, v, beta, scale, initial_state, output_final_state, offsets, normalize_qk):
    """Run a canonical-shape PyTorch implementation once per packed document and join the results.

    Autocast is off inside: it would run their float32 arithmetic in 16 bits (and the reference's triangular solve
    has no 16-bit CPU kernel)."""
    with torch.autocast(q.device.type, enabled=False):
        if normalize_qk:
            q, k = l2_normalize(q), l2_normalize(k)
        if offsets is None:
            return fn(q, k, v, beta, scale, initial_state, output_final_state)
        outs, states = [], []
        for n, (bos, eos) in enumerate(zip(offsets, offsets[1:])):
            init = None if initial_state is None else initial_state[n : n + 1]
            o, s = fn(q[:, bos:eos], k[:, bos:eos], v[:, bos:eos], beta[:, bos:eos], scale, init, output_final_state)
            outs.append(o)
            states.append(s)
        return torch.cat(outs, dim=1), (torch.cat(states) if output_final_state else None)


def _finish(q, o, state):
    state_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return o.to(q.dtype), (None if state is None else state.to(state_dtype))


def delta_rule_naive(q, k, v, beta, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                     normalize_qk=False):
    """Step-by-step recurrence, one token at a time: the ground truth (run it in float64 in tests)."""
    q, k, v, beta, scale, init, offsets = _prepare(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens,
                                                   normalize_qk)
    o, state = _per_document(naive_recurrence, q, k, v, beta, scale, init, output_final_state, offsets, normalize_qk)
    return _finish(q, o, state)


def delta_rule_reference(q, k, v, beta, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                         normalize_qk=False):
    """Chunked flows (UT transform per chunk, sequential state pass) in plain PyTorch.

    Any device and dtype; differentiable by autograd in q, k, v, beta and initial_state.
    """
    q, k, v, beta, scale, init, offsets = _prepare(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens,
                                                   normalize_qk)
    o, state = _per_document(reference_chunked, q, k, v, beta, scale, init, output_final_state, offsets, normalize_qk)
    return _finish(q, o, state)


def triton_enabled(device: torch.device) -> bool:
    """Whether the Triton kernels run: on CUDA, or anywhere under TRITON_INTERPRET=1."""
    return device.type == "cuda" or interpreting()


def _why_not_kernels(q, v) -> str | None:
    """Why the Triton kernels can't take these (canonical) tensors, or None when they can."""
    if q.dtype == torch.float64 or not triton_enabled(q.device):
        return (f"q: the Triton kernels need float16/bfloat16/float32 tensors on CUDA (or TRITON_INTERPRET=1), "
                f"got {q.dtype} on {q.device}")
    widest = GPU_KERNEL_MAX_DIM[q.dtype]
    if q.device.type == "cuda" and max(q.shape[-1], v.shape[-1]) > widest:
        return (f"q, v: on the GPU the Triton kernels take K and V up to {widest} for {q.dtype}, got "
                f"K={q.shape[-1]}, V={v.shape[-1]} (delta_rule runs wider heads through the PyTorch reference)")
    return None


def _chunked(q, k, v, beta, scale, init, offsets, output_final_state, normalize_qk, scan=None):
    qn, kn = (l2_normalize(q), l2_normalize(k)) if normalize_qk else (q, k)
    o, final, *_ = chunk(qn, kn, v, beta, init, scale, offsets, output_final_state, scan)
    return _finish(q, o, final if output_final_state else None)


def _recurrent(q, k, v, beta, scale, init, offsets, output_final_state, normalize_qk):
    o, final = recurrent(q, k, v, beta, init, scale, offsets, output_final_state, normalize_qk)
    return _finish(q, o, final if output_final_state else None)


def _triton_args(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens, normalize_qk):
    q, k, v, beta, scale, init, offsets = _prepare(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens,
                                                   normalize_qk)
    reason = _why_not_kernels(q, v)
    if reason is not None:
        raise ValueError(reason)
    return q, k, v, beta, scale, init, offsets


def chunk_delta_rule(q, k, v, beta, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                     normalize_qk=False, scan=None):
    """The chunked Triton path (training, prefill), whatever the length.

    scan: True or False forces the parallel scan over segment flows on or off; None lets the
    plan choose (on when few sequences × heads leave the GPU idle during the sequential pass).
    """
    q, k, v, beta, scale, init, offsets = _triton_args(q, k, v, beta, scale, initial_state, output_final_state,
                                                       cu_seqlens, normalize_qk)
    return _chunked(q, k, v, beta, scale, init, offsets, output_final_state, normalize_qk, scan)


def recurrent_delta_rule(q, k, v, beta, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                         normalize_qk=False):
    """The recurrent Triton path (decoding); forward only."""
    q, k, v, beta, scale, init, offsets = _triton_args(q, k, v, beta, scale, initial_state, output_final_state,
                                                       cu_seqlens, normalize_qk)
    return _recurrent(q, k, v, beta, scale, init, offsets, output_final_state, normalize_qk)


def delta_rule(q, k, v, beta, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
               normalize_qk=False):
    """Parallel-flow DeltaNet; the fast path for training, prefill and decoding.

    Differentiable in q, k, v, beta and initial_state. On CPU tensors (and for float64) it runs the
    PyTorch reference, except under TRITON_INTERPRET=1 where the Triton kernels run in the
    interpreter; so do heads wider than GPU_KERNEL_MAX_DIM on the GPU. Without gradients, sequences
    of at most RECURRENT_MAX_LEN tokens take the recurrent kernel, everything else the chunked one.
    normalize_qk: scale q and the keys to unit length first (the module docstring says where).
    """
    q, k, v, beta, scale, init, offsets = _prepare(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens,
                                                   normalize_qk)
    if _why_not_kernels(q, v) is not None:
        o, state = _per_document(reference_chunked, q, k, v, beta, scale, init, output_final_state, offsets,
                                 normalize_qk)  # fmt: skip
        return _finish(q, o, state)
    longest = q.shape[1] if offsets is None else max(b - a for a, b in zip(offsets, offsets[1:]))
    tensors = (q, k, v, beta) if init is None else (q, k, v, beta, init)
    if longest <= RECURRENT_MAX_LEN and not (torch.is_grad_enabled() and any(x.requires_grad for x in tensors)):
        return _recurrent(q, k, v, beta, scale, init, offsets, output_final_state, normalize_qk)
    return _chunked(q, k, v, beta, scale, init, offsets, output_final_state, normalize_qk)
