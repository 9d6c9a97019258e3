"""Benchmark flowhn_kernels.delta_rule against flash-linear-attention on one GPU.

Times (triton.testing.do_bench medians, ms) forward and forward+backward at the anchor shapes
of ANCHORS.md in bf16: R = 1 vs fla chunk_delta_rule, R = 2 vs fla chunk_gated_delta_product
(num_householder=2), one decode step vs fla fused_recurrent_delta_rule (eager, and replayed from
a CUDA graph: the GPU time without the host's; R = 1 forward+backward also replayed, since fla's
eager time moves with its host work); peak memory of forward+backward; and the
relative error of bf16 outputs and gradients against a float64 reference. Prints a markdown
table and writes it to RESULTS.md beside this file (or --out).

    python kernels/benchmarks/bench_delta_rule.py [--shapes 0,1] [--out PATH]

fla is optional (install flash-linear-attention and fla-core 0.6); its columns read "-" without it.
"""

import argparse
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

import flowhn_kernels
from flowhn_kernels import chunk, delta_rule
from flowhn_kernels.delta_rule import chunk_delta_rule
from flowhn_kernels.reference import chunk_masks, reference_chunked
from flowhn_kernels.signature import ut_transform_signature

from bench_args import numbers

try:
    import fla
    from fla.ops.delta_rule import chunk_delta_rule as fla_chunk, fused_recurrent_delta_rule as fla_recurrent
    from fla.ops.gated_delta_product import chunk_gated_delta_product as fla_product
except ImportError:
    fla = None

SHAPES = [(8, 2048, 12, 64), (8, 2048, 16, 128), (4, 4096, 16, 128), (2, 8192, 16, 128), (1, 16384, 16, 128)]
shape_indices = numbers(f"indices 0-{len(SHAPES) - 1} into {SHAPES}", 0, len(SHAPES))  # the type of --shapes


def inputs(B, T, H, D, R, layout="ours", dev="cuda"):
    """bf16 inputs as in ANCHORS.md: q, v normal; k L2-normalised; beta = sigmoid(uniform)."""
    shape = (B, T, H, R) if layout == "ours" else (B, T * R, H)
    q = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16)
    k = F.normalize(torch.randn(*shape, D, device=dev, dtype=torch.float32), dim=-1).to(torch.bfloat16)
    v = torch.randn(*shape, D, device=dev, dtype=torch.bfloat16)
    beta = torch.rand(*shape, device=dev, dtype=torch.float32).sigmoid().to(torch.bfloat16)
    return [x.requires_grad_() for x in (q, k, v, beta)]


def time_fwd(fn, xs):
    with torch.no_grad():
        return do_bench(lambda: fn(*xs), warmup=25, rep=100, return_mode="median")


# ms of warm-up before each eager fwd+bwd is timed: after do_bench's usual 25 the first two fwd+bwd timings of a
# shape still read ~1.2% high at (1, 16384, 16, 128) (1.535 and 1.534 ms, then 1.517, 1.518, 1.517 for the same
# calls; H100, session 41), which put the table's first fwd+bwd column above its own scan=off column
FWD_BWD_WARMUP_MS = 300


def time_fwd_bwd(fn, xs, graph=False):
    """Median ms of one forward+backward; `graph`: replayed from a CUDA graph, the GPU's time without the host's."""
    do = torch.randn_like(fn(*xs)[0])

    def step(fresh_grads=False):
        if fresh_grads:  # the capture allocates them, and replays overwrite them instead of adding a kernel per input
            for x in xs:
                x.grad = None
        fn(*xs)[0].backward(do)

    if graph:
        return replayed_ms(lambda: step(fresh_grads=True), f"fwd+bwd of {getattr(fn, '__name__', fn)}")
    return do_bench(step, warmup=FWD_BWD_WARMUP_MS, rep=100, grad_to_none=xs, return_mode="median")


def replayed_ms(step, label):
    """Median ms of `step` replayed from a CUDA graph, or None where it cannot be captured. Warm-up steps on a side
    stream first (kernels compiled and tuned, lazy state made), so the capture records launches, nothing more."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    except Exception as e:  # noqa: BLE001 - any capture failure only empties this cell
        print(f"{label} not capturable: {type(e).__name__}: {e}", flush=True)
        return None
    return do_bench(graph.replay, warmup=25, rep=100, return_mode="median")


def peak_mib(fn, xs):
    """Peak memory of one forward+backward above what the inputs already hold."""
    do = torch.randn_like(fn(*xs)[0])
    for x in xs:
        x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(*xs)[0].backward(do)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def accuracy(B, T, H, D, R):
    """Largest relative error ‖x − ref‖/‖ref‖ over o, dq, dk, dv, dbeta (bf16 vs float64 reference)."""
    xs = inputs(B, T, H, D, R)
    do = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    o, _ = delta_rule(*xs)
    o.backward(do)
    got = [o] + [x.grad for x in xs]
    ref_in = [x.detach().double().requires_grad_() for x in xs]
    o64, _ = reference_chunked(*ref_in, D**-0.5)
    o64.backward(do.double())
    want = [o64] + [x.grad for x in ref_in]
    errs = [((g.double() - w).norm() / w.norm()).item() for g, w in zip(got, want)]
    finite = all(torch.isfinite(g).all().item() for g in got)
    return max(errs), finite


def decode_step(fn, B, H, D):
    """(eager µs, CUDA-graph µs) of one decoding step (µs: three decimals of ms would round them away).

    The eager call is bound by its host work (Python, argument handling, the Triton launch), so it ranks
    implementations by host overhead and moves with the machine; replaying the step captured in a CUDA graph, as a
    decoding loop under CUDA graphs runs it, times the GPU work alone. The graph column reads None where the step
    cannot be captured."""
    q, k, v, beta = (x.detach()[:, :1].contiguous() for x in inputs(B, 1, H, D, 1, layout="fla"))
    s0 = torch.randn(B, H, D, D, device="cuda", dtype=torch.float32)

    def step():
        return fn(q, k, v, beta, initial_state=s0, output_final_state=True)

    with torch.no_grad():
        eager = do_bench(step, warmup=25, rep=100, return_mode="median")
        replayed = replayed_ms(step, f"decode step of {getattr(fn, '__name__', fn)}")
    return 1000 * eager, None if replayed is None else 1000 * replayed


def ours(q, k, v, beta):
    return delta_rule(q, k, v, beta)


def ours_scan(scan):
    """Our chunked path with the parallel scan forced on or off."""
    return lambda q, k, v, beta: chunk_delta_rule(q, k, v, beta, scan=scan)


def ours_decode(q, k, v, beta, **kw):
    return delta_rule(q, k, v, beta, **kw)


def fla_product2(q, k, v, beta):
    return fla_product(q, k, v, None, beta, num_householder=2)


def profile(fn, xs, label):
    """Print the GPU time of each kernel in one forward+backward (where the time goes)."""
    do = torch.randn_like(fn(*xs)[0])
    fn(*xs)[0].backward(do)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn(*xs)[0].backward(do)
        torch.cuda.synchronize()
    print(f"-- {label}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=40))


def solver_comparison(chunks=4096, rows=64, dim=128):
    """PyTorch UT-transform solvers on `chunks` fp32 chunks: triangular solve, the signature-
    inspired diagonal sweeps, and the doubling product the Triton kernel uses. Returns markdown."""
    k = F.normalize(torch.randn(chunks, rows, dim, device="cuda"), dim=-1)
    beta = torch.rand(chunks, rows, device="cuda").sigmoid()
    strict, _ = chunk_masks(rows, 1, "cuda")
    eye = torch.eye(rows, device="cuda")

    def solve():
        a = beta[..., None] * (k @ k.transpose(-1, -2)) * strict
        return torch.linalg.solve_triangular(eye + a, beta[..., None] * k, upper=False, unitriangular=True)

    def doubling():
        a = beta[..., None] * (k @ k.transpose(-1, -2)) * strict
        t, p = eye - a, a
        for _ in range(rows.bit_length() - 2):
            p = p @ p
            t = t + t @ p
        return t @ (beta[..., None] * k)

    def signature():
        return ut_transform_signature(k, beta, 1)[0]

    ref = solve()
    lines = ["| solver | ms | max abs diff to solve |", "|---|---|---|"]
    for name, fn in (("triangular solve", solve), ("signature sweeps", signature), ("doubling product", doubling)):
        t = do_bench(fn, warmup=5, rep=30, return_mode="median")
        lines.append(f"| {name} | {t:.3f} | {(fn() - ref).abs().max().item():.1e} |")
    return (f"\nUT transform in PyTorch, {chunks} chunks of {rows}×{dim}, fp32 (tf32 products):\n\n"
            + "\n".join(lines) + "\n")


def fmt(x):
    return "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", type=shape_indices, default=list(range(len(SHAPES))))
    ap.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    ap.add_argument("--profile", action="store_true", help="print per-kernel GPU times of one fwd+bwd")
    args = ap.parse_args(argv)
    rows = []
    for i in args.shapes:
        B, T, H, D = SHAPES[i]
        r = {"shape": f"{B}, {T}, {H}, {D}"}
        x1 = inputs(B, T, H, D, 1, layout="fla")  # R = 1 without the rank axis: fla's layout too
        r["ours fwd"] = time_fwd(ours, x1)
        r["ours fwd+bwd"] = time_fwd_bwd(ours, x1)
        r["ours fwd+bwd graph"] = time_fwd_bwd(ours, x1, graph=True)
        r["ours mem MiB"] = peak_mib(ours, x1)
        for scan in (False, True):
            r[f"ours fwd+bwd scan={'on' if scan else 'off'}"] = time_fwd_bwd(ours_scan(scan), x1)
        x2 = inputs(B, T, H, D, 2)
        r["ours R=2 fwd+bwd"] = time_fwd_bwd(ours, x2)
        # R = 2's chain over chunks is twice R = 1's (half the tokens a chunk): whether the scan's threshold, timed at
        # R = 1, should move with the rank
        r["ours R=2 fwd+bwd scan=on"] = time_fwd_bwd(ours_scan(True), x2)
        r["ours decode µs"], r["ours decode graph µs"] = decode_step(ours_decode, B, H, D)
        err, finite = accuracy(B, T, H, D, 1)
        r["ours max rel err R=1"] = f"{err:.1e}" + ("" if finite else " NaN/Inf")
        err2, finite2 = accuracy(B, T, H, D, 2)
        r["ours max rel err R=2"] = f"{err2:.1e}" + ("" if finite2 else " NaN/Inf")
        if fla is not None:
            r["fla fwd"] = time_fwd(fla_chunk, x1)
            r["fla fwd+bwd"] = time_fwd_bwd(fla_chunk, x1)
            r["fla fwd+bwd graph"] = time_fwd_bwd(fla_chunk, x1, graph=True)
            r["fla mem MiB"] = peak_mib(fla_chunk, x1)
            f2 = inputs(B, T, H, D, 2, layout="fla")
            r["fla R=2 fwd+bwd"] = time_fwd_bwd(fla_product2, f2)
            r["fla decode µs"], r["fla decode graph µs"] = decode_step(fla_recurrent, B, H, D)
            r["speedup fwd+bwd R=1"] = r["fla fwd+bwd"] / r["ours fwd+bwd"]
            if r["ours fwd+bwd graph"] and r["fla fwd+bwd graph"]:
                r["speedup fwd+bwd R=1 graph"] = r["fla fwd+bwd graph"] / r["ours fwd+bwd graph"]
            r["speedup fwd+bwd R=2"] = r["fla R=2 fwd+bwd"] / r["ours R=2 fwd+bwd"]
            if r["ours decode graph µs"] and r["fla decode graph µs"]:
                r["speedup decode graph"] = r["fla decode graph µs"] / r["ours decode graph µs"]
        rows.append(r)
        print(r, flush=True)
        write_results(rows, args.out)
        if args.profile:
            profile(ours, x1, f"ours R=1 {r['shape']}")
            if fla is not None:
                profile(fla_chunk, x1, f"fla R=1 {r['shape']}")
    write_results(rows, args.out, solver_comparison())
    print(Path(args.out).read_text())


def write_results(rows, path, solvers=""):
    """Markdown table of the rows so far, with device and versions (rewritten after every shape,
    so a run cut short still leaves its finished shapes)."""
    cols = list(dict.fromkeys(c for r in rows for c in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    versions = (f"torch {torch.__version__}, triton {triton.__version__}, "
                f"flash-linear-attention {getattr(fla, '__version__', 'not installed')}, "
                f"python {platform.python_version()}")
    text = (f"# delta_rule benchmark\n\nDevice: {torch.cuda.get_device_name()}. {versions}. bf16 inputs, times in ms "
            "(triton.testing.do_bench medians; decode steps in µs), memory = peak MiB of one forward+backward above "
            "the inputs, error = max relative error of o, dq, dk, dv, dbeta vs a float64 reference.\n\n"
            + "\n".join(lines) + "\n")
    Path(path).write_text(text + solvers)


if __name__ == "__main__":
    main()
