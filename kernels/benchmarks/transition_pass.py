"""Would the state passes be faster with each chunk's transition precomputed? A probe, not the kernels' code.

Today each step of the forward pass runs two dependent products, U = Ũ − W S then S += Kᵀ U, and the reverse pass
two on its chain (dUᵀ = dOᵀA + dSᵀKᵀ, then dSᵀ −= dUᵀ W) beside three off it. Both chains are one product with the
chunk's transition I − KᵀW precomputed:

    forward  S  ← S − (KᵀW) S + KᵀŨ                 (or, transposed, Sᵀ ← Sᵀ − Sᵀ (KᵀW)ᵀ + (KᵀŨ)ᵀ)
    reverse  dSᵀ ← dSᵀ − dSᵀ (KᵀW) + Z,   Z = scale dOᵀQ − dOᵀ(scale QKᵀ ⊙ causal) W

where KᵀW, KᵀŨ and Z are per-chunk products that run in parallel over chunks. This times that one-product step
(`chain_kernel`, bf16 operands, fp32 state) at B = 1, T = 16384, H = 16, D = 128 (`--shape`) under each V block,
warp count and pipeline depth, beside the committed passes on the same inputs, and checks its states (hs, dhs)
against theirs.

    python kernels/benchmarks/transition_pass.py [--variants 32:4:3:1,...]   (BV:warps:stages:state first)
"""

import argparse

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from flowhn_kernels.utils import dot_dtype

from bench_args import numbers, settings
from state_passes import pass_inputs, rel, run_passes

VARIANTS = ",".join(f"{bv}:{w}:{s}:{f}" for f in (1, 0) for bv in (32, 64) for w, s in ((4, 2), (4, 3), (4, 4), (8, 3)))


@triton.jit
def chain_kernel(m, j, states, NC: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
                 FIRST: tl.constexpr, REVERSE: tl.constexpr, DT: tl.constexpr):
    """X ← X + X M_c + J_c (FIRST: X is [BV, K], J_c stored [V, K]) or X ← X + M_c X + J_c (X [K, BV], J_c [K, V])
    over the chunks (from the last if REVERSE), storing X before each step in states[c] as [K, V]."""
    h = tl.program_id(0)
    vv = tl.program_id(1) * BV + tl.arange(0, BV)
    kk = tl.arange(0, K)
    if FIRST:
        x = tl.zeros([BV, K], tl.float32)
        kv = kk[None, :] * V + vv[:, None]
        jv = vv[:, None] * K + kk[None, :]
    else:
        x = tl.zeros([K, BV], tl.float32)
        kv = kk[:, None] * V + vv[None, :]
        jv = kv
    mk = kk[:, None] * K + kk[None, :]
    for i in range(NC):
        c = NC - 1 - i if REVERSE else i
        base = (c * H + h).to(tl.int64)
        b_m = tl.load(m + base * K * K + mk)
        b_j = tl.load(j + base * K * V + jv)
        tl.store(states + base * K * V + kv, x.to(states.dtype.element_ty))
        if FIRST:
            x += tl.dot(x.to(DT), b_m.to(DT)) + b_j.to(tl.float32)
        else:
            x += tl.dot(b_m.to(DT), x.to(DT)) + b_j.to(tl.float32)


def chunked(x, nc):
    """[T, H, D] → [nc, H, 64, D] (R = 1, T a multiple of 64)."""
    return x.view(nc, -1, *x.shape[1:]).transpose(1, 2).float()


def operands(q, k, w, ut, do):
    """Per chunk, from the committed forward's W and Ũ: −KᵀW, KᵀŨ and Z (fp32)."""
    nc, scale = w.shape[0], q.shape[-1] ** -0.5
    qc, kc, doc = chunked(q, nc), chunked(k, nc), chunked(do, nc)
    wc, utc = w.float(), ut.float()
    ktw = kc.transpose(-1, -2) @ wc
    causal = torch.ones(64, 64, device=q.device).tril()
    a = scale * (qc @ kc.transpose(-1, -2)) * causal
    z = scale * doc.transpose(-1, -2) @ qc - (doc.transpose(-1, -2) @ a) @ wc
    return -ktw, kc.transpose(-1, -2) @ utc, z


def chain(m, j, nc, H, K, V, variant, reverse):
    bv, warps, stages, first = (int(x) for x in variant.split(":"))
    states = torch.empty(nc, H, K, V, device=m.device, dtype=torch.bfloat16)
    fn = lambda: chain_kernel[(H, V // bv)](m, j, states, nc, H, K, V, bv, bool(first), reverse,  # noqa: E731
                                             dot_dtype(m.dtype), num_warps=warps, num_stages=stages)
    fn()
    return states.clone(), do_bench(fn, warmup=10, rep=50, return_mode="median")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", type=settings("BV:warps:stages:first variants, each ≥ 0", 4, ":", least=0),
                    default=VARIANTS)
    ap.add_argument("--shape", type=numbers("B, T, H and D, each ≥ 1", 1), default="1,16384,16,128",
                    help="B,T,H,D (B = 1, T a multiple of 64)")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    if len(args.shape) != 4 or args.shape[0] != 1 or args.shape[1] % 64:
        ap.error(f"--shape: expected B,T,H,D with B = 1 and T a multiple of 64, got {args.shape}")
    B, T, H, D = args.shape
    q, k, w, ut, do, qk, plan = pass_inputs(B, T, H, D, dev=args.device)
    (u, hs, du, dhs), fwd0, bwd0 = run_passes(q, k, w, ut, do, qk, plan)
    nc = w.shape[0]
    w, ut = w.view(nc, H, 64, D), ut.view(nc, H, 64, D)
    neg_ktw, ktut, z = operands(q.view(T, H, D), k.view(T, H, D), w, ut, do.view(T, H, D))
    bf = lambda x: x.to(torch.bfloat16).contiguous()  # noqa: E731
    print(f"## B = {B}, T = {T}, H = {H}, D = {D}: {nc} steps; committed passes fwd {fwd0:.3f} ms "
          f"({1e3 * fwd0 / nc:.2f} µs/step), bwd {bwd0:.3f} ({1e3 * bwd0 / nc:.2f})\n")
    print("| variant BV:warps:stages:first | fwd ms | µs/step | rel diff hs | bwd ms | µs/step | rel diff dhs |")
    print("|---|---|---|---|---|---|---|")
    for variant in (":".join(map(str, v)) for v in args.variants):
        first = variant.endswith(":1")
        try:
            if first:  # Sᵀ ← Sᵀ + Sᵀ (−KᵀW)ᵀ + (KᵀŨ)ᵀ
                got_f, t_f = chain(bf(neg_ktw.transpose(-1, -2)), bf(ktut.transpose(-1, -2)), nc, H, D, D, variant,
                                   False)
                got_b, t_b = chain(bf(neg_ktw), bf(z), nc, H, D, D, variant, True)
                bwd = f"{t_b:.3f} | {1e3 * t_b / nc:.2f} | {rel(got_b, dhs):.1e}"
            else:
                got_f, t_f = chain(bf(neg_ktw), bf(ktut), nc, H, D, D, variant, False)
                bwd = "– | – | –"
            print(f"| {variant} | {t_f:.3f} | {1e3 * t_f / nc:.2f} | {rel(got_f, hs):.1e} | {bwd} |", flush=True)
        except Exception as e:  # a launch that does not compile (shared memory) is a row, not the end of the table
            print(f"| {variant} | {type(e).__name__}: {str(e).splitlines()[0][:80]} |||||", flush=True)


if __name__ == "__main__":
    main()
