"""Pick num_warps / num_stages (and a register cap, maxnreg) for each Triton kernel of flowhn_kernels.chunk on this GPU.

Greedy, one kernel at a time with the others at their current settings, judged by the
forward+backward time of delta_rule (bf16, R = 1) at an anchor shape of each key width, replayed from a CUDA graph:
launch settings change the GPU's time, and at D = 64 the eager call is host-bound (state_passes.py). A faster
setting counts only if the bf16 outputs and gradients at that shape, R = 1 and R = 2, stay within
MAX_ERROR of the float64 reference: Triton 3.6 miscompiles some of these kernels at some settings
(two stages at D = 128). Prints the chosen entries in the form of chunk.LAUNCH, to paste there
with the measured times. With --rank R > 1 it times and checks rank R and tunes chunk.LAUNCH_RANKS,
the settings that only that rank takes.

    python kernels/benchmarks/tune_launch.py [--shapes 0,1] [--kernels grad_wy,prep] [--max-minutes 4]
    python kernels/benchmarks/tune_launch.py --shapes 16x1000x9x64   # B x T x H x D: the 135M model's DeltaNet branch
    python kernels/benchmarks/tune_launch.py --shapes 1 --rank 3 --kernels state_bwd
    python kernels/benchmarks/tune_launch.py --shapes 4 --windows 1   # one long sequence as eager rank-1 calls run it

A graph capture at one long sequence runs the passes over chunk.OVERLAP_WINDOWS windows, with the per-chunk kernels
beside them (chunk.Plan.windows), which hides part of their time; eager calls at rank 1 take one window, and
`--windows 1` times that schedule.
"""

import argparse
import time

from flowhn_kernels import chunk
from flowhn_kernels.delta_rule import chunk_delta_rule

from bench_args import items, names
from bench_delta_rule import SHAPES, accuracy, inputs, time_fwd_bwd

KERNELS = ["prep", "state_fwd", "output", "state_bwd", "grad_state", "grad_wy", "combine", "state_fwd_aug",
           "state_bwd_aug"]
SCAN_ONLY = {"combine", "state_fwd_aug", "state_bwd_aug"}
# Triton's default (4 warps, 3 stages) is the baseline every candidate must beat by 2%
DEFAULT = dict(num_warps=4, num_stages=3)
CANDIDATES = [dict(num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2, 3) if (w, s) != (4, 3)]
# then the best of those with its registers capped: ptxas fits the kernel in fewer registers, spilling what does not
# fit, so that 3 or 4 blocks of 4 warps share an SM where 2 did (resources.py --maxnreg 168,128 shows the spills)
REGISTER_CAPS = (168, 128)
MAX_ERROR = 1e-2  # the bf16 bound; correct settings give 4e-3 to 6e-3 at the anchor shapes


def fwd_bwd_ms(xs):
    """Median ms of delta_rule's fwd+bwd replayed from a CUDA graph."""
    ms = time_fwd_bwd(chunk_delta_rule, xs, graph=True)
    if ms is None:
        raise RuntimeError("the fwd+bwd could not be captured in a CUDA graph")
    return ms


def shapes(text):
    """argparse type of --shapes: anchor shape indices or BxTxHxD shapes, comma-separated, in order."""
    try:
        parsed = [SHAPES[int(s)] if s.isdigit() else tuple(int(v) for v in s.split("x")) for s in items(text)]
    except (ValueError, IndexError):
        parsed = []
    if not parsed or any(len(shape) != 4 or min(shape) < 1 for shape in parsed):
        raise argparse.ArgumentTypeError(f"expected comma-separated indices 0-{len(SHAPES) - 1} into {SHAPES} or "
                                         f"BxTxHxD shapes, got {text!r}")
    return parsed


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", type=shapes, default="0,1", help="anchor shape indices, or BxTxHxD")
    ap.add_argument("--kernels", type=names("kernels", KERNELS), default=",".join(KERNELS),
                    help="comma-separated subset, tuned in this order")
    ap.add_argument("--max-minutes", type=float, default=4.0)
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--windows", type=int, default=chunk.OVERLAP_WINDOWS,
                    help="windows of the passes at one long sequence (chunk.OVERLAP_WINDOWS)")
    args = ap.parse_args(argv)
    if args.windows < 1:
        ap.error(f"--windows must be at least 1, got {args.windows}")
    chunk.OVERLAP_WINDOWS = args.windows
    ranks = (1, 2) if args.rank == 1 else (args.rank,)  # checked for accuracy
    table = chunk.LAUNCH if args.rank == 1 else chunk.LAUNCH_RANKS
    stop = time.time() + 60 * args.max_minutes
    for shape in args.shapes:
        B, T, H, D = shape
        width = max(chunk.pow2(D), 64)
        xs = inputs(B, T, H, D, args.rank, layout="fla" if args.rank == 1 else "ours")
        scan = chunk.make_plan(B, T, args.rank, xs[0].device).use_scan(H, D, D, None)  # as delta_rule will choose
        best = fwd_bwd_ms(xs)
        print(f"shape {shape}: {best:.3f} ms with the current settings", flush=True)
        for name in args.kernels:
            if name in SCAN_ONLY and not scan:
                continue
            key = (name, width) if args.rank == 1 else (name, width, args.rank)
            current = table.get(key, chunk.LAUNCH.get((name, width)))

            def settings():
                yield from CANDIDATES
                for cap in REGISTER_CAPS:  # on the best setting so far, `current` as it stands then
                    yield dict(current or DEFAULT, maxnreg=cap)

            for cand in settings():
                if time.time() > stop:
                    print("time budget spent", flush=True)
                    return
                table[key] = cand
                try:
                    ms = fwd_bwd_ms(xs)
                except Exception as e:  # out of shared memory or registers: not a candidate
                    print(f"  {key} {cand}: {type(e).__name__}", flush=True)
                    continue
                note = ""
                if ms < best * 0.98:
                    errors = [accuracy(B, T, H, D, R) for R in ranks]
                    if all(finite and err <= MAX_ERROR for err, finite in errors):
                        best, current = ms, cand
                    else:
                        note = "  rejected: wrong results, max error " + ", ".join(f"R={R} {e:.1e}" for R, (e, _) in
                                                                                zip(ranks, errors))
                print(f"  {key} {cand}: {ms:.3f} ms{note}", flush=True)
            if current is None or (args.rank > 1 and current == chunk.LAUNCH.get((name, width))):
                current = None  # at a rank, an entry that repeats LAUNCH's says nothing
                table.pop(key, None)
            else:
                table[key] = current
            print(f"{'LAUNCH' if args.rank == 1 else 'LAUNCH_RANKS'}[{key!r}] = {current}  # fwd+bwd {best:.3f} ms",
                  flush=True)


if __name__ == "__main__":
    main()
