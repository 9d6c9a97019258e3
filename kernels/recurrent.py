"""Triton recurrent kernel: one token at a time with an fp32 state in registers (decoding)."""

import torch
import triton.language as tl

from .chunk import sequence_span
from .utils import cdiv, kernel, pow2


@kernel
def recurrent_kernel(q, q_stride, k, k_stride, v, v_stride, beta, o, init, final, scale, cu, chunk_off, length,
                     UNIFORM: tl.constexpr, BT: tl.constexpr, H: tl.constexpr, R: tl.constexpr, K: tl.constexpr,
                     V: tl.constexpr, RP: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_INIT: tl.constexpr,
                     STORE_FINAL: tl.constexpr, NORMALIZE: tl.constexpr):
    """S ← S + Σ_i k_i β_i (v_i − S_prevᵀ k_i)ᵀ, o = scale Sᵀ q, for one sequence, head and V block.

    The R components are the rows of an RP-row tile (RP = pow2(R)). A token is too little work for tensor cores:
    the products are fp32 broadcasts and sums, exact to fp32 over long decodes. NORMALIZE: q and each k_i are first
    scaled to unit length, as F.normalize does (x / max(‖x‖, 1e-12)), in fp32 here rather than in launches of their
    own before the call. q, k and v are read by token stride (each token's entries contiguous), so that they can be
    slices of one projection.
    """
    seq = tl.program_id(0)
    h = tl.program_id(1)
    iv = tl.program_id(2)
    bos, eos, _ = sequence_span(cu, chunk_off, length, UNIFORM, seq, BT)
    kk = tl.arange(0, BK)
    vv = iv * BV + tl.arange(0, BV)
    r = tl.arange(0, RP)
    r_ok = r < R
    k_ok = kk < K
    v_ok = vv < V
    kv_mask = k_ok[:, None] & v_ok[None, :]
    kv = kk[:, None] * V + vv[None, :]
    state = (seq * H + h).to(tl.int64) * K * V
    if HAS_INIT:
        S = tl.load(init + state + kv, mask=kv_mask, other=0.0).to(tl.float32)
    else:
        S = tl.full([BK, BV], 0.0, tl.float32)
    n = bos
    while n < eos:
        sub = (n * H + h) * R + r
        b_q = tl.load(q + n * q_stride + h * K + kk, mask=k_ok, other=0.0).to(tl.float32)
        b_k = tl.load(k + (n * k_stride + (h * R + r) * K)[:, None] + kk[None, :], mask=r_ok[:, None] & k_ok[None, :],
                      other=0.0).to(tl.float32)
        b_v = tl.load(v + (n * v_stride + (h * R + r) * V)[:, None] + vv[None, :], mask=r_ok[:, None] & v_ok[None, :],
                      other=0.0).to(tl.float32)
        b_beta = tl.load(beta + sub, mask=r_ok, other=0.0).to(tl.float32)
        if NORMALIZE:
            b_q = b_q / tl.maximum(tl.sqrt(tl.sum(b_q * b_q, axis=0)), 1e-12)
            b_k = b_k / tl.maximum(tl.sqrt(tl.sum(b_k * b_k, axis=1)), 1e-12)[:, None]
        b_u = b_beta[:, None] * (b_v - tl.sum(b_k[:, :, None] * S[None, :, :], axis=1))
        S += tl.sum(b_k[:, :, None] * b_u[:, None, :], axis=0)
        b_o = tl.sum(b_q[:, None] * S, axis=0) * scale
        tl.store(o + (n * H + h) * V + vv, b_o.to(o.dtype.element_ty), mask=v_ok)
        n += 1
    if STORE_FINAL:
        tl.store(final + state + kv, S, mask=kv_mask)


# elements of a program's [RP, BK, BV] products: small V blocks put more programs in flight and keep them in registers;
# 2048 (BV = 16 at D = 128, R = 1) timed best from B = 4 up and within 5% of 1024 at B = 1 (H200; NOTES.md v11)
TILE_ELEMENTS = 2048
# one warp a program: a token's sums across K stay within the warp (shuffles, no shared memory or barriers)
LAUNCH = dict(num_warps=1, num_stages=1)


def blocks(R, K, V):
    """(BK, BV) of the recurrent kernel: all of K, and a V block of at most TILE_ELEMENTS / (RP·BK) columns."""
    bk = pow2(K)
    return bk, min(pow2(V), max(4, TILE_ELEMENTS // (pow2(R, 1) * bk)))


def recurrent_fwd(q, k, v, beta, scale, initial_state, plan, output_final_state, normalize_qk):
    """Forward only, packed tensors q [N,H,K], k [N,H,R,K], v [N,H,R,V] (their tokens may lie apart, as in
    ops.pack), beta [N,H,R], sequences as chunk.Plan; normalize_qk: q and k scaled to unit length first."""
    _, H, R, K = k.shape
    V = v.shape[-1]
    bk, bv = blocks(R, K, V)
    o = torch.empty(q.shape[0], H, V, dtype=q.dtype, device=q.device)
    final = q.new_empty(plan.n, H, K, V, dtype=torch.float32) if output_final_state else None
    recurrent_kernel[(plan.n, H, cdiv(V, bv))](q, q.stride(0), k, k.stride(0), v, v.stride(0), beta, o, initial_state,
                                              final, scale, *plan.sequences, plan.bt, H, R, K, V, plan.rp, bk, bv,
                                              initial_state is not None, output_final_state, normalize_qk, **LAUNCH)
    return o, final
