"""Host time of eager delta_rule calls with the GPU launches stubbed out: the Python and dispatch work around the
kernels, measured on any machine.

On a GPU a call whose host time exceeds its kernels' GPU time is host-bound and measures as its host time (the H200
run of 2026-12-02 had (8, 2048, 12, 64) at 1.45-1.61 ms fwd+bwd against ~0.87 ms of kernels, and a decode step at
0.10-0.20 ms). The shapes here are small and the tensors stay on the CPU; two columns, each launch stubbed at a
different depth:

- "ours": at our launch wrapper (utils.kernel), with TRITON_INTERPRET=1 routing delta_rule to the kernels' host code:
  the Python and torch work of our own code.
- "with Triton's dispatch": the kernels compiled for Hopper (sm_90a, as resources.py does; Triton caches them on disk)
  and launched through Triton's own dispatch (argument binding, specialisation, its kernel cache), under a stand-in
  driver whose launch does nothing: the host time of an eager call on a GPU, less the driver's launch (Triton's C
  launcher: reading the arguments, cuLaunchKernelEx), CUDA's allocator and the windows' stream switches.

The windows row forces chunk.Plan.windows' overlapped windows at a small shape: what they add to a call's host time.
The TMA row forces the passes' TMA descriptors (chunk._uses_tma takes them only at 64 chunks a sequence or more): what
building and dispatching them adds (their encoding at each launch, in Triton's C launcher, is not in it).

    python kernels/benchmarks/host_time.py [--iters 300]

On a GPU, `--gpu-shapes 4,0` (anchor shapes) also times real eager fwd+bwd calls: the host's time to issue a few of
them back to back against the time until the GPU has run them, and do_bench's median of one call, each with the
windows of chunk.Plan.windows (here also at rank 1, which eager calls otherwise skip) and with one window, or with
each count of `--gpu-windows 1,2,3,4`. Host below wall: the call is GPU-bound, with that much host time to spare.
`--gpu-profile 0` says where a real call's host time goes: Python's profile of it, function by function, and its host
time with the backward on autograd's device thread and on the calling thread (the stubs above leave out the real
launches, CUDA's allocator and that thread, which the device's host spent ~700 µs a call on in session 21,
kernels/benchmarks/NOTES.md v19; the thread's hand-off alone ~400 µs in session 22, v20).
"""

import argparse
import contextlib
import cProfile
import functools
import os
import pstats
import sys
import time
from unittest import mock

import torch
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import CompiledKernel
from triton.runtime.driver import driver

from flowhn_kernels import chunk, delta_rule
from flowhn_kernels.utils import COMPILE_OPTIONS, kernel

from bench_args import numbers
from bench_delta_rule import SHAPES, inputs, shape_indices, time_fwd_bwd

SHAPE = (2, 128, 2, 64)  # B, T, H, D: the host work does not depend on them
WINDOWS_SHAPE = (1, 512, 2, 64)  # one sequence of 8 chunks: 4 windows each way
LEVELS = {"ours": "ours", "triton": "with Triton's dispatch"}


def microseconds(step, iters, repeats=5):
    """The fastest of `repeats` means over iters / repeats calls: the host's time with the least interference from
    other work on the machine."""
    for _ in range(max(3, iters // 10)):
        step()
    per_repeat = max(1, iters // repeats)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(per_repeat):
            step()
        best = min(best, (time.perf_counter() - start) / per_repeat)
    return best * 1e6


@contextlib.contextmanager
def chunk_settings(**values):
    """flowhn_kernels.chunk's module-level settings at `values` inside the block, put back after it."""
    saved = {name: getattr(chunk, name) for name in values}
    for name, value in values.items():
        setattr(chunk, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(chunk, name, value)


def forced_windows():
    """chunk.Plan.windows' windows at any sequence of several chunks and any rank, whatever the device."""
    return chunk_settings(OVERLAP_MIN_CHUNKS=1, sm_count=lambda device: 1 << 20, OVERLAP_EAGER_MIN_RANK=1)


def forced_tma():
    """The passes' tiles by TMA (chunk._uses_tma) at any sequence length: what their descriptors add to a call."""
    return chunk_settings(TMA_MIN_CHUNKS=1)


def measure(iters, launches):
    """{case: µs per call}: chunked fwd+bwd at R = 1 and 2 and with forced windows, chunked forward without gradients,
    one decode step; and {case: the kernel launches of one call} (`launches`, the stub's Launches, counts them)."""
    cases = {}
    for R in (1, 2):
        cases[f"chunked fwd+bwd, R = {R}"] = (fwd_bwd(SHAPE, R), contextlib.nullcontext)
    cases["chunked fwd+bwd, R = 1, passes by TMA"] = (fwd_bwd(SHAPE, 1), forced_tma)
    cases[f"chunked fwd+bwd, R = 1, {chunk.OVERLAP_WINDOWS} windows"] = (fwd_bwd(WINDOWS_SHAPE, 1), forced_windows)
    xs = [x.detach() for x in inputs(*SHAPE, 1, layout="fla", dev="cpu")]
    step = [x[:, :1] for x in xs]
    state = torch.randn(SHAPE[0], SHAPE[2], SHAPE[3], SHAPE[3])
    cases["chunked forward, no grad"] = (lambda: delta_rule(*xs), torch.no_grad)
    cases["decode step"] = (lambda: delta_rule(*step, initial_state=state, output_final_state=True), torch.no_grad)
    results, counts = {}, {}
    for case, (call, context) in cases.items():
        with context():
            before = launches.count
            call()
            counts[case] = launches.count - before
            results[case] = microseconds(call, iters)
    return results, counts


def fwd_bwd(shape, R, dev="cpu"):
    """One eager fwd+bwd of delta_rule at shape (B, T, H, D) and rank R, as a call without arguments."""
    xs = inputs(*shape, R, layout="fla" if R == 1 else "ours", dev=dev)
    do = torch.randn_like(xs[0])

    def call():
        delta_rule(*xs)[0].backward(do)
        for x in xs:
            x.grad = None

    return call


class _HopperWithoutGpu:
    """A stand-in for Triton's CUDA driver: device 0, stream 0, an sm_90 target, so kernels compile and dispatch."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


class Launches:
    """The launches a stub receives: how many, and with `record` each one's kernel and arguments (at the "triton" level
    the compiled variant's name and hash, and the runner's arguments: the grid, the stream, the compiled function,
    ..., then every kernel argument)."""

    def __init__(self, record=False):
        self.count, self.record, self.seen = 0, record, []

    def __call__(self, name, *args, **kwargs):
        self.count += 1
        if self.record:
            self.seen.append((name, args))


@contextlib.contextmanager
def stubbed_launches(level, launches):
    """Every launch of delta_rule's kernels stubbed out at `level` (LEVELS) and handed to `launches` (Launches); all
    put back afterwards. The "triton" level dispatches through kernels of its own, so no stubbed kernel outlives it."""
    with contextlib.ExitStack() as patches:

        def patch(target, name, value):
            patches.enter_context(mock.patch.object(target, name, value))

        patches.enter_context(mock.patch.dict(os.environ))
        if level == "ours":
            os.environ["TRITON_INTERPRET"] = "1"
            patch(kernel, "__getitem__", lambda self, grid: functools.partial(launches, self.fn.__name__))
        else:
            forms = {}

            def dispatch(self, grid):
                if self not in forms:
                    forms[self] = self.jit()
                return functools.partial(forms[self][grid], **COMPILE_OPTIONS)  # as kernel.__getitem__ launches

            def stub_handles(compiled):
                compiled.function = 0
                compiled._run = functools.partial(launches, f"{compiled.name} {compiled.hash[:12]}")  # variant by hash

            os.environ.pop("TRITON_INTERPRET", None)
            patch(driver, "_active", _HopperWithoutGpu())  # put back as it was: reset_active would look for a GPU
            patch(CompiledKernel, "_init_handles", stub_handles)
            patch(kernel, "__getitem__", dispatch)
            patch(sys.modules[delta_rule.__module__], "interpreting", lambda: True)  # CPU tensors take the kernels
        yield


def gpu_host_and_wall(call, calls=10):
    """(host µs, wall µs) of one `call` on the GPU (fwd_bwd's): `calls` calls issued back to back after a synchronize
    (few enough that the launch queue never fills, so issuing never waits on the GPU), then the time until the GPU is
    done."""
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    issued = time.perf_counter()
    torch.cuda.synchronize()
    return 1e6 * (issued - start) / calls, 1e6 * (time.perf_counter() - start) / calls


def gpu_table(indices, window_counts=None):
    """Real eager fwd+bwd calls at rank 1 with each count of windows (default: chunk.OVERLAP_WINDOWS, and one): the
    host's and the wall's µs a call, and the issue's measure, do_bench's median ms of one call (bench_delta_rule's
    eager column), which reads the host's time where that exceeds the GPU's."""
    print("\n| shape | windows | host µs | wall µs | do_bench ms |\n|---|---|---|---|---|")
    for i in indices:
        B, T, H, D = SHAPES[i]
        call, xs = fwd_bwd(SHAPES[i], 1, dev="cuda"), inputs(B, T, H, D, 1, layout="fla")  # windows chosen per call
        for count in window_counts or (chunk.OVERLAP_WINDOWS, 1):
            with chunk_settings(OVERLAP_WINDOWS=count, OVERLAP_EAGER_MIN_RANK=1):
                used = len(chunk.make_plan(B, T, 1, torch.device("cuda")).windows(H, D, D))
                host, wall = gpu_host_and_wall(call)
                ms = time_fwd_bwd(delta_rule, xs)
            print(f"| {SHAPES[i]} | {used} | {host:.0f} | {wall:.0f} | {ms:.3f} |", flush=True)


def gpu_host_profile(shape, calls=20, top=25):
    """Where an eager fwd+bwd's host time goes on the GPU, at shape (B, T, H, D): its host µs with the backward on
    autograd's device thread (the default for CUDA tensors) and on the calling thread, then Python's profile of
    `calls` calls by each function's own time, and of our own functions by their time including what they call, the
    backward on the calling thread (cProfile sees that thread only).
    Each profiled call is followed by a synchronize, so the GPU never holds the host back inside one; the
    synchronize's own line is the GPU's time."""
    call = fwd_bwd(shape, 1, dev="cuda")
    host = {}
    for threads in (True, False):
        with torch.autograd.set_multithreading_enabled(threads):
            host[threads] = gpu_host_and_wall(call)[0]
    print(f"\n## {shape}: host µs of one eager fwd+bwd, backward on autograd's device thread {host[True]:.0f}, "
          f"on the calling thread {host[False]:.0f}\n", flush=True)
    profile = cProfile.Profile()
    with torch.autograd.set_multithreading_enabled(False):
        for _ in range(calls):
            profile.enable()
            call()
            torch.cuda.synchronize()
            profile.disable()
    stats = pstats.Stats(profile, stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(r"(flowhn_kernels|kernels)/\w+\.py", top)  # ours, with their callees


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--gpu-shapes", type=shape_indices, default=[],
                    help="anchor shape indices: real calls on the GPU as well")
    ap.add_argument("--gpu-windows", type=numbers("window counts, each ≥ 1", 1), default=[],
                    help="window counts of those calls, e.g. 1,2,3,4 (default: chunk.OVERLAP_WINDOWS and 1)")
    ap.add_argument("--gpu-profile", type=shape_indices, default=[],
                    help="anchor shape indices: Python's profile of real calls")
    args = ap.parse_args(argv)
    results = {}
    for level in LEVELS:
        launches = Launches()
        with stubbed_launches(level, launches):
            results[level], counts = measure(args.iters, launches)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; host µs per call, launches stubbed\n")
    print(f"| call | launches | {' | '.join(LEVELS.values())} |\n|---|---|{'---|' * len(LEVELS)}")
    for case, count in counts.items():
        print(f"| {case} | {count} | {' | '.join(f'{results[level][case]:.0f}' for level in LEVELS)} |")
    if args.gpu_shapes:
        gpu_table(args.gpu_shapes, args.gpu_windows)
    for i in args.gpu_profile:
        gpu_host_profile(SHAPES[i])
    return results


if __name__ == "__main__":
    main()
