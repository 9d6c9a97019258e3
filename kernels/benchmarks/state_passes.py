"""Where a fwd+bwd's GPU time goes at each anchor shape, and the sequential state passes alone, per chunk step.

At small B·H (one or two long sequences) the passes over the chunks are a chain of T/64 dependent steps per
sequence and head, and their step latency, not the arithmetic, sets the time. For each shape this prints:
- the GPU time of every kernel of one fwd+bwd (delta_rule, R = 1, bf16, scan chosen as delta_rule chooses);
- the forward and the reverse pass alone (scan off) under each V block width, warp count and pipeline depth, with
  the time per chunk step and the largest relative difference of their outputs (u, hs; du, dhs) to the committed
  settings' (chunk.LAUNCH, chunk.LAUNCH_RANKS at its ranks, V blocks as Plan.pass_block_v chooses), each variant in
  a process of its own.

    python kernels/benchmarks/state_passes.py [--shapes 4,3,1] [--variants 64:4:3,64:8:3] [--rank 1] [--no-profile]
                                              [--scan-heads 16,8,4,2,1]
"""

import argparse
import json
import subprocess
import sys
from collections import defaultdict

import torch
from triton.testing import do_bench

from flowhn_kernels import chunk, delta_rule
from flowhn_kernels.delta_rule import chunk_delta_rule
from flowhn_kernels.ops import pack
from flowhn_kernels.utils import cdiv, pow2

from bench_args import numbers, settings
from bench_delta_rule import SHAPES, inputs, shape_indices


def kernel_times(B, T, H, D):
    """GPU µs of each kernel in one fwd+bwd of delta_rule, largest first, and the fwd+bwd's wall time in µs."""
    xs = inputs(B, T, H, D, 1, layout="fla")
    do = torch.randn_like(xs[2])
    wall = do_bench(lambda: delta_rule(*xs)[0].backward(do), warmup=10, rep=50, grad_to_none=xs, return_mode="median")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            for x in xs:  # do_bench leaves its last gradients: without this the first backward adds to them
                x.grad = None
            delta_rule(*xs)[0].backward(do)
        torch.cuda.synchronize()
    total = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            total[e.name] += e.device_time / 5
    return sorted(total.items(), key=lambda kv: -kv[1]), 1e3 * wall


def pass_inputs(B, T, H, D, R=1, dev="cuda"):
    """The passes' inputs: q, k, W, Ũ (the UT transform's, before the forward pass writes U over it), dO, the scores
    (the output kernel's, from a whole forward) and the plan."""
    q, k, v, beta = pack(*(x.detach() for x in inputs(B, T, H, D, R, dev=dev)))
    plan = chunk.make_plan(B, T, R, q.device)
    _, w, ut = chunk._prep(k, v, beta, plan)
    qk = chunk.chunk_fwd(q, k, v, beta, q.shape[-1] ** -0.5, None, plan, False)[2][-1]  # run_passes' scale
    do = torch.randn_like(v[:, :, 0])
    return q, k, w, ut, do, qk, plan


def run_passes(q, k, w, ut, do, qk, plan):
    """(u, hs, du, dhs) and the ms of the forward and the reverse pass, each as delta_rule runs it. The forward writes
    U over its copy of Ũ: the first call's U is the output, the timed calls' work on what the last one left."""
    scale = q.shape[-1] ** -0.5
    u, hs = ut.clone(), q.new_empty(plan.nc, q.shape[1], q.shape[2], ut.shape[-1])
    du, dhs = torch.empty_like(ut), torch.empty_like(hs)
    fwd = lambda: chunk._state_pass(k, w, u, None, plan, None, False, hs)  # noqa: E731
    bwd = lambda: chunk._reverse_pass(q, k, w, do, qk, scale, None, plan, None, False, du, dhs)  # noqa: E731
    fwd()
    bwd()
    outputs = tuple(x.clone() for x in (u, hs, du, dhs))
    return outputs, do_bench(fwd, warmup=10, rep=50, return_mode="median"), \
        do_bench(bwd, warmup=10, rep=50, return_mode="median")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# BV:warps:stages of the two passes; the risky ones last (BV = 16 hits a Triton 3.6 miscompile with 16-bit operands)
VARIANTS = ("64:4:1", "64:4:2", "64:4:3", "64:4:4", "64:8:2", "64:8:3", "64:8:4", "128:8:2", "32:4:3", "32:4:4",
            "32:8:4")


def set_variant(variant):
    """Run chunk's two passes at "BV:warps:stages" (V block width, num_warps, num_stages)."""
    bv, warps, stages = (int(x) for x in variant.split(":"))
    chunk.Plan.pass_block_v = lambda plan, heads, K, va, aug, alone=False: min(pow2(va), bv)
    passes = {name for name, _ in chunk.LAUNCH if name.startswith(("state_fwd", "state_bwd")) and "_aug" not in name}
    for name in passes:  # every launch entry of the two passes but the scan's
        for width in (64, 128, 256):
            chunk.LAUNCH[(name, width)] = dict(num_warps=warps, num_stages=stages)
            for rank in (2, 3, 4):
                chunk.LAUNCH_RANKS.pop((name, width, rank), None)


def scan_crossover(heads, T=16384, D=128):
    """fwd+bwd ms of one sequence of T tokens with the scan off and on, at each head count: where the scan pays."""
    print(f"\n## one sequence of {T} tokens, D = {D}: fwd+bwd ms, sequential pass against the scan\n")
    print("| H | programs of the pass | scan off | scan on | delta_rule chooses |\n|---|---|---|---|---|")
    for H in heads:
        xs = inputs(1, T, H, D, 1, layout="fla")
        do = torch.randn_like(xs[2])
        ms = [do_bench(lambda: chunk_delta_rule(*xs, scan=scan)[0].backward(do), warmup=10, rep=50, grad_to_none=xs,
                       return_mode="median") for scan in (False, True)]
        chosen = chunk.make_plan(1, T, 1, xs[0].device).use_scan(H, D, D, None)
        print(f"| {H} | {H * cdiv(D, chunk._blocks(D, D)[1])} | {ms[0]:.3f} | {ms[1]:.3f} | "
              f"{'scan' if chosen else 'sequential'} |", flush=True)


def child(variant, shapes, R=1, dev="cuda"):
    """One variant at every shape, against the committed kernels: prints one JSON line per shape."""
    blocks = chunk.Plan.pass_block_v
    tables = [(table, dict(table)) for table in (chunk.LAUNCH, chunk.LAUNCH_RANKS)]
    for i in shapes:
        xs = pass_inputs(*SHAPES[i], R, dev=dev)
        want, fwd0, bwd0 = run_passes(*xs)
        set_variant(variant)
        try:
            got, fwd, bwd = run_passes(*xs)
        finally:
            chunk.Plan.pass_block_v = blocks
            for table, saved in tables:
                table.clear()
                table.update(saved)
        diff = max(rel(g, w) for g, w in zip(got, want))
        print(json.dumps(dict(shape=i, steps=xs[-1].max_chunks, committed=(fwd0, bwd0), variant=(fwd, bwd),
                              diff=diff)), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", type=shape_indices, default=[4, 3, 1])
    ap.add_argument("--variants", type=settings("BV:warps:stages variants, each ≥ 1", 3, ":"),
                    default=",".join(VARIANTS))
    ap.add_argument("--rank", type=int, default=1, help="R of the passes alone (the profile runs R = 1)")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--scan-heads", type=numbers("head counts, each ≥ 1", 1), default=[],
                    help="e.g. 16,8,4,2,1: fwd+bwd with the scan off and on at T = 16384")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shapes = args.shapes
    if args.child:
        return child(args.child, shapes, args.rank)
    for i in shapes if not args.no_profile else ():
        B, T, H, D = SHAPES[i]
        print(f"\n## {B}, {T}, {H}, {D}: kernels of one fwd+bwd (µs)")
        times, wall = kernel_times(B, T, H, D)
        for name, us in times:
            print(f"  {us:9.1f}  {name[:90]}")
        print(f"  {sum(us for _, us in times):9.1f}  total GPU time; wall time of a fwd+bwd {wall:.1f}", flush=True)
    if args.scan_heads:
        scan_crossover(args.scan_heads)
    # each variant in a process of its own: a miscompiled one (an illegal address) poisons its CUDA context
    rows = defaultdict(list)
    for variant in (":".join(map(str, v)) for v in args.variants):
        proc = subprocess.run([sys.executable, __file__, "--child", variant, "--shapes", ",".join(map(str, shapes)),
                               "--rank", str(args.rank)],
                              capture_output=True, text=True)
        done = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        for r in done:
            rows[r["shape"]].append((variant, r))
        if proc.returncode:
            print(f"{variant}: failed after {len(done)} shapes: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
    for i in shapes:
        print(f"\n## {SHAPES[i]}, R = {args.rank}: the passes alone, scan off (ms; µs per chunk step)\n")
        print("| variant | fwd pass | µs/step | committed fwd | bwd pass | µs/step | committed bwd | max rel diff |")
        print("|---|---|---|---|---|---|---|---|")
        for variant, r in rows[i]:
            (f0, b0), (f, b), n = r["committed"], r["variant"], r["steps"]
            print(f"| {variant} | {f:.3f} | {1e3 * f / n:.2f} | {f0:.3f} | {b:.3f} | {1e3 * b / n:.2f} | {b0:.3f} "
                  f"| {r['diff']:.1e} |")


if __name__ == "__main__":
    main()
