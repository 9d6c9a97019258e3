"""Triton kernels for chunked parallel-flow DeltaNet, forward and backward (DESIGN.md §3).

A chunk holds ROWS = BT·RP rows (BT tokens × RP components, RP = R rounded up to a power of
two; the extra components are masked to β = 0, k = 0 and drop out). Sequences are always
described by cu_seqlens (a batch of B equal sequences is B packed documents), so one set of
kernels covers both layouts. Per chunk g and head h the kernels keep:

  tinv [NC,H,ROWS,ROWS] fp32   T = (I + strict ⊙ diag(β) K Kᵀ)⁻¹ (saved for backward)
  w, ut [NC,H,ROWS,K|V]        W = T diag(β) K, Ũ = T diag(β) V (recomputed in backward)
  hs [NC,H,K,V]                the state entering the chunk (recomputed in backward)
  u [NC,H,ROWS,V]              U = Ũ − W S_start
Nothing per token and K×V is ever stored.
"""

import functools

import torch
import triton
import triton.language as tl

from .utils import dot_dtype, kernel, pow2

ROWS = 64


@kernel
def prep_kernel(k, v, beta, tinv, w, ut, cu, chunk_idx, H: tl.constexpr, R: tl.constexpr, K: tl.constexpr,
                V: tl.constexpr, RP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                LOG2BT: tl.constexpr, LOAD_TINV: tl.constexpr, DT: tl.constexpr):
    """UT transform of one chunk: T (computed, or loaded in backward), then W and Ũ."""
    g = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    ROWS: tl.constexpr = BT * RP
    seq = tl.load(chunk_idx + 2 * g)
    c = tl.load(chunk_idx + 2 * g + 1)
    bos = tl.load(cu + seq).to(tl.int64)
    eos = tl.load(cu + seq + 1).to(tl.int64)
    r = tl.arange(0, ROWS)
    tok = c * BT + r // RP
    comp = r % RP
    row_ok = (tok < eos - bos) & (comp < R)
    sub = ((bos + tok) * H + h) * R + comp
    kk = tl.arange(0, BK)
    b_k = tl.load(k + sub[:, None] * K + kk[None, :], mask=row_ok[:, None] & (kk[None, :] < K), other=0.0).to(DT)
    b_beta = tl.load(beta + sub, mask=row_ok, other=0.0).to(tl.float32)
    tile = (g * H + h) * ROWS * ROWS + r[:, None] * ROWS + r[None, :]
    if LOAD_TINV:
        b_t = tl.load(tinv + tile)
    else:
        a = tl.dot(b_k, tl.trans(b_k)) * b_beta[:, None]
        a = tl.where((r // RP)[:, None] > (r // RP)[None, :], a, 0.0)
        # (I + A)⁻¹ = (I − A)(I + A²)(I + A⁴)…: A is nilpotent of index ≤ BT (token-strict)
        b_t = tl.where(r[:, None] == r[None, :], 1.0, 0.0) - a
        p = a
        for _ in tl.static_range(LOG2BT - 1):
            p = tl.dot(p, p, input_precision="tf32x3")
            b_t = b_t + tl.dot(b_t, p, input_precision="tf32x3")
        tl.store(tinv + tile, b_t)
    b_tl = b_t.to(DT)
    base = (g * H + h) * ROWS + r
    b_w = tl.dot(b_tl, (b_k * b_beta[:, None]).to(DT))
    tl.store(w + base[:, None] * K + kk[None, :], b_w.to(w.dtype.element_ty), mask=kk[None, :] < K)
    for iv in range((V + BV - 1) // BV):
        vv = iv * BV + tl.arange(0, BV)
        b_v = tl.load(v + sub[:, None] * V + vv[None, :], mask=row_ok[:, None] & (vv[None, :] < V), other=0.0).to(DT)
        b_ut = tl.dot(b_tl, (b_v * b_beta[:, None]).to(DT))
        tl.store(ut + base[:, None] * V + vv[None, :], b_ut.to(ut.dtype.element_ty), mask=vv[None, :] < V)


@kernel
def state_fwd_kernel(k, w, ut, u, hs, init, final, cu, chunk_off, H: tl.constexpr, R: tl.constexpr,
                     K: tl.constexpr, V: tl.constexpr, RP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr, DT: tl.constexpr):
    """Sequential pass over one sequence's chunks: S_end = S_start + Kᵀ(Ũ − W S_start)."""
    seq = tl.program_id(0)
    h = tl.program_id(1)
    iv = tl.program_id(2)
    ROWS: tl.constexpr = BT * RP
    bos = tl.load(cu + seq).to(tl.int64)
    eos = tl.load(cu + seq + 1).to(tl.int64)
    g0 = tl.load(chunk_off + seq).to(tl.int64)
    r = tl.arange(0, ROWS)
    kk = tl.arange(0, BK)
    vv = iv * BV + tl.arange(0, BV)
    kv_mask = (kk[:, None] < K) & (vv[None, :] < V)
    kv = kk[:, None] * V + vv[None, :]
    state = (seq * H + h).to(tl.int64) * K * V
    if HAS_INIT:
        S = tl.load(init + state + kv, mask=kv_mask, other=0.0).to(tl.float32)
    else:
        S = tl.full([BK, BV], 0.0, tl.float32)
    nc = (eos - bos + BT - 1) // BT
    c = 0
    while c < nc:
        g = g0 + c
        tl.store(hs + (g * H + h) * K * V + kv, S.to(hs.dtype.element_ty), mask=kv_mask)
        base = (g * H + h) * ROWS + r
        b_w = tl.load(w + base[:, None] * K + kk[None, :], mask=kk[None, :] < K, other=0.0).to(DT)
        b_ut = tl.load(ut + base[:, None] * V + vv[None, :], mask=vv[None, :] < V, other=0.0)
        b_u = b_ut.to(tl.float32) - tl.dot(b_w, S.to(DT))
        tl.store(u + base[:, None] * V + vv[None, :], b_u.to(u.dtype.element_ty), mask=vv[None, :] < V)
        tok = c * BT + r // RP
        comp = r % RP
        row_ok = (tok < eos - bos) & (comp < R)
        sub = ((bos + tok) * H + h) * R + comp
        b_kt = tl.load(k + sub[None, :] * K + kk[:, None], mask=row_ok[None, :] & (kk[:, None] < K), other=0.0).to(DT)
        S += tl.dot(b_kt, b_u.to(DT))
        c += 1
    if STORE_FINAL:
        tl.store(final + state + kv, S, mask=kv_mask)


@kernel
def output_kernel(q, k, u, hs, o, scale, cu, chunk_idx, H: tl.constexpr, R: tl.constexpr, K: tl.constexpr,
                  V: tl.constexpr, RP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  DT: tl.constexpr):
    """o = scale·(Q S_start + (Q Kᵀ ⊙ causal) U) for one chunk and one block of V."""
    g = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    iv = tl.program_id(2)
    ROWS: tl.constexpr = BT * RP
    seq = tl.load(chunk_idx + 2 * g)
    c = tl.load(chunk_idx + 2 * g + 1)
    bos = tl.load(cu + seq).to(tl.int64)
    eos = tl.load(cu + seq + 1).to(tl.int64)
    r = tl.arange(0, ROWS)
    t = tl.arange(0, BT)
    kk = tl.arange(0, BK)
    vv = iv * BV + tl.arange(0, BV)
    tq = c * BT + t
    q_ok = tq < eos - bos
    tok = c * BT + r // RP
    comp = r % RP
    row_ok = (tok < eos - bos) & (comp < R)
    sub = ((bos + tok) * H + h) * R + comp
    b_q = tl.load(q + ((bos + tq) * H + h)[:, None] * K + kk[None, :], mask=q_ok[:, None] & (kk[None, :] < K), other=0.0).to(DT)
    b_k = tl.load(k + sub[:, None] * K + kk[None, :], mask=row_ok[:, None] & (kk[None, :] < K), other=0.0).to(DT)
    a = tl.dot(b_q, tl.trans(b_k))
    a = tl.where(t[:, None] >= (r // RP)[None, :], a, 0.0)
    b_s = tl.load(hs + (g * H + h) * K * V + kk[:, None] * V + vv[None, :], mask=(kk[:, None] < K) & (vv[None, :] < V), other=0.0)
    b_u = tl.load(u + ((g * H + h) * ROWS + r)[:, None] * V + vv[None, :], mask=vv[None, :] < V, other=0.0)
    b_o = tl.dot(b_q, b_s.to(DT)) + tl.dot(a.to(DT), b_u.to(DT))
    tl.store(o + ((bos + tq) * H + h)[:, None] * V + vv[None, :], (b_o * scale).to(o.dtype.element_ty),
             mask=q_ok[:, None] & (vv[None, :] < V))


@kernel
def state_bwd_kernel(q, k, w, do, du, dhs, dfinal, dinit, scale, cu, chunk_off, H: tl.constexpr, R: tl.constexpr,
                     K: tl.constexpr, V: tl.constexpr, RP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr, HAS_DFINAL: tl.constexpr, STORE_DINIT: tl.constexpr, DT: tl.constexpr):
    """Reverse pass: dU = scale (QKᵀ⊙causal)ᵀ dO + K dS_end, dS_start = dS_end + scale Qᵀ dO − Wᵀ dU."""
    seq = tl.program_id(0)
    h = tl.program_id(1)
    iv = tl.program_id(2)
    ROWS: tl.constexpr = BT * RP
    bos = tl.load(cu + seq).to(tl.int64)
    eos = tl.load(cu + seq + 1).to(tl.int64)
    g0 = tl.load(chunk_off + seq).to(tl.int64)
    r = tl.arange(0, ROWS)
    t = tl.arange(0, BT)
    kk = tl.arange(0, BK)
    vv = iv * BV + tl.arange(0, BV)
    kv_mask = (kk[:, None] < K) & (vv[None, :] < V)
    kv = kk[:, None] * V + vv[None, :]
    state = (seq * H + h).to(tl.int64) * K * V
    if HAS_DFINAL:
        dS = tl.load(dfinal + state + kv, mask=kv_mask, other=0.0).to(tl.float32)
    else:
        dS = tl.full([BK, BV], 0.0, tl.float32)
    c = (eos - bos + BT - 1) // BT - 1
    while c >= 0:
        g = g0 + c
        tl.store(dhs + (g * H + h) * K * V + kv, dS.to(dhs.dtype.element_ty), mask=kv_mask)
        tq = c * BT + t
        q_ok = tq < eos - bos
        tok = c * BT + r // RP
        comp = r % RP
        row_ok = (tok < eos - bos) & (comp < R)
        sub = ((bos + tok) * H + h) * R + comp
        b_q = tl.load(q + ((bos + tq) * H + h)[:, None] * K + kk[None, :], mask=q_ok[:, None] & (kk[None, :] < K), other=0.0).to(DT)
        b_q = (b_q.to(tl.float32) * scale).to(DT)
        b_k = tl.load(k + sub[:, None] * K + kk[None, :], mask=row_ok[:, None] & (kk[None, :] < K), other=0.0).to(DT)
        b_do = tl.load(do + ((bos + tq) * H + h)[:, None] * V + vv[None, :], mask=q_ok[:, None] & (vv[None, :] < V), other=0.0).to(DT)
        base = (g * H + h) * ROWS + r
        b_w = tl.load(w + base[:, None] * K + kk[None, :], mask=kk[None, :] < K, other=0.0).to(DT)
        at = tl.dot(b_k, tl.trans(b_q))
        at = tl.where(t[None, :] >= (r // RP)[:, None], at, 0.0)
        b_du = tl.dot(at.to(DT), b_do) + tl.dot(b_k, dS.to(DT))
        tl.store(du + base[:, None] * V + vv[None, :], b_du.to(du.dtype.element_ty), mask=vv[None, :] < V)
        dS += tl.dot(tl.trans(b_q), b_do) - tl.dot(tl.trans(b_w), b_du.to(DT))
        c -= 1
    if STORE_DINIT:
        tl.store(dinit + state + kv, dS, mask=kv_mask)


@kernel
def grad_kernel(q, k, v, beta, tinv, u, hs, du, dhs, do, dq, dk, dv, dbeta, scale, cu, chunk_idx, H: tl.constexpr,
                R: tl.constexpr, K: tl.constexpr, V: tl.constexpr, RP: tl.constexpr, BT: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr):
    """Gradients of one chunk's q, k, v, β from S_start, dS_end, U and dU (DESIGN.md §3 flows)."""
    g = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    ROWS: tl.constexpr = BT * RP
    seq = tl.load(chunk_idx + 2 * g)
    c = tl.load(chunk_idx + 2 * g + 1)
    bos = tl.load(cu + seq).to(tl.int64)
    eos = tl.load(cu + seq + 1).to(tl.int64)
    r = tl.arange(0, ROWS)
    t = tl.arange(0, BT)
    kk = tl.arange(0, BK)
    tq = c * BT + t
    q_ok = tq < eos - bos
    tok = c * BT + r // RP
    comp = r % RP
    row_ok = (tok < eos - bos) & (comp < R)
    sub = ((bos + tok) * H + h) * R + comp
    qrow = (bos + tq) * H + h
    b_q = tl.load(q + qrow[:, None] * K + kk[None, :], mask=q_ok[:, None] & (kk[None, :] < K), other=0.0)
    b_k = tl.load(k + sub[:, None] * K + kk[None, :], mask=row_ok[:, None] & (kk[None, :] < K), other=0.0).to(DT)
    b_beta = tl.load(beta + sub, mask=row_ok, other=0.0).to(tl.float32)
    b_t = tl.load(tinv + (g * H + h) * ROWS * ROWS + r[:, None] * ROWS + r[None, :])
    base = (g * H + h) * ROWS + r
    state = (g * H + h) * K * V
    b_dq = tl.full([BT, BK], 0.0, tl.float32)
    b_dk = tl.full([ROWS, BK], 0.0, tl.float32)
    b_dw = tl.full([ROWS, BK], 0.0, tl.float32)
    b_dqk = tl.full([BT, ROWS], 0.0, tl.float32)
    b_dtv = tl.full([ROWS, ROWS], 0.0, tl.float32)
    # row sums via a product with ones: every one of the 16 columns holds the sum
    b_dbeta = tl.full([ROWS, 16], 0.0, tl.float32)
    ones_v = tl.full([BV, 16], 1.0, tl.float32)
    ones_r = tl.full([ROWS, 16], 1.0, tl.float32)
    ones_k = tl.full([BK, 16], 1.0, tl.float32)
    for iv in range((V + BV - 1) // BV):
        vv = iv * BV + tl.arange(0, BV)
        v_ok = vv < V
        kv = kk[:, None] * V + vv[None, :]
        kv_mask = (kk[:, None] < K) & v_ok[None, :]
        b_s = tl.load(hs + state + kv, mask=kv_mask, other=0.0).to(DT)
        b_ds = tl.load(dhs + state + kv, mask=kv_mask, other=0.0).to(DT)
        b_u = tl.load(u + base[:, None] * V + vv[None, :], mask=v_ok[None, :], other=0.0).to(DT)
        b_du = tl.load(du + base[:, None] * V + vv[None, :], mask=v_ok[None, :], other=0.0)
        b_do = tl.load(do + qrow[:, None] * V + vv[None, :], mask=q_ok[:, None] & v_ok[None, :], other=0.0).to(DT)
        b_v = tl.load(v + sub[:, None] * V + vv[None, :], mask=row_ok[:, None] & v_ok[None, :], other=0.0)
        b_dq += tl.dot(b_do, tl.trans(b_s))
        b_dqk += tl.dot(b_do, tl.trans(b_u))
        b_dk += tl.dot(b_u, tl.trans(b_ds))
        b_dw += tl.dot(b_du.to(DT), tl.trans(b_s))
        b_dvt = tl.dot(tl.trans(b_t), b_du)
        tl.store(dv + sub[:, None] * V + vv[None, :], (b_dvt * b_beta[:, None]).to(dv.dtype.element_ty),
                 mask=row_ok[:, None] & v_ok[None, :])
        b_dbeta += tl.dot(b_dvt * b_v.to(tl.float32), ones_v, input_precision="ieee")
        b_dtv += tl.dot(b_du, tl.trans(b_v.to(tl.float32) * b_beta[:, None]))
    b_dqk = tl.where(t[:, None] >= (r // RP)[None, :], b_dqk, 0.0) * scale
    b_dq = b_dq * scale + tl.dot(b_dqk, b_k.to(tl.float32))
    tl.store(dq + qrow[:, None] * K + kk[None, :], b_dq.to(dq.dtype.element_ty), mask=q_ok[:, None] & (kk[None, :] < K))
    b_kf = b_k.to(tl.float32)
    b_dk += tl.dot(tl.trans(b_dqk), b_q.to(tl.float32))
    # W = T diag(β) K with dW = −dU S_startᵀ
    b_dkw = -tl.dot(tl.trans(b_t), b_dw)
    b_dk += b_dkw * b_beta[:, None]
    b_dbeta += tl.dot(b_dkw * b_kf, ones_k, input_precision="ieee")
    b_dtv -= tl.dot(b_dw, tl.trans(b_kf * b_beta[:, None]))
    # T = (I + A)⁻¹: dA = −Tᵀ dT Tᵀ on the strict mask, A = diag(β) K Kᵀ
    b_da = -tl.dot(tl.dot(tl.trans(b_t), b_dtv), tl.trans(b_t))
    b_da = tl.where((r // RP)[:, None] > (r // RP)[None, :], b_da, 0.0)
    b_dbeta += tl.dot(b_da * tl.dot(b_kf, tl.trans(b_kf)), ones_r, input_precision="ieee")
    b_da = b_da * b_beta[:, None]
    b_dk += tl.dot(b_da, b_kf) + tl.dot(tl.trans(b_da), b_kf)
    tl.store(dk + sub[:, None] * K + kk[None, :], b_dk.to(dk.dtype.element_ty), mask=row_ok[:, None] & (kk[None, :] < K))
    col = tl.arange(0, 16)
    tl.store(dbeta + sub[:, None] + 0 * col[None, :], b_dbeta.to(dbeta.dtype.element_ty),
             mask=row_ok[:, None] & (col[None, :] == 0))


def make_plan(batch, length, rank, device, offsets=None):
    """The Plan for a call; equal-length batches reuse theirs (decoding calls this every token)."""
    if offsets is None:
        return _uniform_plan(batch, length, rank, device)
    return Plan(batch, length, rank, device, offsets)


class Plan:
    """How the packed token axis splits into sequences and chunks."""

    def __init__(self, batch, length, rank, device, offsets=None):
        self.rp = triton.next_power_of_2(rank)
        self.bt = ROWS // self.rp
        bt = self.bt
        if offsets is None:
            nc = triton.cdiv(length, bt)
            self.n, self.nc, self.max_len = batch, batch * nc, length
            self.cu = torch.arange(batch + 1, device=device, dtype=torch.int32) * length
            seq = torch.arange(batch, device=device, dtype=torch.int32).repeat_interleave(nc)
            chunk = torch.arange(nc, device=device, dtype=torch.int32).repeat(batch)
            self.chunk_off = torch.arange(batch + 1, device=device, dtype=torch.int32) * nc
        else:
            lens = [b - a for a, b in zip(offsets, offsets[1:])]
            ncs = [triton.cdiv(n, bt) for n in lens]
            self.n, self.nc, self.max_len = len(lens), sum(ncs), max(lens)
            self.cu = torch.tensor(offsets, device=device, dtype=torch.int32)
            seq = torch.tensor([s for s, n in enumerate(ncs) for _ in range(n)], device=device, dtype=torch.int32)
            chunk = torch.tensor([c for n in ncs for c in range(n)], device=device, dtype=torch.int32)
            starts = [0]
            for n in ncs:
                starts.append(starts[-1] + n)
            self.chunk_off = torch.tensor(starts, device=device, dtype=torch.int32)
        self.chunk_idx = torch.stack([seq, chunk], dim=1).contiguous()


@functools.lru_cache(maxsize=64)
def _uniform_plan(batch, length, rank, device):
    return Plan(batch, length, rank, device)


def _blocks(K, V):
    bk = pow2(K)
    return bk, min(pow2(V), 64 if bk <= 128 else 32)


def _prep(k, v, beta, plan, tinv, load_tinv):
    _, H, R, K = k.shape
    V = v.shape[-1]
    bk, bv = _blocks(K, V)
    w = k.new_empty(plan.nc, H, ROWS, K)
    ut = v.new_empty(plan.nc, H, ROWS, V)
    prep_kernel[(plan.nc, H)](k, v, beta, tinv, w, ut, plan.cu, plan.chunk_idx, H, R, K, V, plan.rp, plan.bt, bk,
                              bv, plan.bt.bit_length() - 1, load_tinv, dot_dtype(k.dtype))
    return w, ut


def _state_fwd(k, w, ut, initial_state, plan, output_final_state):
    _, H, R, K = k.shape
    V = ut.shape[-1]
    bk, bv = _blocks(K, V)
    u = torch.empty_like(ut)
    hs = k.new_empty(plan.nc, H, K, V)
    final = k.new_empty(plan.n, H, K, V, dtype=torch.float32) if output_final_state else None
    state_fwd_kernel[(plan.n, H, triton.cdiv(V, bv))](
        k, w, ut, u, hs, initial_state, final, plan.cu, plan.chunk_off, H, R, K, V, plan.rp, plan.bt, bk, bv,
        initial_state is not None, output_final_state, dot_dtype(k.dtype))
    return u, hs, final


def chunk_fwd(q, k, v, beta, scale, initial_state, plan, output_final_state):
    """Forward on packed tensors q [N,H,K], k [N,H,R,K], v [N,H,R,V], beta [N,H,R].

    Returns o [N,H,V], the final state (or None) and T, which backward reuses.
    """
    _, H, R, K = k.shape
    V = v.shape[-1]
    tinv = k.new_empty(plan.nc, H, ROWS, ROWS, dtype=torch.float32)
    w, ut = _prep(k, v, beta, plan, tinv, False)
    u, hs, final = _state_fwd(k, w, ut, initial_state, plan, output_final_state)
    o = torch.empty(q.shape[0], H, V, dtype=q.dtype, device=q.device)
    bk, bv = pow2(K), min(pow2(V), 64)
    output_kernel[(plan.nc, H, triton.cdiv(V, bv))](q, k, u, hs, o, scale, plan.cu, plan.chunk_idx, H, R, K, V,
                                                    plan.rp, plan.bt, bk, bv, dot_dtype(k.dtype))
    return o, final, tinv


def chunk_bwd(q, k, v, beta, scale, initial_state, tinv, do, dfinal, plan, need_dinit):
    """Backward: recompute W, Ũ, the chunk states and U, then the reverse state pass and the gradients."""
    _, H, R, K = k.shape
    V = v.shape[-1]
    bk, bv = _blocks(K, V)
    w, ut = _prep(k, v, beta, plan, tinv, True)
    u, hs, _ = _state_fwd(k, w, ut, initial_state, plan, False)
    del ut
    du = torch.empty(plan.nc, H, ROWS, V, dtype=torch.float32, device=q.device)
    dhs = torch.empty(plan.nc, H, K, V, dtype=torch.float32, device=q.device)
    dinit = q.new_empty(plan.n, H, K, V, dtype=torch.float32) if need_dinit else None
    do = do.contiguous()
    state_bwd_kernel[(plan.n, H, triton.cdiv(V, bv))](
        q, k, w, do, du, dhs, dfinal, dinit, scale, plan.cu, plan.chunk_off, H, R, K, V, plan.rp, plan.bt, bk, bv,
        dfinal is not None, need_dinit, dot_dtype(k.dtype))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dbeta = torch.empty_like(beta)
    # [ROWS, K] fp32 accumulators: more warps for wide keys; no multi-buffering of the V loop
    grad_kernel[(plan.nc, H)](q, k, v, beta, tinv, u, hs, du, dhs, do, dq, dk, dv, dbeta, scale, plan.cu,
                              plan.chunk_idx, H, R, K, V, plan.rp, plan.bt, bk, min(bv, 32 if bk >= 128 else 64),
                              dot_dtype(k.dtype), num_warps=8 if bk >= 128 else 4, num_stages=1)
    return dq, dk, dv, dbeta, dinit
