"""Triton recurrent kernel: one token at a time with an fp32 state in registers (decoding)."""

import torch
import triton.language as tl

from .chunk import sequence_span
from .utils import cdiv, kernel, pow2


@kernel
def recurrent_kernel(q, k, v, beta, o, init, final, scale, cu, chunk_off, length, UNIFORM: tl.constexpr,
                     BT: tl.constexpr, H: tl.constexpr, R: tl.constexpr, K: tl.constexpr,
                     V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_INIT: tl.constexpr,
                     STORE_FINAL: tl.constexpr):
    """S ← S + Σ_i k_i β_i (v_i − S_prevᵀ k_i)ᵀ, o = scale Sᵀ q, for one sequence, head and V block.

    The R components sit in the first rows of 16-row tiles (tl.dot's least size); q sits in row 0.
    fp32 products in "ieee" precision keep the state exact to fp32 over long decodes.
    """
    seq = tl.program_id(0)
    h = tl.program_id(1)
    iv = tl.program_id(2)
    bos, eos, _ = sequence_span(cu, chunk_off, length, UNIFORM, seq, BT)
    kk = tl.arange(0, BK)
    vv = iv * BV + tl.arange(0, BV)
    j = tl.arange(0, 16)
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
        sub = (n * H + h) * R + j
        b_q = tl.load(q + (n * H + h) * K + 0 * j[:, None] + kk[None, :], mask=(j[:, None] == 0) & k_ok[None, :],
                      other=0.0).to(tl.float32)
        b_k = tl.load(k + sub[:, None] * K + kk[None, :], mask=(j[:, None] < R) & k_ok[None, :], other=0.0).to(tl.float32)
        b_v = tl.load(v + sub[:, None] * V + vv[None, :], mask=(j[:, None] < R) & v_ok[None, :], other=0.0).to(tl.float32)
        b_beta = tl.load(beta + sub, mask=j < R, other=0.0).to(tl.float32)
        b_u = b_beta[:, None] * (b_v - tl.dot(b_k, S, input_precision="ieee"))
        S += tl.dot(tl.trans(b_k), b_u, input_precision="ieee")
        b_o = tl.dot(b_q, S, input_precision="ieee") * scale
        tl.store(o + (n * H + h) * V + 0 * j[:, None] + vv[None, :], b_o.to(o.dtype.element_ty),
                 mask=(j[:, None] == 0) & v_ok[None, :])
        n += 1
    if STORE_FINAL:
        tl.store(final + state + kv, S, mask=kv_mask)


def recurrent_fwd(q, k, v, beta, scale, initial_state, plan, output_final_state):
    """Forward only, packed tensors q [N,H,K], k [N,H,R,K], v [N,H,R,V], beta [N,H,R], sequences as chunk.Plan."""
    _, H, R, K = k.shape
    V = v.shape[-1]
    bk = pow2(K)
    # small V blocks: more programs in flight, and the fp32 state tile stays in registers
    bv = min(pow2(V), max(16, 4096 // bk))
    o = torch.empty(q.shape[0], H, V, dtype=q.dtype, device=q.device)
    final = q.new_empty(plan.n, H, K, V, dtype=torch.float32) if output_final_state else None
    recurrent_kernel[(plan.n, H, cdiv(V, bv))](q, k, v, beta, o, initial_state, final, scale, *plan.sequences,
                                              plan.bt, H, R, K, V, bk, bv, initial_state is not None, output_final_state)
    return o, final
