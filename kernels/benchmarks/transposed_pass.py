"""Experiment: the sequential state passes on the transposed state, so that their chains stay in registers.

chunk.state_fwd_kernel steps S_end = S_start + Kᵀ(Ũ − W S_start) with S and then U as the *second* operand of its
two products, and a Hopper wgmma reads its second operand from shared memory: each step writes S and U there, fences and
waits, twice, on the chain that sets the pass's time at small B·H (the step is latency-bound: 0.24 µs of issue in a
1.38 µs step, kernels/benchmarks/NOTES.md). Transposed, the same step is

    Uᵀ = Ũᵀ − Sᵀ Wᵀ,    Sᵀ ← Sᵀ + Uᵀ K

with the carried Sᵀ and the fresh Uᵀ as *first* operands, which wgmma takes from registers (as flash attention's P V
does), and only the loaded Wᵀ and K in shared memory. The reverse pass likewise carries dSᵀ:

    dUᵀ = dOᵀ Aᵀ + dSᵀ Kᵀ,    dSᵀ ← dSᵀ + dOᵀ Q − dUᵀ W    (Aᵀ = (Q Kᵀ) ⊙ causal, Q scaled)

Same arithmetic, same outputs (u, hs; du, dhs in chunk's layouts). `state_passes.py --variants T:64:4:4` times both
against the committed passes; promote them into chunk.py if they win, delete this file if not. Not the scan's
augmented flows.
"""

import triton.language as tl

from flowhn_kernels import chunk
from flowhn_kernels.chunk import sequence_span
from flowhn_kernels.utils import cdiv, dot_dtype, dot_precision, kernel


@kernel
def state_fwd_t_kernel(k, w, ut, u, hs, init, final, cu, chunk_off, length, UNIFORM: tl.constexpr,
                       H: tl.constexpr, R: tl.constexpr, K: tl.constexpr, V: tl.constexpr, RP: tl.constexpr,
                       BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_INIT: tl.constexpr,
                       STORE_FINAL: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """chunk.state_fwd_kernel's pass (AUG off) carrying Sᵀ [BV, BK] instead of S."""
    seq = tl.program_id(0)
    h = tl.program_id(1)
    iv = tl.program_id(2)
    ROWS: tl.constexpr = BT * RP
    bos, eos, g0 = sequence_span(cu, chunk_off, length, UNIFORM, seq, BT)
    r = tl.arange(0, ROWS)
    kk = tl.arange(0, BK)
    vv = iv * BV + tl.arange(0, BV)
    vk_mask = (vv[:, None] < V) & (kk[None, :] < K)
    vk = kk[None, :] * V + vv[:, None]  # element (v, k) of Sᵀ lives at S[k, v]
    state = (seq * H + h).to(tl.int64) * K * V
    if HAS_INIT:
        St = tl.load(init + state + vk, mask=vk_mask, other=0.0).to(tl.float32)
    else:
        St = tl.full([BV, BK], 0.0, tl.float32)
    for c in range((eos - bos + BT - 1) // BT):
        g = g0 + c
        base = (g * H + h) * ROWS + r
        tok = c * BT + r // RP
        row_ok = (tok < eos - bos) & (r % RP < R)
        sub = ((bos + tok) * H + h) * R + r % RP
        b_wt = tl.load(w + base[None, :] * K + kk[:, None], mask=kk[:, None] < K, other=0.0)
        b_utt = tl.load(ut + base[None, :] * V + vv[:, None], mask=vv[:, None] < V, other=0.0)
        b_k = tl.load(k + sub[:, None] * K + kk[None, :], mask=row_ok[:, None] & (kk[None, :] < K), other=0.0)
        tl.store(hs + (g * H + h) * K * V + vk, St.to(hs.dtype.element_ty), mask=vk_mask)
        b_ut = b_utt.to(tl.float32) - tl.dot(St.to(DT), b_wt.to(DT), input_precision=PREC)
        tl.store(u + base[None, :] * V + vv[:, None], b_ut.to(u.dtype.element_ty), mask=vv[:, None] < V)
        St += tl.dot(b_ut.to(DT), b_k.to(DT), input_precision=PREC)
    if STORE_FINAL:
        tl.store(final + state + vk, St, mask=vk_mask)


def state_pass(k, w, ut, init, plan, final, aug, u=None, hs=None):
    """chunk._state_pass's signature and outputs, through the transposed kernel."""
    if aug:
        raise ValueError("transposed_pass.state_pass: the scan's augmented flows are not implemented here")
    _, H, R, K = k.shape
    V = ut.shape[-1]
    bk, bv = chunk._blocks(K, V)
    state_fwd_t_kernel[(plan.n, H, cdiv(V, bv))](
        k, w, ut, u, hs, init, final, *plan.sequences, H, R, K, V, plan.rp, plan.bt, bk, bv,
        init is not None, final is not None, dot_dtype(k.dtype), dot_precision(k.dtype),
        **chunk.launch("state_fwd", K, k.dtype))


@kernel
def state_bwd_t_kernel(q, k, w, do, du, dhs, dfinal, dinit, scale, cu, chunk_off, length, UNIFORM: tl.constexpr,
                       H: tl.constexpr, R: tl.constexpr, K: tl.constexpr, V: tl.constexpr, RP: tl.constexpr,
                       BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_DFINAL: tl.constexpr,
                       STORE_DINIT: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """chunk.state_bwd_kernel's pass (AUG off) carrying dSᵀ [BV, BK] instead of dS."""
    seq = tl.program_id(0)
    h = tl.program_id(1)
    iv = tl.program_id(2)
    ROWS: tl.constexpr = BT * RP
    bos, eos, g0 = sequence_span(cu, chunk_off, length, UNIFORM, seq, BT)
    r = tl.arange(0, ROWS)
    t = tl.arange(0, BT)
    kk = tl.arange(0, BK)
    vv = iv * BV + tl.arange(0, BV)
    vk_mask = (vv[:, None] < V) & (kk[None, :] < K)
    vk = kk[None, :] * V + vv[:, None]
    state = (seq * H + h).to(tl.int64) * K * V
    if HAS_DFINAL:
        dSt = tl.load(dfinal + state + vk, mask=vk_mask, other=0.0).to(tl.float32)
    else:
        dSt = tl.full([BV, BK], 0.0, tl.float32)
    nc = (eos - bos + BT - 1) // BT
    for i in range(nc):
        c = nc - 1 - i
        g = g0 + c
        tl.store(dhs + (g * H + h) * K * V + vk, dSt.to(dhs.dtype.element_ty), mask=vk_mask)
        tq = c * BT + t
        q_ok = tq < eos - bos
        tok = c * BT + r // RP
        comp = r % RP
        row_ok = (tok < eos - bos) & (comp < R)
        sub = ((bos + tok) * H + h) * R + comp
        b_q = tl.load(q + ((bos + tq) * H + h)[:, None] * K + kk[None, :], mask=q_ok[:, None] & (kk[None, :] < K),
                      other=0.0).to(DT)
        b_q = (b_q.to(tl.float32) * scale).to(DT)
        b_kt = tl.load(k + sub[None, :] * K + kk[:, None], mask=row_ok[None, :] & (kk[:, None] < K), other=0.0).to(DT)
        b_dot = tl.load(do + ((bos + tq) * H + h)[None, :] * V + vv[:, None], mask=q_ok[None, :] & (vv[:, None] < V),
                        other=0.0).to(DT)
        base = (g * H + h) * ROWS + r
        b_w = tl.load(w + base[:, None] * K + kk[None, :], mask=kk[None, :] < K, other=0.0).to(DT)
        at_t = tl.dot(b_q, b_kt, input_precision=PREC)
        at_t = tl.where(t[:, None] >= (r // RP)[None, :], at_t, 0.0)
        b_dut = tl.dot(b_dot, at_t.to(DT), input_precision=PREC) + tl.dot(dSt.to(DT), b_kt, input_precision=PREC)
        tl.store(du + base[None, :] * V + vv[:, None], b_dut.to(du.dtype.element_ty), mask=vv[:, None] < V)
        dSt += (tl.dot(b_dot, b_q, input_precision=PREC)
                - tl.dot(b_dut.to(DT), b_w, input_precision=PREC))
    if STORE_DINIT:
        tl.store(dinit + state + vk, dSt, mask=vk_mask)


def reverse_pass(q, k, w, do, scale, dfinal, plan, dinit, aug, du=None, dhs=None):
    """chunk._reverse_pass's signature and outputs, through the transposed kernel."""
    if aug:
        raise ValueError("transposed_pass.reverse_pass: the scan's augmented flows are not implemented here")
    _, H, R, K = k.shape
    V = do.shape[-1]
    bk, bv = chunk._blocks(K, V)
    state_bwd_t_kernel[(plan.n, H, cdiv(V, bv))](
        q, k, w, do, du, dhs, dfinal, dinit, scale, *plan.sequences, H, R, K, V, plan.rp, plan.bt, bk, bv,
        dfinal is not None, dinit is not None, dot_dtype(k.dtype), dot_precision(k.dtype),
        **chunk.launch("state_bwd", K, k.dtype))
