"""Triton kernels for chunked parallel-flow DeltaNet, forward and backward (DESIGN.md §3).

A chunk holds ROWS = BT·RP rows (BT tokens × RP components, RP = R rounded up to a power of
two; the extra components are masked to β = 0, k = 0 and drop out). Sequences are always
described by cu_seqlens (a batch of B equal sequences is B packed documents), so one set of
kernels covers both layouts. Per chunk g and head h the kernels keep:

  tinv [NC,H,ROWS,ROWS]        T = (I + strict ⊙ diag(β) K Kᵀ)⁻¹ (saved for backward, in the input dtype)
  w [NC,H,ROWS,K]              W = T diag(β) K (saved for backward)
  ut [NC,H,ROWS,V]             Ũ = T diag(β) V, overwritten by the forward pass with
                               U = Ũ − W S_start (saved for backward)
  hs [NC,H,K,V]                the state entering the chunk (saved for backward)
  qk [NC,H,BT,ROWS]            scale·(Q Kᵀ ⊙ causal), by the output kernel where the reverse pass is bound by
                               its chain (saves_scores; else empty, and the reverse pass forms them)
Saving W, U, hs and qk costs ROWS·(K + V + BT) + K·V values per chunk and head; it spares the backward the
UT transform, a second sequential pass over the chunks and, on the reverse pass's chain, the scores' product.
Nothing per token and K×V is stored.
"""

import contextlib
import functools
import math

import torch
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .utils import Repeats, cdiv, device_function, dot_dtype, dot_precision, kernel, pow2

ROWS = 64
# The sequential passes load and store their tiles by TMA (_pass_descriptors, _reverse_descriptors): one bulk copy a
# tile instead of per-element addresses and predicates, which shortens each step of their chains (H200, 2026-12-07,
# one sequence of 16384 tokens, D = 128: forward pass 0.233 → 0.216 ms, reverse 0.399 → 0.348; fwd+bwd 1.44 → 1.39
# eager). The descriptors are host work at every launch (built here, encoded by Triton's launcher; a fwd+bwd's host
# time +45-65 µs at our wrapper, +75-135 through Triton's dispatch on the 2-core CPU box: host_time.py's TMA row), so
# _uses_tma takes them only where the chains are long, TMA_MIN_CHUNKS chunks a sequence or more (at 32, T = 2048,
# fwd+bwd from a graph gained nothing: 1.19 ms at (8, 2048, 16, 128), 0.466 at D = 64), and where each pass is one
# launch or a CUDA graph replays it: over an eager call's windows the host fell behind (R = 2 at B = 1, 4 windows:
# 2.54 → 2.98 ms). TMA_PASSES off takes the pointer loads everywhere (A/B timings).
TMA_PASSES = True
TMA_MIN_CHUNKS = 64
# launch settings (num_warps, num_stages) per kernel and key width pow2(K): 64, 128 or 256.
# kernels/benchmarks/tune_launch.py times the alternatives on a GPU and prints this table.
# Measured on an H200 (2026-11-22): fwd+bwd at (8, 2048, 16, 128) 1.975 → 1.869 ms, at (8, 2048, 12, 64) 0.913 → 0.836;
# grad_wy retuned after its row sums became tl.sum (2026-12-02): (8, 2048, 12, 64) 1.132 → 0.866 ms.
# Two stages miscompile at D = 128 with Triton 3.6 on the H200 (bf16): grad_state gives dk, dβ off by 4e-2 at R = 2,
# grad_wy dβ off by 2e-2 at R = 1; tune_launch.py now rejects a setting that moves the gradients. The H100 gives
# grad_state's error too (5e-2 at R = 2, 2026-12-05, tune_launch.py --shapes 4 --windows 1, which found no setting
# of the per-chunk kernels 2% faster than these at B = 1).
# The sequential passes are for loops that Triton pipelines by num_stages (2026-12-02, H200, state_passes.py, B = 1,
# T = 16384, H = 16, D = 128): forward 0.686 → 0.384 ms at 4 warps / 3 stages, 0.353 at 4 / 4; reverse 0.996 → 0.804
# at 8 / 3; on the transposed state (2026-12-03) 0.671 at 4 / 3. Their D = 64 entries follow D = 128's choices,
# not timed on their own. prep and output at D = 64 tuned at the 135M model's DeltaNet branch (2026-12-04,
# tune_launch.py --shapes 16x1024x9x64): fwd+bwd 0.821 → 0.673 ms there.
LAUNCH = {
    ("prep", 64): dict(num_warps=4, num_stages=1),
    # prep at D = 128 capped at 168 registers: 8 B of spills, 3 blocks an SM instead of 2 (resources.py --maxnreg
    # 168). fwd+bwd at (1, 16384, 16, 128) 1.78 → 1.75 ms eager, 1.59 → 1.57 graph, R = 2 2.83 → 2.77 (H100,
    # 2026-12-05, compare_versions.py, kernels/benchmarks/NOTES.md v21)
    ("prep", 128): dict(num_warps=4, num_stages=3, maxnreg=168),
    ("output", 64): dict(num_warps=8, num_stages=1),
    ("state_fwd", 64): dict(num_warps=4, num_stages=3),
    # the forward pass at 3 stages (4 until session 45, chosen at B = 1 before the passes narrowed there): the plain
    # entry runs only where 32-wide blocks would not fit one wave, and at (4, 4096, 16, 128), 128 programs, 4 → 3
    # took the pass alone 0.166 → 0.148 ms and the fwd+bwd 1.31 → 1.28 (R = 2 2.46 → 2.42); at (8, 2048, 16, 128)
    # 1.40 → 1.39 (H100, 2026-12-07, state_passes.py, compare_versions.py --shapes 2,1,2)
    ("state_fwd", 128): dict(num_warps=4, num_stages=3),
    ("state_bwd", 64): dict(num_warps=4, num_stages=3),
    ("state_bwd", 128): dict(num_warps=4, num_stages=3),
    # the passes at V blocks of 32 (Plan.pass_block_v), at R = 1 and 2 alike: 4 warps beat 8 at R = 2 (reverse
    # 0.843 against 1.002 ms at B = 1, state_passes.py --rank 2 --variants 32:8:4,32:4:4)
    ("state_fwd_narrow", 128): dict(num_warps=4, num_stages=4),
    ("state_bwd_narrow", 128): dict(num_warps=4, num_stages=4),
    # the same where their programs take more than half the SMs (_pass_launch): the forward pass at 3 stages, 0.217
    # → 0.171 ms at (2, 8192, 16, 128) (128 programs), fwd+bwd 1.43 → 1.39 (R = 2 2.61 → 2.51), where at B = 1 (64)
    # 3 stages lose, 0.234 → 0.262; the reverse pass keeps 4 (0.209 against 0.213 at 3) (H100, 2026-12-07,
    # state_passes.py --shapes 3,4, compare_versions.py --shapes 3,4,3)
    ("state_fwd_narrow_full", 128): dict(num_warps=4, num_stages=3),
    ("state_bwd_narrow_full", 128): dict(num_warps=4, num_stages=4),
    # the narrow reverse passes by TMA (v31: dS untransposed) need 244 KB of shared memory at 4 stages and R = 1
    # (resources.py; a block may have 227), 184 at 3, the stages v31 was timed at
    ("state_bwd_narrow_tma", 128): dict(num_warps=4, num_stages=3),
    ("state_bwd_narrow_full_tma", 128): dict(num_warps=4, num_stages=3),
    # the reverse pass at V blocks of 16 (Plan.pass_block_v, alone): 4 / 3 took 0.441 ms at B = 1, 4 / 4 0.461, 8 / 4
    # 0.515, 2 / 4 0.786 (H100, 2026-12-06, state_passes.py --variants 16:4:3,16:4:4,16:8:4,16:2:4)
    ("state_bwd_narrow16", 128): dict(num_warps=4, num_stages=3),
    # grad_state at D = 64 tuned at (8, 2048, 12, 64): fwd+bwd 0.784 → 0.709 ms (H200, 2026-12-05, tune_launch.py
    # --shapes 0 --kernels grad_state). At D = 128 one program over all 128 K columns (8 warps) lost to two of 64:
    # 1.33-1.40 against 1.29 ms at (8, 2048, 16, 128)
    ("grad_state", 64): dict(num_warps=4, num_stages=1),
    ("grad_state", 128): dict(num_warps=4, num_stages=1),
    # grad_wy at D = 64 timed from CUDA graphs (its eager call is host-bound): 8 warps / 2 stages → 4 / 1, fwd+bwd
    # 0.479 → 0.404 ms at (16, 1024, 9, 64), the 135M model's branch (tune_launch.py), 0.627 → 0.525 at
    # (8, 2048, 12, 64), R = 2 1.38 → 0.92 (H100, 2026-12-05, compare_versions.py)
    ("grad_wy", 64): dict(num_warps=4, num_stages=1),
    ("grad_wy", 128): dict(num_warps=4, num_stages=1),
    # D = 256 as D = 128, one stage: at Triton's default three the H200 gave dk and dβ off by 2e-2 to 1.2e-1 at every
    # K = 256 case of test_wide_heads_compiled, all other outputs right (2026-12-05, the miscompile above)
    ("grad_state", 256): dict(num_warps=4, num_stages=1),
    ("grad_wy", 256): dict(num_warps=4, num_stages=1),
    # the scan's kernels at 8 warps: at 4 they spill 0.2-0.4 KB per thread at D = 128 (resources.py), at 8 none
    ("state_fwd_aug", 128): dict(num_warps=8),
    ("state_bwd_aug", 128): dict(num_warps=8),
    ("combine", 128): dict(num_warps=8),
    # D = 256, read on the CPU (resources.py --dims 256): the reverse passes need 248-260 KB of shared memory at 3
    # stages, 128 KB at one. With grad_state and grad_wy above at one stage, test_wide_heads_compiled passes (v15)
    ("state_bwd", 256): dict(num_warps=8, num_stages=1),
    ("state_bwd_aug", 256): dict(num_warps=8, num_stages=1),
    ("combine", 256): dict(num_warps=8),
}
# R = 2 at D = 128: the reverse pass spills at 4 warps (56-68 B a thread, resources.py --rank 2; R = 1: none) and
# runs at 8 warps / 4 stages instead, 0.495 → 0.303 ms a pass at (8, 2048, 16, 128) and 1.70 → 1.17 at
# (1, 16384, 16, 128), outputs identical (H200, 2026-12-04, state_passes.py --rank 2). R = 3 and 4 spill more at 4
# warps (100 B) and none at 8, but have not run at 8 / 4 on a GPU, where Triton 3.6 has miscompiled this kernel at
# other settings (8 warps and one stage gave a wrong dk at R = 3 with fp32 inputs, NOTES.md v9). 16-bit inputs only.
LAUNCH_RANKS = {("state_bwd", 128, 2): dict(num_warps=8, num_stages=4)}


# operands of grad_wy's two products of dT = dU (βV)ᵀ − dW (βK)ᵀ, which cancel, for 16-bit inputs (fp32 inputs always
# take fp32, tf32x3): the input dtype (faster) or fp32 with one tf32 pass. In 16 bits dT costs dβ with alike keys
# (2.3e-2 in bf16, tolerance 2e-2; NOTES.md v6). Tᵀ dU, Tᵀ dW and dA K take the input dtype, the one T, dU and dW are
# saved in (since v29 fp32 operands there would multiply the same values, only slower).
WY_CANCELLING_16BIT = False


# One long sequence leaves most SMs idle during the sequential passes (B = 1: 16 heads × 4 V blocks of 32 = 64
# programs on 132 SMs, 45% of a fwd+bwd's GPU time at (1, 16384, 16, 128), kernels/benchmarks/NOTES.md v15). There the
# passes run over OVERLAP_WINDOWS windows of chunks, and the output kernel (forward) and the gradient kernels
# (backward) of each finished window run beside the next window's pass on the idle SMs (Plan.windows). The reverse
# pass's windows grow by OVERLAP_GROWTH from the first it takes: the gradients of a window are more work than the
# idle SMs do beside the next pass (626 µs at the whole GPU against 544 µs of passes on 68 of 132 SMs), so a short
# first window starts them early and the queue never runs dry. A queue model of v15's kernel times (NOTES.md v17):
# the backward 960 → 935 µs at 4 windows, 834 → 795 at 8 with the 64-wide reverse pass. The forward's output work
# is lighter than what its idle SMs can do beside the passes, so its windows stay equal.
# Eager calls at rank 1 keep one window: there the host's launches take longer than the windows' GPU work, and the
# GPU waits on them (H100, 2026-12-05, one sequence of 16384 tokens, fwd+bwd: 1.87 → 2.57 ms eager with 4 windows,
# 1.84 → 1.68 ms replayed from a CUDA graph; at R = 2, with twice the work a launch, 3.32 → 2.98 ms eager). Calls
# captured into a graph take the windows at every rank. Since the one-window reverse pass narrowed to 16 (v24) and its
# scores came off its chain (v25), rank 1 gains ≤ 1% from them in graphs and nothing from the forward's in eager calls
# (H100, 2026-12-07, compare_versions.py --shapes 4 over four gate variants, kernels/benchmarks/NOTES.md session 46).
OVERLAP_WINDOWS = 4
OVERLAP_MIN_CHUNKS = 64
OVERLAP_GROWTH = 1.3
OVERLAP_EAGER_MIN_RANK = 2


def launch(name, K, dtype, rank=1, tma=False):
    """Launch keywords of kernel `name` at key dimension K and `rank` for inputs of `dtype` (Triton's defaults when
    not tuned). A pass's name carries "_aug" for the scan's flows and "_narrow" at V blocks of 32; `tma`: the pass
    takes its tiles by TMA, and its "_tma" entry, where there is one, holds instead.

    The table is tuned for 16-bit inputs. fp32 inputs (tf32x3 products: accuracy, not speed) run unpipelined: their
    tiles take twice the shared memory, and the reverse pass needs 272 KB at two stages and D = 128 (the H200 has
    227; kernels/benchmarks/resources.py --dtype fp32).
    """
    key = (name, max(pow2(K), 64))
    if tma and (name + "_tma", key[1]) in LAUNCH:
        key = (name + "_tma", key[1])
    if dtype == torch.float32:  # twice the registers too: no cap
        return {**{k: v for k, v in LAUNCH.get(key, {}).items() if k != "maxnreg"}, "num_stages": 1}
    return dict(LAUNCH_RANKS.get((*key, rank), LAUNCH.get(key, {})))


def windowed(fn):
    """A kernel that runs over a window of chunks: its bounds (c_lo, c_hi or chunk0) left unspecialised, so that every
    window's launch can run the kernel compiled for the first (utils.Repeats)."""
    return kernel(fn, do_not_specialize=("c_lo", "c_hi", "chunk0"))


@device_function
def chunk_span(cu, chunk_idx, length, UNIFORM: tl.constexpr, g, BT: tl.constexpr):
    """(bos, eos, c) for global chunk g: its sequence's tokens [bos, eos) and its place c in that sequence.

    UNIFORM (every sequence `length` tokens long): arithmetic, no index tensors to read (see Plan)."""
    if UNIFORM:
        n = (length + BT - 1) // BT
        seq = g // n
        c = g - seq * n
        bos = seq * length
        eos = bos + length
    else:
        seq = tl.load(chunk_idx + 2 * g)
        c = tl.load(chunk_idx + 2 * g + 1)
        bos = tl.load(cu + seq).to(tl.int64)
        eos = tl.load(cu + seq + 1).to(tl.int64)
    return bos, eos, c


@device_function
def sequence_span(cu, chunk_off, length, UNIFORM: tl.constexpr, seq, BT: tl.constexpr):
    """(bos, eos, g0) for sequence seq: its tokens [bos, eos) and its first global chunk."""
    if UNIFORM:
        bos = seq.to(tl.int64) * length
        eos = bos + length
        g0 = seq.to(tl.int64) * ((length + BT - 1) // BT)
    else:
        bos = tl.load(cu + seq).to(tl.int64)
        eos = tl.load(cu + seq + 1).to(tl.int64)
        g0 = tl.load(chunk_off + seq).to(tl.int64)
    return bos, eos, g0


@device_function
def chunk_rows(c, bos, eos, h, r, H: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, BT: tl.constexpr):
    """Row r of chunk c holds component r % RP of token c·BT + r // RP: its row in k, v and beta (flattened
    [tokens, H, R]) and whether it is a real one (a token of the sequence, a component below R). In a slice of a
    wider tensor (q and k read in place, see K_HEADS) H is the token stride in heads' rows instead."""
    tok = c * BT + r // RP
    return ((bos + tok) * H + h) * R + r % RP, (tok < eos - bos) & (r % RP < R)


@device_function
def value_rows(c, bos, h, r, v_stride, R: tl.constexpr, RP: tl.constexpr, BT: tl.constexpr, V: tl.constexpr):
    """Offsets in v of chunk c's rows (as chunk_rows'): v's tokens lie v_stride elements apart, each token's [H, R, V]
    values contiguous, so that v can be a slice of a wider projection, read in place."""
    return (bos + c * BT + r // RP) * v_stride + (h * R + r % RP) * V


@device_function
def block_inverses(a):
    """(I + D)⁻¹ for the eight 8×8 diagonal blocks D of a 64×64 strictly lower-triangular a, zero elsewhere."""
    blk = tl.arange(0, 8)
    same = blk[:, None, None, None] == blk[None, None, :, None]
    d = tl.sum(tl.where(same, tl.reshape(a, [8, 8, 8, 8]), 0.0), axis=2)  # [block, row i, column j]
    row = blk[None, :, None]
    x = tl.where(row == blk[None, None, :], 1.0, 0.0) + tl.zeros([8, 8, 8], tl.float32)
    for i in tl.static_range(1, 8):
        d_i = tl.sum(tl.where(row == i, d, 0.0), axis=1)  # [block, j]: row i of each block, zero from j = i on
        x_i = -tl.sum(d_i[:, :, None] * x, axis=1)  # −Σ_j D_ij X_j, rows j < i final, the others still e_j
        x = tl.where(row == i, x + x_i[:, None, :], x)
    return tl.reshape(tl.where(same, x[:, :, None, :], 0.0), [64, 64])


@kernel
def prep_kernel(k, v, v_stride, beta, tinv, w, ut, cu, chunk_idx, length, UNIFORM: tl.constexpr,
                H: tl.constexpr, K_HEADS: tl.constexpr, R: tl.constexpr, K: tl.constexpr,
                V: tl.constexpr, RP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                DT: tl.constexpr, PREC: tl.constexpr):
    """UT transform of one chunk: T, W and Ũ. K_HEADS: k's token stride in [R, K] rows of a head (H where k is
    contiguous; more where it is a slice of a wider projection, read in place), likewise Q_HEADS for q in the other
    kernels: constants of the compilation, so that contiguous inputs compile to the code they always did."""
    g = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    ROWS: tl.constexpr = BT * RP
    bos, eos, c = chunk_span(cu, chunk_idx, length, UNIFORM, g, BT)
    r = tl.arange(0, ROWS)
    sub, row_ok = chunk_rows(c, bos, eos, h, r, H, R, RP, BT)
    ksub = chunk_rows(c, bos, eos, h, r, K_HEADS, R, RP, BT)[0]
    kk = tl.arange(0, BK)
    b_k = tl.load(k + ksub[:, None] * K + kk[None, :], mask=row_ok[:, None] & (kk[None, :] < K), other=0.0).to(DT)
    b_beta = tl.load(beta + sub, mask=row_ok, other=0.0).to(tl.float32)
    tile = (g * H + h) * ROWS * ROWS + r[:, None] * ROWS + r[None, :]
    a = tl.dot(b_k, tl.trans(b_k), input_precision=PREC) * b_beta[:, None]
    a = tl.where((r // RP)[:, None] > (r // RP)[None, :], a, 0.0)
    # T in two stages. The 8×8 diagonal blocks D, all eight at once, by substitution in fp32 on the CUDA cores:
    # row i of X = (I + D)⁻¹ is e_i − Σ_{j<i} D_ij X_j (exact fp32, where the tensor cores would need tf32x3: X's
    # entries grow like binomial coefficients when keys are alike, as in real text, and cancel). Then three merges of
    # neighbouring blocks, 8 → 16 → 32 → 64 rows: with X the inverses of the diagonal blocks and E the part of A below
    # them, [[M₁, 0], [E, M₂]]⁻¹ = X − X E X. Those products combine true inverses, nothing grows: the input's
    # precision (one tf32 pass for 16-bit inputs). (Blocks of 16 lost 13% of o in exact fp32 with β near 2.)
    b_t = block_inverses(a)
    for level in tl.static_range(3):
        size = 8 << level
        below = ((r // size) % 2 == 1)[:, None] & ((r // size)[:, None] == (r // size)[None, :] + 1)
        e = tl.where(below, a, 0.0)
        b_t = b_t - tl.dot(tl.dot(b_t, e, input_precision=PREC), b_t, input_precision=PREC)
    # T saved in the input dtype, the precision W and Ũ are formed from it in: half of fp32's bytes for prep and
    # grad_wy, fwd+bwd at (1, 16384, 16, 128) 1.51 → 1.48 ms (H100, 2026-12-07, kernels/benchmarks/NOTES.md v29).
    # Cast here, not stored from b_tl below: that order spilled 32 B a thread at prep's register cap (12 this way)
    tl.store(tinv + tile, b_t.to(tinv.dtype.element_ty))
    b_tl = b_t.to(DT)
    base = (g * H + h) * ROWS + r
    b_w = tl.dot(b_tl, (b_k * b_beta[:, None]).to(DT), input_precision=PREC)
    tl.store(w + base[:, None] * K + kk[None, :], b_w.to(w.dtype.element_ty), mask=kk[None, :] < K)
    vrow = value_rows(c, bos, h, r, v_stride, R, RP, BT, V)
    for iv in range((V + BV - 1) // BV):
        vv = iv * BV + tl.arange(0, BV)
        b_v = tl.load(v + vrow[:, None] + vv[None, :], mask=row_ok[:, None] & (vv[None, :] < V), other=0.0).to(DT)
        b_ut = tl.dot(b_tl, (b_v * b_beta[:, None]).to(DT), input_precision=PREC)
        tl.store(ut + base[:, None] * V + vv[None, :], b_ut.to(ut.dtype.element_ty), mask=vv[None, :] < V)


@device_function
def fwd_tiles(k, w, ut, g, c, bos, eos, h, r, kk, col, H: tl.constexpr, K_HEADS: tl.constexpr, R: tl.constexpr,
              K: tl.constexpr, V: tl.constexpr, RP: tl.constexpr, BT: tl.constexpr):
    """Chunk c's (global chunk g's) rows, and its W, Ũ and Kᵀ for the forward pass."""
    base = (g * H + h) * (BT * RP) + r
    sub, row_ok = chunk_rows(c, bos, eos, h, r, K_HEADS, R, RP, BT)
    b_w = tl.load(w + base[:, None] * K + kk[None, :], mask=kk[None, :] < K, other=0.0)
    b_ut = tl.load(ut + base[:, None] * V + col[None, :], mask=(col[None, :] >= 0) & (col[None, :] < V), other=0.0)
    b_kt = tl.load(k + sub[None, :] * K + kk[:, None], mask=row_ok[None, :] & (kk[:, None] < K), other=0.0)
    return base, b_w, b_ut, b_kt


@windowed
def state_fwd_kernel(k, w, ut, hs, k_d, w_d, u_d, s_d, init, final, c_lo, c_hi, cu, chunk_off, length,
                     UNIFORM: tl.constexpr,
                     H: tl.constexpr, K_HEADS: tl.constexpr, R: tl.constexpr,
                     K: tl.constexpr, V: tl.constexpr, RP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr, DT: tl.constexpr,
                     PREC: tl.constexpr, AUG: tl.constexpr, VA: tl.constexpr, TMA: tl.constexpr):
    """Sequential pass over one sequence's chunks: S_end = S_start + Kᵀ U with U = Ũ − W S_start, written over Ũ.

    A for loop, so that Triton's pipeliner loads the tiles of the next chunks (num_stages − 1 ahead) while this one
    multiplies: with few sequences × heads the step's latency sets the time (kernels/benchmarks/state_passes.py).
    AUG: run the flow of the sequence instead, on the K+V columns [P | J] from [I | 0] with
    Ũ read as [0 | Ũ], and store only the final [P | J] (VA = K + V, else VA = V).
    Only chunks c_lo ≤ c < c_hi of the sequence: a window of it (Plan.windows), from init to final.
    TMA: the tiles through the descriptors k_d, w_d, u_d, s_d (_pass_descriptors) instead of pointers.
    """
    seq = tl.program_id(0)
    h = tl.program_id(1)
    iv = tl.program_id(2)
    bos, eos, g0 = sequence_span(cu, chunk_off, length, UNIFORM, seq, BT)
    r = tl.arange(0, BT * RP)
    kk = tl.arange(0, BK)
    vv = iv * BV + tl.arange(0, BV)
    kv_mask = (kk[:, None] < K) & (vv[None, :] < VA)
    kv = kk[:, None] * VA + vv[None, :]
    state = (seq * H + h).to(tl.int64) * K * VA
    col = vv - (VA - V)  # the column of Ũ (negative for the P columns in AUG mode)
    if AUG:
        S = tl.where((kk[:, None] == vv[None, :]) & (vv[None, :] < K), 1.0, 0.0)
    elif HAS_INIT:
        S = tl.load(init + state + kv, mask=kv_mask, other=0.0).to(tl.float32)
    else:
        S = tl.full([BK, BV], 0.0, tl.float32)
    nc = (eos - bos + BT - 1) // BT
    for c in range(c_lo, tl.minimum(nc, c_hi)):
        if TMA:  # rows past the sequence's end: U's rows there are 0, so k's (any finite values) drop out of Kᵀ U
            row = (((g0 + c) * H + h) * (BT * RP)).to(tl.int32)  # descriptor coordinates are 32-bit
            b_w = w_d.load([row, 0])
            b_ut = u_d.load([row, iv * BV])
            b_kt = tl.trans(tl.reshape(k_d.load([(bos + c * BT).to(tl.int32), h * R, 0]), [BT * RP, BK]))
            s_d.store([(((g0 + c) * H + h) * K).to(tl.int32), iv * BV], S.to(s_d.dtype))
            b_u = b_ut.to(tl.float32) - tl.dot(b_w.to(DT), S.to(DT), input_precision=PREC)
            u_d.store([row, iv * BV], b_u.to(u_d.dtype))
        else:
            base, b_w, b_ut, b_kt = fwd_tiles(k, w, ut, g0 + c, c, bos, eos, h, r, kk, col, H, K_HEADS, R, K, V, RP,
                                              BT)
            if not AUG:
                tl.store(hs + ((g0 + c) * H + h) * K * V + kv, S.to(hs.dtype.element_ty), mask=kv_mask)
            b_u = b_ut.to(tl.float32) - tl.dot(b_w.to(DT), S.to(DT), input_precision=PREC)
            if not AUG:
                tl.store(ut + base[:, None] * V + vv[None, :], b_u.to(ut.dtype.element_ty), mask=vv[None, :] < V)
        S += tl.dot(b_kt.to(DT), b_u.to(DT), input_precision=PREC)
    if STORE_FINAL:
        tl.store(final + state + kv, S, mask=kv_mask)


@device_function
def block_of_chunk(chunk0, blocks: tl.constexpr):
    """(global chunk, block) of a program of a kernel that splits each chunk into `blocks` programs: the first grid
    axis runs over chunks × blocks with the blocks of one chunk next to each other, so that they run together and
    the rows they all read come once from memory and then from L2 (as a grid axis of its own the blocks of one
    chunk were a whole grid's width apart)."""
    pid = tl.program_id(0)
    return (pid // blocks).to(tl.int64) + chunk0, pid % blocks


@windowed
def output_kernel(q, k, u, hs, o, qk, scale, chunk0, cu, chunk_idx, length, UNIFORM: tl.constexpr,
                  H: tl.constexpr, Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr, R: tl.constexpr, K: tl.constexpr,
                  V: tl.constexpr, RP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  DT: tl.constexpr, PREC: tl.constexpr, SAVE_SCORES: tl.constexpr):
    """o = scale·(Q S_start + (Q Kᵀ ⊙ causal) U) for one chunk and one block of V (block_of_chunk). SAVE_SCORES: the
    chunk's first block also stores scale·(Q Kᵀ ⊙ causal) in qk, which the reverse pass then reads instead of forming
    it on its chain."""
    g, iv = block_of_chunk(chunk0, (V + BV - 1) // BV)
    h = tl.program_id(1)
    ROWS: tl.constexpr = BT * RP
    bos, eos, c = chunk_span(cu, chunk_idx, length, UNIFORM, g, BT)
    r = tl.arange(0, ROWS)
    t = tl.arange(0, BT)
    kk = tl.arange(0, BK)
    vv = iv * BV + tl.arange(0, BV)
    tq = c * BT + t
    q_ok = tq < eos - bos
    sub, row_ok = chunk_rows(c, bos, eos, h, r, K_HEADS, R, RP, BT)
    b_q = tl.load(q + ((bos + tq) * Q_HEADS + h)[:, None] * K + kk[None, :],
                  mask=q_ok[:, None] & (kk[None, :] < K), other=0.0).to(DT)
    b_k = tl.load(k + sub[:, None] * K + kk[None, :], mask=row_ok[:, None] & (kk[None, :] < K), other=0.0).to(DT)
    a = tl.dot(b_q, tl.trans(b_k), input_precision=PREC)
    a = tl.where(t[:, None] >= (r // RP)[None, :], a, 0.0)
    if SAVE_SCORES and iv == 0:
        tl.store(qk + ((g * H + h) * BT + t)[:, None] * ROWS + r[None, :], (a * scale).to(qk.dtype.element_ty))
    b_s = tl.load(hs + (g * H + h) * K * V + kk[:, None] * V + vv[None, :], mask=(kk[:, None] < K) & (vv[None, :] < V),
                  other=0.0)
    b_u = tl.load(u + ((g * H + h) * ROWS + r)[:, None] * V + vv[None, :], mask=vv[None, :] < V, other=0.0)
    b_o = tl.dot(b_q, b_s.to(DT), input_precision=PREC) + tl.dot(a.to(DT), b_u.to(DT), input_precision=PREC)
    tl.store(o + ((bos + tq) * H + h)[:, None] * V + vv[None, :], (b_o * scale).to(o.dtype.element_ty),
             mask=q_ok[:, None] & (vv[None, :] < V))


@device_function
def bwd_tiles(q, k, w, do, qk, scale, g, c, bos, eos, h, r, t, kk, col, H: tl.constexpr, Q_HEADS: tl.constexpr,
              K_HEADS: tl.constexpr, R: tl.constexpr, K: tl.constexpr, V: tl.constexpr, RP: tl.constexpr,
              BT: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, SAVED_SCORES: tl.constexpr):
    """Chunk c's (global chunk g's) rows, Q, Kᵀ, dOᵀ, W and A = scale·(QKᵀ ⊙ causal) for the reverse pass: the
    forward's (SAVED_SCORES), else formed here from Q scaled first (then Q is returned scaled)."""
    tq = c * BT + t
    q_ok = tq < eos - bos
    sub, row_ok = chunk_rows(c, bos, eos, h, r, K_HEADS, R, RP, BT)
    b_q = tl.load(q + ((bos + tq) * Q_HEADS + h)[:, None] * K + kk[None, :],
                  mask=q_ok[:, None] & (kk[None, :] < K), other=0.0).to(DT)
    b_kt = tl.load(k + sub[None, :] * K + kk[:, None], mask=row_ok[None, :] & (kk[:, None] < K), other=0.0).to(DT)
    b_dot = tl.load(do + ((bos + tq) * H + h)[None, :] * V + col[:, None],
                    mask=q_ok[None, :] & (col[:, None] >= 0) & (col[:, None] < V), other=0.0).to(DT)
    base = (g * H + h) * (BT * RP) + r
    b_w = tl.load(w + base[:, None] * K + kk[None, :], mask=kk[None, :] < K, other=0.0).to(DT)
    if SAVED_SCORES:
        b_a = tl.load(qk + ((g * H + h) * BT + t)[:, None] * (BT * RP) + r[None, :]).to(DT)
    else:
        b_q = (b_q.to(tl.float32) * scale).to(DT)
        b_a = tl.dot(b_q, b_kt, input_precision=PREC)
        b_a = tl.where(t[:, None] >= (r // RP)[None, :], b_a, 0.0).to(DT)
    return base, b_q, b_kt, b_dot, b_w, b_a


@device_function
def bwd_tma_tiles(q_d, k_d, w_d, do_d, qk_d, scale, g, c, bos, h, iv, r, t, H: tl.constexpr, R: tl.constexpr,
                  K: tl.constexpr, V: tl.constexpr, RP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, SAVED_SCORES: tl.constexpr):
    """bwd_tiles through the TMA descriptors (_reverse_descriptors), as they lie: the first row of global chunk g's
    [ROWS, ·] tiles, Q, K, dO, W and A. Whole chunks only: no rows past a sequence's end to mask."""
    tok = (bos + c * BT).to(tl.int32)  # descriptor coordinates are 32-bit
    row = ((g * H + h) * (BT * RP)).to(tl.int32)
    b_q = q_d.load([tok, h * K]).to(DT)
    b_k = tl.reshape(k_d.load([tok, h * R, 0]), [BT * RP, BK]).to(DT)
    b_do = do_d.load([tok, h * V + iv * BV]).to(DT)
    b_w = w_d.load([row, 0]).to(DT)
    if SAVED_SCORES:
        b_a = qk_d.load([((g * H + h) * BT).to(tl.int32), 0]).to(DT)
    else:
        b_q = (b_q.to(tl.float32) * scale).to(DT)
        b_a = tl.dot(b_q, tl.trans(b_k), input_precision=PREC)
        b_a = tl.where(t[:, None] >= (r // RP)[None, :], b_a, 0.0).to(DT)
    return row, b_q, b_k, b_do, b_w, b_a


@windowed
def state_bwd_kernel(q, k, w, do, qk, du, dhs, q_d, k_d, w_d, do_d, qk_d, du_d, ds_d, dfinal, dinit, scale, c_lo,
                     c_hi, cu, chunk_off, length, UNIFORM: tl.constexpr,
                     H: tl.constexpr, Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr, R: tl.constexpr,
                     K: tl.constexpr, V: tl.constexpr, RP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr, HAS_DFINAL: tl.constexpr, STORE_DINIT: tl.constexpr, DT: tl.constexpr,
                     PREC: tl.constexpr, AUG: tl.constexpr, VA: tl.constexpr, SAVED_SCORES: tl.constexpr,
                     TMA: tl.constexpr):
    """Reverse pass: dU = scale (QKᵀ⊙causal)ᵀ dO + K dS_end, dS_start = dS_end + scale Qᵀ dO − Wᵀ dU.

    It carries the transposed state, dUᵀ = dOᵀ Aᵀ + dSᵀ Kᵀ and dSᵀ ← dSᵀ + dOᵀ Q − dUᵀ W, so that the chain's
    operands dSᵀ and dUᵀ come first in their products, which Hopper's wgmma reads from registers; as second
    operands each step would write them to shared memory and wait (NOTES.md v11: 3.1 → 2.6 µs per step).
    SAVED_SCORES: A comes from the forward (qk), so that no product but the chain's own is on it (NOTES.md v25).
    AUG: the reverse flow [Pᵀ | c] (dS_start = Pᵀ dS_end + c) on K+V columns from [I | 0] with dO
    read as [0 | dO]; only the result is stored (VA = K + V, else VA = V).
    Only chunks c_lo ≤ c < c_hi of the sequence, from the last: a window of it (Plan.windows), from dfinal to dinit.
    TMA: the tiles through the descriptors q_d ... ds_d (_reverse_descriptors) instead of pointers. Below V blocks
    of 64 it then carries dS as it lies (v31): dSᵀ has too few rows there to be a wgmma's first operand (64), and the
    transposed products ran as mma.sync; untransposed each product is a wgmma with a loaded tile first.
    """
    seq = tl.program_id(0)
    h = tl.program_id(1)
    iv = tl.program_id(2)
    bos, eos, g0 = sequence_span(cu, chunk_off, length, UNIFORM, seq, BT)
    r = tl.arange(0, BT * RP)
    t = tl.arange(0, BT)
    kk = tl.arange(0, BK)
    vv = iv * BV + tl.arange(0, BV)
    vk_mask = (vv[:, None] < VA) & (kk[None, :] < K)
    vk = kk[None, :] * VA + vv[:, None]  # element (v, k) of dSᵀ lives at dS[k, v]
    state = (seq * H + h).to(tl.int64) * K * VA
    col = vv - (VA - V)  # the column of dO (negative for the Pᵀ columns in AUG mode)
    if AUG:
        dSt = tl.where((vv[:, None] == kk[None, :]) & (vv[:, None] < K), 1.0, 0.0)
    elif HAS_DFINAL:
        dSt = tl.load(dfinal + state + vk, mask=vk_mask, other=0.0).to(tl.float32)
    else:
        dSt = tl.full([BV, BK], 0.0, tl.float32)
    c_end = tl.minimum((eos - bos + BT - 1) // BT, c_hi)
    if TMA and BV < 64:
        dS = tl.trans(dSt)
        for i in range(c_end - c_lo):
            c = c_end - 1 - i
            row, b_q, b_k, b_do, b_w, b_a = bwd_tma_tiles(q_d, k_d, w_d, do_d, qk_d, scale, g0 + c, c, bos, h, iv, r,
                                                          t, H, R, K, V, RP, BT, BK, BV, DT, PREC, SAVED_SCORES)
            ds_d.store([(((g0 + c) * H + h) * K).to(tl.int32), iv * BV], dS.to(ds_d.dtype))
            b_du = tl.dot(b_k, dS.to(DT), tl.dot(tl.trans(b_a), b_do, input_precision=PREC), input_precision=PREC)
            du_d.store([row, iv * BV], b_du.to(du_d.dtype))
            dq = tl.dot(tl.trans(b_q), b_do, input_precision=PREC)
            if SAVED_SCORES:
                dq = scale * dq
            dS = tl.dot(tl.trans(b_w), (-b_du).to(DT), dS + dq, input_precision=PREC)
        dSt = tl.trans(dS)
    else:
        for i in range(c_end - c_lo):
            c = c_end - 1 - i
            if TMA:  # at V blocks of 64, where dSᵀ fills a wgmma
                row, b_q, b_k, b_do, b_w, b_a = bwd_tma_tiles(q_d, k_d, w_d, do_d, qk_d, scale, g0 + c, c, bos, h, iv,
                                                              r, t, H, R, K, V, RP, BT, BK, BV, DT, PREC,
                                                              SAVED_SCORES)
                b_kt, b_dot = tl.trans(b_k), tl.trans(b_do)
                ds_d.store([(((g0 + c) * H + h) * K).to(tl.int32), iv * BV], tl.trans(dSt).to(ds_d.dtype))
                b_dut = tl.dot(b_dot, b_a, input_precision=PREC) + tl.dot(dSt.to(DT), b_kt, input_precision=PREC)
                du_d.store([row, iv * BV], tl.trans(b_dut).to(du_d.dtype))
            else:
                base, b_q, b_kt, b_dot, b_w, b_a = bwd_tiles(q, k, w, do, qk, scale, g0 + c, c, bos, eos, h, r, t,
                                                             kk, col, H, Q_HEADS, K_HEADS, R, K, V, RP, BT, DT,
                                                             PREC, SAVED_SCORES)
                if not AUG:
                    tl.store(dhs + ((g0 + c) * H + h) * K * V + vk, dSt.to(dhs.dtype.element_ty), mask=vk_mask)
                b_dut = tl.dot(b_dot, b_a, input_precision=PREC) + tl.dot(dSt.to(DT), b_kt, input_precision=PREC)
                if not AUG:
                    tl.store(du + base[None, :] * V + vv[:, None], b_dut.to(du.dtype.element_ty),
                             mask=vv[:, None] < V)
            dot_q = tl.dot(b_dot, b_q, input_precision=PREC)
            if SAVED_SCORES:  # Q as it lies: scaled after the product (v25)
                dot_q = scale * dot_q
            dSt += dot_q - tl.dot(b_dut.to(DT), b_w, input_precision=PREC)
    if STORE_DINIT:
        tl.store(dinit + state + vk, dSt, mask=vk_mask)


@kernel
def combine_kernel(flows, x0, xs, xout, seg_off, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, KB: tl.constexpr, HAS_X0: tl.constexpr,
                   STORE_OUT: tl.constexpr, REVERSE: tl.constexpr):
    """Walk one sequence's segment flows [M | c]: store X entering each segment, X ← M X + c.

    Forward flows give the state at each segment start; reverse (REVERSE) flows give the state
    gradient at each segment end. K×K products near fp32 accuracy (tf32x3): the chain must not drift.
    M X is summed over KB-row slices of the X just stored (read back from cache): a whole fp32 M
    beside X and tf32x3's splits of both spills kilobytes per thread.
    """
    seq = tl.program_id(0)
    h = tl.program_id(1)
    iv = tl.program_id(2)
    s0 = tl.load(seg_off + seq)
    n = tl.load(seg_off + seq + 1) - s0
    kk = tl.arange(0, BK)
    kb = tl.arange(0, KB)
    vv = iv * BV + tl.arange(0, BV)
    kv_mask = (kk[:, None] < K) & (vv[None, :] < V)
    kv = kk[:, None] * V + vv[None, :]
    state = (seq * H + h).to(tl.int64) * K * V
    if HAS_X0:
        X = tl.load(x0 + state + kv, mask=kv_mask, other=0.0).to(tl.float32)
    else:
        X = tl.full([BK, BV], 0.0, tl.float32)
    i = 0
    while i < n:
        if REVERSE:
            s = (s0 + n - 1 - i).to(tl.int64)
        else:
            s = (s0 + i).to(tl.int64)
        x_s = xs + (s * H + h) * K * V
        tl.store(x_s + kv, X, mask=kv_mask)
        tl.debug_barrier()  # the slices below read what every thread of the program just stored
        flow = flows + (s * H + h) * K * (K + V)
        X = tl.load(flow + kk[:, None] * (K + V) + K + vv[None, :], mask=kv_mask, other=0.0)
        for j in tl.static_range(0, BK, KB):
            b_m = tl.load(flow + kk[:, None] * (K + V) + j + kb[None, :],
                          mask=(kk[:, None] < K) & (j + kb[None, :] < K), other=0.0)
            b_x = tl.load(x_s + (j + kb)[:, None] * V + vv[None, :], mask=(j + kb[:, None] < K) & (vv[None, :] < V),
                          other=0.0)
            X += tl.dot(b_m, b_x, input_precision="tf32x3")
        i += 1
    if STORE_OUT:
        tl.store(xout + state + kv, X, mask=kv_mask)


@windowed
def grad_state_kernel(q, k, u, hs, du, dhs, do, dq, dk, dw, scale, chunk0, cu, chunk_idx, length,
                      UNIFORM: tl.constexpr,
                      H: tl.constexpr, Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr, R: tl.constexpr,
                      K: tl.constexpr, V: tl.constexpr, RP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """The state side of one chunk's gradients, for one block of K (block_of_chunk): dq, the part of dk that does not
    go through W, and dW = dU S_startᵀ (negated by grad_wy_kernel). One [rows, BK] accumulator each keeps the
    registers small; Q dOᵀ-style products over V are shared by all K blocks."""
    g, ik = block_of_chunk(chunk0, (K + BK - 1) // BK)
    h = tl.program_id(1)
    ROWS: tl.constexpr = BT * RP
    bos, eos, c = chunk_span(cu, chunk_idx, length, UNIFORM, g, BT)
    r = tl.arange(0, ROWS)
    t = tl.arange(0, BT)
    kk = ik * BK + tl.arange(0, BK)
    k_ok = kk < K
    tq = c * BT + t
    q_ok = tq < eos - bos
    sub, row_ok = chunk_rows(c, bos, eos, h, r, H, R, RP, BT)
    qrow = (bos + tq) * H + h
    base = (g * H + h) * ROWS + r
    state = (g * H + h) * K * V
    b_dq = tl.full([BT, BK], 0.0, tl.float32)
    b_dk = tl.full([ROWS, BK], 0.0, tl.float32)
    b_dw = tl.full([ROWS, BK], 0.0, tl.float32)
    b_dqk = tl.full([BT, ROWS], 0.0, tl.float32)
    for iv in range((V + BV - 1) // BV):
        vv = iv * BV + tl.arange(0, BV)
        v_ok = vv < V
        kv = kk[:, None] * V + vv[None, :]
        kv_mask = k_ok[:, None] & v_ok[None, :]
        b_s = tl.load(hs + state + kv, mask=kv_mask, other=0.0).to(DT)
        b_ds = tl.load(dhs + state + kv, mask=kv_mask, other=0.0).to(DT)
        b_u = tl.load(u + base[:, None] * V + vv[None, :], mask=v_ok[None, :], other=0.0).to(DT)
        b_du = tl.load(du + base[:, None] * V + vv[None, :], mask=v_ok[None, :], other=0.0).to(DT)
        b_do = tl.load(do + qrow[:, None] * V + vv[None, :], mask=q_ok[:, None] & v_ok[None, :], other=0.0).to(DT)
        b_dq += tl.dot(b_do, tl.trans(b_s), input_precision=PREC)
        b_dqk += tl.dot(b_do, tl.trans(b_u), input_precision=PREC)
        b_dk += tl.dot(b_u, tl.trans(b_ds), input_precision=PREC)
        b_dw += tl.dot(b_du, tl.trans(b_s), input_precision=PREC)
    # fp32 operands below: dQKᵀ rounded to 16 bits would cost dq and dk a digit
    qsub, ksub = (bos + tq) * Q_HEADS + h, chunk_rows(c, bos, eos, h, r, K_HEADS, R, RP, BT)[0]
    b_q = tl.load(q + qsub[:, None] * K + kk[None, :], mask=q_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
    b_k = tl.load(k + ksub[:, None] * K + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
    b_dqk = tl.where(t[:, None] >= (r // RP)[None, :], b_dqk, 0.0) * scale
    b_dq = b_dq * scale + tl.dot(b_dqk, b_k, input_precision=PREC)
    b_dk += tl.dot(tl.trans(b_dqk), b_q, input_precision=PREC)
    tl.store(dq + qrow[:, None] * K + kk[None, :], b_dq.to(dq.dtype.element_ty), mask=q_ok[:, None] & k_ok[None, :])
    tl.store(dk + sub[:, None] * K + kk[None, :], b_dk.to(dk.dtype.element_ty), mask=row_ok[:, None] & k_ok[None, :])
    tl.store(dw + base[:, None] * K + kk[None, :], b_dw.to(dw.dtype.element_ty), mask=k_ok[None, :])


@windowed
def grad_wy_kernel(k, v, v_stride, beta, tinv, du, dw, dk, dv, dbeta, chunk0, cu, chunk_idx, length,
                   UNIFORM: tl.constexpr,
                   H: tl.constexpr, K_HEADS: tl.constexpr, R: tl.constexpr,
                   K: tl.constexpr, V: tl.constexpr, RP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, CD: tl.constexpr):
    """Back through one chunk's UT transform W = T diag(β) K, Ũ = T diag(β) V, T = (I + A)⁻¹ (chunk chunk0 + the
    program's first index): dv and dβ, and dk = (grad_state_kernel's part) + the parts through W and A."""
    g = tl.program_id(0).to(tl.int64) + chunk0
    h = tl.program_id(1)
    ROWS: tl.constexpr = BT * RP
    bos, eos, c = chunk_span(cu, chunk_idx, length, UNIFORM, g, BT)
    r = tl.arange(0, ROWS)
    sub, row_ok = chunk_rows(c, bos, eos, h, r, H, R, RP, BT)
    base = (g * H + h) * ROWS + r
    b_beta = tl.load(beta + sub, mask=row_ok, other=0.0).to(tl.float32)
    b_tt = tl.trans(tl.load(tinv + (g * H + h) * ROWS * ROWS + r[:, None] * ROWS + r[None, :]))
    b_tl = b_tt.to(DT)
    # Operands: CD for the products of dT, the input dtype for the others (see WY_CANCELLING_16BIT)
    b_dbeta = tl.full([ROWS], 0.0, tl.float32)
    b_dtv = tl.full([ROWS, ROWS], 0.0, tl.float32)
    b_kk = tl.full([ROWS, ROWS], 0.0, tl.float32)
    vrow = value_rows(c, bos, h, r, v_stride, R, RP, BT, V)
    ksub = chunk_rows(c, bos, eos, h, r, K_HEADS, R, RP, BT)[0]
    for iv in range((V + BV - 1) // BV):
        vv = iv * BV + tl.arange(0, BV)
        v_ok = vv < V
        b_du = tl.load(du + base[:, None] * V + vv[None, :], mask=v_ok[None, :], other=0.0)
        b_v = tl.load(v + vrow[:, None] + vv[None, :], mask=row_ok[:, None] & v_ok[None, :], other=0.0).to(tl.float32)
        b_dvt = tl.dot(b_tl, b_du.to(DT), input_precision=PREC)
        tl.store(dv + sub[:, None] * V + vv[None, :], (b_dvt * b_beta[:, None]).to(dv.dtype.element_ty),
                 mask=row_ok[:, None] & v_ok[None, :])
        b_dbeta += tl.sum(b_dvt * b_v, axis=1)
        b_dtv += tl.dot(b_du.to(CD), tl.trans((b_v * b_beta[:, None]).to(CD)), input_precision=PREC)
    for ik in range((K + BK - 1) // BK):
        kk = ik * BK + tl.arange(0, BK)
        k_ok = kk < K
        b_k = tl.load(k + ksub[:, None] * K + kk[None, :], mask=row_ok[:, None] & k_ok[None, :],
                      other=0.0).to(tl.float32)
        b_dw = tl.load(dw + base[:, None] * K + kk[None, :], mask=k_ok[None, :], other=0.0)
        b_dtv -= tl.dot(b_dw.to(CD), tl.trans((b_k * b_beta[:, None]).to(CD)), input_precision=PREC)
        b_kk += tl.dot(b_k.to(DT), tl.trans(b_k.to(DT)), input_precision=PREC)
    # dA = −Tᵀ dT Tᵀ on the strict mask, A = diag(β) K Kᵀ
    b_tc = b_tt.to(CD)
    b_da = -tl.dot(tl.dot(b_tc, b_dtv.to(CD), input_precision=PREC).to(CD), b_tc, input_precision=PREC)
    b_da = tl.where((r // RP)[:, None] > (r // RP)[None, :], b_da, 0.0)
    b_dbeta += tl.sum(b_da * b_kk, axis=1)
    b_da = b_da * b_beta[:, None]
    b_da = (b_da + tl.trans(b_da)).to(DT)
    for ik in range((K + BK - 1) // BK):
        kk = ik * BK + tl.arange(0, BK)
        k_mask = row_ok[:, None] & (kk[None, :] < K)
        b_k = tl.load(k + ksub[:, None] * K + kk[None, :], mask=k_mask, other=0.0)
        b_dw = tl.load(dw + base[:, None] * K + kk[None, :], mask=kk[None, :] < K, other=0.0)
        b_dk = tl.load(dk + sub[:, None] * K + kk[None, :], mask=k_mask, other=0.0).to(tl.float32)
        # W = T diag(β) K with dW = −dU S_startᵀ
        b_tdw = tl.dot(b_tl, b_dw.to(DT), input_precision=PREC)
        b_dbeta -= tl.sum(b_tdw * b_k.to(tl.float32), axis=1)
        b_dk += tl.dot(b_da, b_k.to(DT), input_precision=PREC) - b_tdw * b_beta[:, None]
        tl.store(dk + sub[:, None] * K + kk[None, :], b_dk.to(dk.dtype.element_ty), mask=k_mask)
    tl.store(dbeta + sub, b_dbeta.to(dbeta.dtype.element_ty), mask=row_ok)


def saves_scores(sequences, heads, K, V, device):
    """Whether the forward stores the scores scale·(Q Kᵀ ⊙ causal) for the reverse pass (v25): where that pass
    runs narrowed (pass_block_v: its programs fit one wave of the GPU), the latency of its chain bounds it and
    the scores' product is taken off the chain, (1, 16384, 16, 128) fwd+bwd 1.65 → 1.54 ms. Where its programs fill
    the GPU the product costs less than the scores' bytes: (8, 2048, 16, 128) 1.42 → 1.47 ms, and (8, 2048, 12, 64)
    from CUDA graphs 0.524 → 0.554 (H100, 2026-12-06, compare_versions.py). The interpreter has no SMs and forms
    them (tests reach the saved scores by giving it SMs)."""
    return pass_block_v(sequences, heads, K, V, False, device) < _blocks(K, V)[1]


def make_plan(batch, length, rank, device, offsets=None):
    """The Plan for a call, cached: decoding makes one every token, and a backward the one its forward made."""
    offsets = tuple(range(0, (batch + 1) * length, length)) if offsets is None else tuple(offsets)
    return _cached_plan(rank, device, offsets)


def tokens_per_chunk(rank):
    """BT: a chunk's ROWS rows hold this many tokens of RP = next_power_of_2(rank) components."""
    return ROWS // pow2(rank, 1)


def chunk_counts(lengths, rank):
    """How many chunks each sequence of these lengths takes."""
    bt = tokens_per_chunk(rank)
    return [(n + bt - 1) // bt for n in lengths]


@functools.lru_cache(maxsize=64)
def _cached_plan(rank, device, offsets):
    return Plan(rank, device, offsets)


class Plan:
    """How the packed token axis splits into sequences (offsets) and chunks of BT tokens.

    The kernels take `chunks` (cu, chunk_idx, length, uniform) or `sequences` (cu, chunk_off, length, uniform).
    When every sequence has the same length (a batch), the kernels compute positions from `length` and the index
    tensors are None: nothing cached lives on the device, which CUDA graphs require (a cached tensor first made
    inside a graph's warm-up belongs to its memory pool, and torch.compile's "reduce-overhead" refuses it).
    """

    def __init__(self, rank, device, offsets):
        self.rank, self.device, self.offsets = rank, device, offsets
        self.rp = pow2(rank, 1)
        self.bt = tokens_per_chunk(rank)
        lens = [b - a for a, b in zip(offsets, offsets[1:])]
        ncs = chunk_counts(lens, rank)
        self.n, self.nc, self.max_chunks = len(lens), sum(ncs), max(ncs)
        self.whole_chunks = all(n % self.bt == 0 for n in lens)  # every sequence ends on a chunk boundary
        uniform = len(set(lens)) == 1
        cu = chunk_off = chunk_idx = None
        if not uniform:
            starts = [0]
            for n in ncs:
                starts.append(starts[-1] + n)
            cu = torch.tensor(offsets, device=device, dtype=torch.int32)
            chunk_off = torch.tensor(starts, device=device, dtype=torch.int32)
            pairs = [(s, c) for s, n in enumerate(ncs) for c in range(n)]
            chunk_idx = torch.tensor(pairs, device=device, dtype=torch.int32).view(-1, 2)
        length = lens[0] if uniform else 0
        self.chunks = (cu, chunk_idx, length, uniform)
        self.sequences = (cu, chunk_off, length, uniform)
        self._segments = None

    def segments(self):
        """The same chunks grouped into segments of about √(chunks) chunks, each its own sequence.

        Returns (segment plan, seg_off) where seg_off[n] is the first segment of sequence n.
        Global chunk ids are the same in both plans, so per-chunk buffers are shared.
        """
        if self._segments is None:
            step = max(1, round(self.max_chunks**0.5)) * self.bt
            offsets, seg_off = [0], [0]
            for a, b in zip(self.offsets, self.offsets[1:]):
                offsets += list(range(a + step, b, step)) + [b]
                seg_off.append(len(offsets) - 1)
            seg_off = torch.tensor(seg_off, device=self.device, dtype=torch.int32)
            self._segments = (Plan(self.rank, self.device, offsets), seg_off)
        return self._segments

    def use_scan(self, heads, K, V, scan):
        """Parallel scan over segment flows when the sequential pass has too few programs to fill
        the GPU (few sequences × heads × V blocks) and the sequences are long; `scan` forces either way."""
        if scan is not None:
            return scan
        if self.device.type != "cuda" or self.max_chunks < 64:
            return False
        # The scan does about three passes' work over its segments in place of one pass's chain. Against the
        # pipelined passes (H200, 2026-12-02, one sequence of 16384 tokens, D = 128, fwd+bwd) it wins at 16 programs
        # (H = 8: 1.61 ms against 1.81) and 8, and loses at 32 (H = 16: 2.23 against 2.17)
        return self.n * heads * cdiv(V, _blocks(K, V)[1]) <= sm_count(self.device) // 8

    def windows(self, heads, K, V, reverse=False):
        """Chunk windows [lo, hi) in the order a sequential pass takes them, from the last chunk for the `reverse`
        pass: OVERLAP_WINDOWS of them where one sequence's passes leave at least half the GPU's SMs idle and it has
        OVERLAP_MIN_CHUNKS chunks, so that the per-chunk kernels of each finished window run beside the next window's
        pass (chunk._overlapped), at rank OVERLAP_EAGER_MIN_RANK or more unless a CUDA graph is being captured; one
        window, all chunks, elsewhere. The forward's windows are equal, the reverse pass's grow by OVERLAP_GROWTH.
        With one sequence a window's chunks are also its global chunk ids."""
        passes = heads * cdiv(V, self.pass_block_v(heads, K, V, False))
        if (self.n != 1 or self.nc < OVERLAP_MIN_CHUNKS or 2 * passes > sm_count(self.device)
                or self.rank < OVERLAP_EAGER_MIN_RANK and not capturing(self.device)):
            return ((0, self.nc),)
        weights = [(OVERLAP_GROWTH if reverse else 1.0) ** i for i in range(OVERLAP_WINDOWS)]
        ends = [round(self.nc * sum(weights[:i]) / sum(weights)) for i in range(len(weights) + 1)]
        taken = [(lo, hi) for lo, hi in zip(ends, ends[1:]) if hi > lo]  # chunks counted in the pass's direction
        return tuple((self.nc - hi, self.nc - lo) for lo, hi in taken) if reverse else tuple(taken)

    def pass_block_v(self, heads, K, va, aug, alone=False):
        """V block of this plan's state passes (pass_block_v); `alone` as there, at rank 1 only."""
        return pass_block_v(self.n, heads, K, va, aug, self.device, alone and self.rank == 1)


def pass_block_v(sequences, heads, K, va, aug, device, alone=False):
    """V block of a state pass: _blocks' 64, or 32 where twice the programs (sequences × heads × V blocks)
    still fit in one wave of the GPU. Each program's chain step is then shorter: at 32 programs (one sequence
    of 16384 tokens, 16 heads, D = 128; H200, 2026-12-05, state_passes.py --variants 32:4:4) forward 0.353 →
    0.235 ms and reverse 0.616 → 0.546 at R = 1, 0.684 → 0.453 and 1.180 → 0.843 at R = 2; at 256 programs
    (8 sequences) both passes take 1.5-1.9× longer. The scan's flow passes keep 64 (not timed at 32). Only at
    K blocks of 128, where the benchmark timed them: at D = 64 they give the 64-wide outputs bit for bit on the
    H200 (v15, kernels/benchmarks/NOTES.md; v7's wrong results there are gone) but have been timed only at 192
    programs, where they lose.

    `alone`: a reverse pass at rank 1 with no gradient kernels beside it (one window, Plan.windows), which takes
    V blocks of 16 where four times the programs still fit one wave: same bits, a shorter step (the same shape
    on an H100, 2026-12-06: reverse 0.540 → 0.441 ms; the forward pass gains nothing at 16, 0.233 → 0.234).
    Beside windows' gradients the pass keeps 32, which leaves them half the SMs."""
    bv = _blocks(K, va)[1]
    if aug or bv != 64 or pow2(K) != 128:
        return bv
    for narrow in (16, 32) if alone else (32,):
        if sequences * heads * cdiv(va, narrow) <= sm_count(device):
            return narrow
    return bv


@functools.cache
def sm_count(device):
    """Streaming multiprocessors of a CUDA device; 0 elsewhere (the interpreter), where no pass narrows."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


def capturing(device):
    """Whether work on the device's current stream is being captured into a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _blocks(K, V):
    """(BK, BV) of the sequential passes and combine: all of K, V blocks of 64, 32 at K = 256 (64 does not fit there).
    V blocks of 16 or 32 in these many-dot kernels have hit a Triton 3.6 miscompile on Hopper with 16-bit operands
    (wrong results, illegal addresses; H200, 2026-12-01), so they keep 64 where it fits; the 32 at K = 256 passes
    the GPU tests (v15), and at K = 128 the passes run 32 where the GPU has SMs to spare (Plan.pass_block_v)."""
    bk = pow2(K)
    return bk, min(pow2(V), 64 if bk <= 128 else 32)


def _chunk_blocks(K, V):
    """(BK, BV) of the per-chunk kernels prep and output: all of K, V blocks of 64 at every K (prep and
    output fit 64 at K = 256 without spills, resources.py --dims 256)."""
    return pow2(K), min(pow2(V), 64)


def heads_apart(x):
    """The token stride of packed q [N,H,K] or k [N,H,R,K] in a head's rows ([K] or [R, K]): H for a contiguous one,
    more for a slice of a wider projection (ops.pack hands those over only where it is a whole number)."""
    return x.stride(0) // math.prod(x.shape[2:])


def _prep(k, v, beta, plan):
    """The UT transform of every chunk: T, W and Ũ."""
    _, H, R, K = k.shape
    V = v.shape[-1]
    bk, bv = _chunk_blocks(K, V)
    tinv = k.new_empty(plan.nc, H, ROWS, ROWS)
    w = k.new_empty(plan.nc, H, ROWS, K)
    ut = v.new_empty(plan.nc, H, ROWS, V)
    prep_kernel[(plan.nc, H)](k, v, v.stride(0), beta, tinv, w, ut, *plan.chunks, H, heads_apart(k), R, K, V, plan.rp,
                              plan.bt, bk, bv, dot_dtype(k.dtype), dot_precision(k.dtype), **launch("prep", K, k.dtype))
    return tinv, w, ut


def _pass_launch(name, k, va, aug, plan, alone=False):
    """(BK, BV, launch-table entry) of state pass `name` over va columns. The entry's name carries "_aug" for the
    scan's flows and "_narrow" ("_narrow16" at 16) where Plan.pass_block_v narrowed the V blocks below _blocks' (at
    K = 256 both are 32, and the plain entries hold), "_narrow_full" at 32 where the programs take more than half
    the SMs."""
    _, H, R, K = k.shape
    bv = plan.pass_block_v(H, K, va, aug, alone)
    suffix = "_aug" if aug else "" if bv == _blocks(K, va)[1] else "_narrow16" if bv == 16 else "_narrow"
    if suffix == "_narrow" and 2 * plan.n * H * cdiv(va, bv) > sm_count(plan.device):
        suffix = "_narrow_full"
    return pow2(K), bv, name + suffix


def _state_pass(k, w, ut, init, plan, final, aug, hs=None, window=None, repeats=None, windows=1):
    """The forward pass over chunks, or over the window of them [lo, hi) of every sequence: U over Ũ in ut, the chunk
    states into hs (none in the scan's flow pass, aug). `repeats`: the call's earlier windows' launches; `windows`:
    how many the call takes (_uses_tma)."""
    _, H, R, K = k.shape
    V = ut.shape[-1]
    va = K + V if aug else V
    lo, hi = window or (0, plan.nc)
    bk, bv, entry = _pass_launch("state_fwd", k, va, aug, plan)
    tma = not aug and _uses_tma(plan, k.device, windows)
    descs = _pass_descriptors(k, w, ut, hs, plan, bk, bv) if tma else None
    (repeats or Repeats(state_fwd_kernel))(
        (plan.n, H, cdiv(va, bv)), k, w, ut, hs, *(descs or (None,) * 4), init, final, lo, hi, *plan.sequences, H,
        heads_apart(k), R, K, V, plan.rp, plan.bt, bk, bv, init is not None, final is not None, dot_dtype(k.dtype),
        dot_precision(k.dtype), aug, va, descs is not None, key=(id(init), id(final)),
        **launch(entry, K, k.dtype, R, descs is not None))


def tma_blocks(bt, rp, K, bv):
    """Block shape of each TMA descriptor the passes take, by kernel argument. The descriptors below are built with
    them, and resources.py compiles the kernels with them."""
    return {"k_d": [bt, rp, K], "w_d": [ROWS, K], "u_d": [ROWS, bv], "s_d": [K, bv], "q_d": [bt, K],
            "do_d": [bt, bv], "qk_d": [bt, ROWS], "du_d": [ROWS, bv], "ds_d": [K, bv]}


def _key_tiles(k, plan, bk, value_rows, block):
    """TMA descriptor of the passes' k tiles (`block`: [BT, RP, K]), or None where TMA can't take the passes' tiles:
    K below its block, padded components (R < RP), k's or the value rows (`value_rows` bytes) not 16-byte aligned."""
    n, H, R, K = k.shape
    if bk != K or plan.rp != R or any(x % 16 for x in (K * k.element_size(), k.stride(0) * k.element_size(),
                                                        k.data_ptr(), value_rows)):
        return None
    k3 = k.as_strided((n, H * R, K), (k.stride(0), K, 1))
    return TensorDescriptor(k3, k3.shape, k3.stride(), block)


def _pass_descriptors(k, w, ut, hs, plan, bk, bv):
    """TMA descriptors of the forward pass's tiles (k, W [ROWS, K], Ũ and U [ROWS, BV], the state [K, BV]), or None
    where TMA can't take them (_key_tiles)."""
    K, V = k.shape[-1], ut.shape[-1]
    blocks = tma_blocks(plan.bt, plan.rp, K, bv)
    k_d = _key_tiles(k, plan, bk, V * ut.element_size(), blocks["k_d"])
    if k_d is None:
        return None
    return (k_d, TensorDescriptor.from_tensor(w.view(-1, K), blocks["w_d"]),
            TensorDescriptor.from_tensor(ut.view(-1, V), blocks["u_d"]),
            TensorDescriptor.from_tensor(hs.view(-1, V), blocks["s_d"]))


def _uses_tma(plan, device, windows):
    """Whether the plan's passes, over this many windows, take their tiles by TMA (TMA_PASSES, above)."""
    return TMA_PASSES and plan.max_chunks >= TMA_MIN_CHUNKS and (windows == 1 or capturing(device))


def _combine(flows, x0, xs, xout, seg_off, n, reverse):
    _, H, K, V = xs.shape
    bk, bv = _blocks(K, V)
    combine_kernel[(n, H, cdiv(V, bv))](flows, x0, xs, xout, seg_off, H, K, V, bk, bv, min(bk, 32),
                                        x0 is not None, xout is not None, reverse, **launch("combine", K, xs.dtype))


@functools.cache
def _pass_stream(device):
    """The stream the overlapped passes run on: the highest priority, so that the block scheduler serves each window's
    pass before the per-chunk kernels queued beside it."""
    return torch.cuda.Stream(device, priority=-100)


def _overlapped(windows, one_pass, then, start, end, state_shape, device):
    """one_pass(state in, state out, (lo, hi)) over each chunk window in order, from `start` to `end` (either may be
    None), the states between windows carried in an fp32 buffer; then(lo, hi) once the window's pass is done. With
    several windows on the GPU the passes run on _pass_stream and each then() on the caller's stream, beside the next
    windows' passes."""
    carry = torch.empty(state_shape, dtype=torch.float32, device=device) if len(windows) > 1 else None
    overlap = len(windows) > 1 and device.type == "cuda"  # (the interpreter's windows run one after another)
    if overlap:
        main, passes = torch.cuda.current_stream(device), _pass_stream(device)
        passes.wait_stream(main)
    for i, window in enumerate(windows):
        with torch.cuda.stream(passes) if overlap else contextlib.nullcontext():
            one_pass(carry if i else start, end if i == len(windows) - 1 else carry, window)
        if overlap:
            main.wait_stream(passes)
        then(*window)


def _states(k, w, ut, hs, initial_state, plan, output_final_state, scan, then):
    """The state entering every chunk (into hs), U = Ũ − W S (over Ũ in ut) and the final state; then(lo, hi) on
    the chunks [lo, hi) whose U and states are done.

    Sequential passes (over windows of chunks, Plan.windows), or a parallel scan: the flows [P | J] of all segments
    at once, a short walk over segments for their start states, then all segments' passes at once.
    """
    _, H, R, K = k.shape
    V = ut.shape[-1]
    final = k.new_empty(plan.n, H, K, V, dtype=torch.float32) if output_final_state else None
    if plan.use_scan(H, K, V, scan):
        seg, seg_off = plan.segments()
        flows = k.new_empty(seg.n, H, K, K + V, dtype=torch.float32)
        _state_pass(k, w, ut, None, seg, flows, True)
        starts = k.new_empty(seg.n, H, K, V, dtype=torch.float32)
        _combine(flows, initial_state, starts, final, seg_off, plan.n, False)
        _state_pass(k, w, ut, starts, seg, None, False, hs)
        then(0, plan.nc)
        return final

    repeats, windows = Repeats(state_fwd_kernel), plan.windows(H, K, V)

    def one_pass(init, out, window):
        _state_pass(k, w, ut, init, plan, out, False, hs, window, repeats, len(windows))

    _overlapped(windows, one_pass, then, initial_state, final, (plan.n, H, K, V), k.device)
    return final


def chunk_fwd(q, k, v, beta, scale, initial_state, plan, output_final_state, scan=None):
    """Forward on packed tensors q [N,H,K], k [N,H,R,K], v [N,H,R,V] (contiguous but for their token strides, see
    heads_apart and value_rows), beta [N,H,R].

    Returns o [N,H,V], the final state (or None) and what backward reuses: T, W, U, the chunk states and the
    scores (empty where saves_scores says no).
    """
    _, H, R, K = k.shape
    V = v.shape[-1]
    tinv, w, u = _prep(k, v, beta, plan)  # u holds Ũ until the passes write U over it
    hs = k.new_empty(plan.nc, H, K, V)
    save_scores = saves_scores(plan.n, H, K, V, plan.device)
    qk = k.new_empty((plan.nc, H, plan.bt, ROWS) if save_scores else (0,))
    o = torch.empty(q.shape[0], H, V, dtype=q.dtype, device=q.device)
    bk, bv = _chunk_blocks(K, V)
    dt, prec, output_launch = dot_dtype(k.dtype), dot_precision(k.dtype), launch("output", K, k.dtype)
    repeats, strides = Repeats(output_kernel), (heads_apart(q), heads_apart(k))

    def output(lo, hi):
        repeats(((hi - lo) * cdiv(V, bv), H), q, k, u, hs, o, qk, scale, lo, *plan.chunks, H, *strides, R, K, V,
                plan.rp, plan.bt, bk, bv, dt, prec, save_scores, **output_launch)

    final = _states(k, w, u, hs, initial_state, plan, output_final_state, scan, output)
    return o, final, (tinv, w, u, hs, qk)


def _reverse_pass(q, k, w, do, qk, scale, dfinal, plan, dinit, aug, du=None, dhs=None, window=None, repeats=None,
                  alone=False, windows=1):
    """The reverse pass over chunks, or over the window of them [lo, hi) of every sequence. `repeats`: the call's
    earlier windows' launches; `alone`: no gradient kernels run beside it (Plan.pass_block_v); `windows` as in
    _state_pass."""
    _, H, R, K = k.shape
    V = do.shape[-1]
    va = K + V if aug else V
    lo, hi = window or (0, plan.nc)
    bk, bv, entry = _pass_launch("state_bwd", k, va, aug, plan, alone)
    tma = not aug and _uses_tma(plan, k.device, windows)
    descs = _reverse_descriptors(q, k, w, do, qk, du, dhs, plan, bk, bv) if tma else None
    (repeats or Repeats(state_bwd_kernel))(
        (plan.n, H, cdiv(va, bv)), q, k, w, do, qk, du, dhs, *(descs or (None,) * 7), dfinal, dinit, scale, lo, hi,
        *plan.sequences, H, heads_apart(q), heads_apart(k), R, K, V, plan.rp, plan.bt, bk, bv, dfinal is not None,
        dinit is not None, dot_dtype(k.dtype), dot_precision(k.dtype), aug, va, qk.numel() > 0, descs is not None,
        key=(id(dfinal), id(dinit)), **launch(entry, K, k.dtype, R, descs is not None))


def _reverse_descriptors(q, k, w, do, qk, du, dhs, plan, bk, bv):
    """TMA descriptors of the reverse pass's tiles, or None where TMA can't take them: as _pass_descriptors, and
    sequences that end inside a chunk (the pass would read the next one's rows unmasked)."""
    n, H, _, K = k.shape
    V = do.shape[-1]
    if not plan.whole_chunks or V % bv or any(x % 16 for x in (q.stride(0) * q.element_size(), q.data_ptr())):
        return None
    blocks = tma_blocks(plan.bt, plan.rp, K, bv)
    k_d = _key_tiles(k, plan, bk, V * do.element_size(), blocks["k_d"])
    if k_d is None:
        return None
    q2 = q.as_strided((n, H * K), (q.stride(0), 1))
    return (TensorDescriptor(q2, q2.shape, q2.stride(), blocks["q_d"]), k_d,
            TensorDescriptor.from_tensor(w.view(-1, K), blocks["w_d"]),
            TensorDescriptor.from_tensor(do.view(n, -1), blocks["do_d"]),
            TensorDescriptor.from_tensor(qk.view(-1, ROWS), blocks["qk_d"]) if qk.numel() else None,
            TensorDescriptor.from_tensor(du.view(-1, V), blocks["du_d"]),
            TensorDescriptor.from_tensor(dhs.view(-1, V), blocks["ds_d"]))


def chunk_bwd(q, k, v, beta, scale, saved, do, dfinal, plan, need_dinit, scan=None):
    """Backward from the forward's T, W, U, chunk states and scores: the reverse state pass, then the gradients
    (window by window, beside the pass, where Plan.windows splits it)."""
    _, H, R, K = k.shape
    V = v.shape[-1]
    tinv, w, u, hs, qk = saved
    # input dtype, like hs: the gradient kernels multiply them in that dtype
    du = torch.empty_like(u)
    dhs = torch.empty_like(hs)
    dinit = q.new_empty(plan.n, H, K, V, dtype=torch.float32) if need_dinit else None
    do = do.contiguous()
    dw = torch.empty_like(w)
    dq, dk, dv = (x.new_empty(x.shape) for x in (q, k, v))  # (the inputs may be strided, their gradients are not)
    dbeta = torch.empty_like(beta)
    gk, gv = min(pow2(K), 64), min(pow2(V), 64)
    dt, prec = dot_dtype(k.dtype), dot_precision(k.dtype)
    cd = dt if WY_CANCELLING_16BIT else tl.float32
    state_launch, wy_launch = launch("grad_state", K, k.dtype), launch("grad_wy", K, k.dtype)
    state_repeats, wy_repeats = Repeats(grad_state_kernel), Repeats(grad_wy_kernel)
    strides = heads_apart(q), heads_apart(k)

    def grads(lo, hi):
        state_repeats(((hi - lo) * cdiv(K, gk), H), q, k, u, hs, du, dhs, do, dq, dk, dw, scale, lo, *plan.chunks, H,
                      *strides, R, K, V, plan.rp, plan.bt, gk, gv, dt, prec, **state_launch)
        wy_repeats((hi - lo, H), k, v, v.stride(0), beta, tinv, du, dw, dk, dv, dbeta, lo, *plan.chunks, H, strides[1],
                   R, K, V, plan.rp, plan.bt, gk, gv, dt, prec, cd, **wy_launch)

    if plan.use_scan(H, K, V, scan):
        seg, seg_off = plan.segments()
        flows = q.new_empty(seg.n, H, K, K + V, dtype=torch.float32)
        _reverse_pass(q, k, w, do, qk, scale, None, seg, flows, True)
        ends = q.new_empty(seg.n, H, K, V, dtype=torch.float32)
        _combine(flows, dfinal, ends, dinit, seg_off, plan.n, True)
        _reverse_pass(q, k, w, do, qk, scale, ends, seg, None, False, du, dhs)
        grads(0, plan.nc)
        return dq, dk, dv, dbeta, dinit

    repeats = Repeats(state_bwd_kernel)
    windows = plan.windows(H, K, V, reverse=True)

    def one_pass(dend, dstart, window):
        _reverse_pass(q, k, w, do, qk, scale, dend, plan, dstart, False, du, dhs, window, repeats,
                      len(windows) == 1, len(windows))

    _overlapped(windows, one_pass, grads, dfinal, dinit, (plan.n, H, K, V), q.device)
    return dq, dk, dv, dbeta, dinit
