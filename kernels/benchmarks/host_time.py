"""Host time of eager delta_rule calls with every Triton launch stubbed out: the Python and dispatch work around the
kernels, measured on any machine.

On a GPU a call whose host time exceeds its kernels' GPU time is host-bound and measures as its host time (the H200
run of 2026-12-02 had (8, 2048, 12, 64) at 1.45-1.61 ms fwd+bwd against ~0.87 ms of kernels, and a decode step at
0.10-0.20 ms). The shapes here are small; the tensors stay on the CPU, the kernels' host code runs as on the GPU
(TRITON_INTERPRET=1 routes delta_rule to them) and each launch returns at once.

    python kernels/benchmarks/host_time.py [--iters 300]

On a GPU, `--gpu-shapes 4,0` (anchor shapes) also times real eager fwd+bwd calls: the host's time to issue a few of
them back to back against the time until the GPU has run them, each with the windows of chunk.Plan.windows as they
are and turned off. Host below wall: the call is GPU-bound, with that much host time to spare.
"""

import argparse
import os
import time

import torch

from flowhn_kernels import delta_rule
from flowhn_kernels.utils import kernel

from bench_delta_rule import inputs

SHAPE = (2, 128, 2, 64)  # B, T, H, D: the host work does not depend on them


def microseconds(step, iters):
    for _ in range(max(3, iters // 10)):
        step()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - start) / iters * 1e6


def measure(iters):
    """{case: µs per call}: chunked fwd+bwd at R = 1 and 2, chunked forward without gradients, one decode step."""
    results = {}
    for R in (1, 2):
        xs = inputs(*SHAPE, R, layout="fla" if R == 1 else "ours", dev="cpu")
        do = torch.randn_like(xs[0])

        def fwd_bwd():
            delta_rule(*xs)[0].backward(do)
            for x in xs:
                x.grad = None

        results[f"chunked fwd+bwd, R = {R}"] = microseconds(fwd_bwd, iters)
    with torch.no_grad():
        xs = inputs(*SHAPE, 1, layout="fla", dev="cpu")
        results["chunked forward, no grad"] = microseconds(lambda: delta_rule(*xs), iters)
        step = [x[:, :1] for x in xs]
        state = torch.randn(SHAPE[0], SHAPE[2], SHAPE[3], SHAPE[3])
        results["decode step"] = microseconds(lambda: delta_rule(*step, initial_state=state, output_final_state=True),
                                              iters)  # fmt: skip
    return results


def gpu_host_and_wall(shape, calls=10):
    """(host µs, wall µs) of one eager fwd+bwd at shape (B, T, H, D) on the GPU: `calls` calls issued back to back
    after a synchronize (few enough that the launch queue never fills, so issuing never waits on the GPU), then the
    time until the GPU is done."""
    xs = inputs(*shape, 1, layout="fla")
    do = torch.randn_like(xs[2])

    def fwd_bwd():
        delta_rule(*xs)[0].backward(do)
        for x in xs:
            x.grad = None

    for _ in range(3):
        fwd_bwd()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fwd_bwd()
    issued = time.perf_counter()
    torch.cuda.synchronize()
    return 1e6 * (issued - start) / calls, 1e6 * (time.perf_counter() - start) / calls


def gpu_table(shape_indices):
    from bench_delta_rule import SHAPES
    from flowhn_kernels import chunk

    print("\n| shape | windows | host µs | wall µs |\n|---|---|---|---|")
    for i in shape_indices:
        windows = chunk.OVERLAP_WINDOWS
        for count in (windows, 1):
            chunk.OVERLAP_WINDOWS = count
            try:
                used = len(chunk.make_plan(SHAPES[i][0], SHAPES[i][1], 1, torch.device("cuda")).windows(
                    SHAPES[i][2], SHAPES[i][3], SHAPES[i][3]))
                host, wall = gpu_host_and_wall(SHAPES[i])
            finally:
                chunk.OVERLAP_WINDOWS = windows
            print(f"| {SHAPES[i]} | {used} | {host:.0f} | {wall:.0f} |", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--gpu-shapes", default="", help="anchor shape indices: real calls on the GPU as well")
    args = ap.parse_args(argv)
    saved_env, saved_launch = os.environ.get("TRITON_INTERPRET"), kernel.__getitem__
    os.environ["TRITON_INTERPRET"] = "1"
    kernel.__getitem__ = lambda self, grid: (lambda *a, **kw: None)
    try:
        results = measure(args.iters)
    finally:
        kernel.__getitem__ = saved_launch
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = saved_env
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; host µs per call, launches stubbed\n")
    print("| call | host µs |\n|---|---|")
    for case, us in results.items():
        print(f"| {case} | {us:.0f} |")
    if args.gpu_shapes:
        gpu_table([int(i) for i in args.gpu_shapes.split(",")])
    return results


if __name__ == "__main__":
    main()
