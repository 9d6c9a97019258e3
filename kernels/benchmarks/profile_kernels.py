"""One eager delta_rule fwd+bwd at an anchor shape between cudaProfilerStart and cudaProfilerStop, for Nsight Compute
to read each kernel's hardware counters (bandwidth, occupancy, what the warps wait on); the warm-up calls before it,
which compile and tune, are left out.

    ncu --profile-from-start off --clock-control none --section SpeedOfLight --section Occupancy \\
        python kernels/benchmarks/profile_kernels.py --shapes 4 [--rank 1]

Eager calls at rank 1 run each kernel once over all chunks (no windows: chunk.Plan.windows), so each kernel's
counters are those of one launch.
"""

import argparse

import torch

from bench_delta_rule import SHAPES, inputs, ours, shape_indices
from flowhn_kernels.delta_rule import MAX_RANK


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", type=shape_indices, default=[4], help="anchor shape indices (bench_delta_rule.SHAPES)")
    ap.add_argument("--rank", type=int, choices=range(1, MAX_RANK + 1), default=1)
    args = ap.parse_args(argv)
    for index in args.shapes:
        B, T, H, D = SHAPES[index]
        xs = inputs(B, T, H, D, args.rank, layout="fla" if args.rank == 1 else "ours")
        do = torch.randn_like(ours(*xs)[0])
        for step in range(4):
            for x in xs:  # as the benchmark's calls: no gradient to add to
                x.grad = None
            if step == 3:
                torch.cuda.synchronize()
                torch.cuda.cudart().cudaProfilerStart()
            ours(*xs)[0].backward(do)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        print(f"profiled fwd+bwd at B, T, H, D = {B}, {T}, {H}, {D}, R = {args.rank}", flush=True)


if __name__ == "__main__":
    main()
