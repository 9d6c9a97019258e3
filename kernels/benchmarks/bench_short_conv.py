"""Benchmark short_conv_silu, the DeltaNet branch's short causal conv + SiLU, against its PyTorch reference on a GPU.

Times (triton.testing.do_bench medians, µs) the forward and the forward+backward of (a) short_conv_silu's Triton
kernels, (b) the reference under torch.compile (what the model ran before), (c) the reference eager, at the model's
shapes in bf16 (the weight fp32, as under autocast), without and with packed documents, without and with q and the keys
scaled to unit length (`unit`: the model's training path, where the kernels fuse it); beside them the memory floor
(every byte read and written once at 4.3 TB/s, an H200's HBM) and the kernels' largest error against the reference
evaluated in float32 (max |Δ| / max |reference|, for y, grad x and grad weight). Prints a markdown table.

    python kernels/benchmarks/bench_short_conv.py [--smoke]

--smoke runs tiny shapes on the CPU instead: the kernels in the Triton interpreter, torch.compile with its eager
backend, one timed call each (a test runs it).
"""

import argparse
import functools
import os
import time

import torch
from triton.testing import do_bench

from flowhn_kernels.short_conv import short_conv_silu, short_conv_silu_reference

# (B, n, C, W): the 135M preset's DeltaNet channels, and wider; the model's unit groups there (q and the keys, K = 64)
SHAPES = {(16, 973, 1728, 4): (1152, 64), (8, 2048, 3072, 4): (2048, 64)}
SMOKE_SHAPES = {(1, 12, 16, 4): (8, 4)}
HBM_BYTES_PER_S = 4.3e12
MEAN_DOCUMENT = 256  # tokens; --smoke: 8


def cpu_bench(fn, grad_to_none=None):
    """do_bench's answer for --smoke: one call's time (ms)."""
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def inputs(B, n, C, W, packed, device, mean_document):
    """bf16 x, fp32 weight and, when packed, documents starting at random tokens."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, n, C, generator=g).to(device, torch.bfloat16).requires_grad_()
    weight = (torch.randn(C, 1, W, generator=g) / W**0.5).to(device).requires_grad_()
    documents = (torch.rand(B, n, generator=g) < 1 / mean_document).cumsum(1).to(device) if packed else None
    return x, weight, documents


def floor_us(x, weight, documents, backward):
    """Every tensor read or written once: x and y (and weight, documents); the backward adds x, gy, gx and grad w."""
    act, w = x.numel() * x.element_size(), weight.numel() * weight.element_size()
    docs = 0 if documents is None else documents.numel() * documents.element_size()
    fwd = 2 * act + w + docs
    return 1e6 * (fwd + (3 * act + 2 * w + docs if backward else 0)) / HBM_BYTES_PER_S


def errors(x, weight, documents, unit, gy):
    """max |Δ| / max |reference| of y, grad x and grad weight, the reference run in float32."""
    results = []
    for fn, dtype in ((short_conv_silu, None), (short_conv_silu_reference, torch.float32)):
        xs = x.detach().to(dtype or x.dtype).requires_grad_()
        ws = weight.detach().to(dtype or weight.dtype).requires_grad_()
        y = fn(xs, ws, documents, unit)
        y.backward(gy.to(y.dtype))
        results.append((y, xs.grad, ws.grad))
    return [((a.float() - b).abs().max() / b.abs().max()).item() for a, b in zip(*results)]


def row(shape, packed, unit, impls, bench, device, mean_document):
    x, weight, documents = inputs(*shape, packed, device, mean_document)
    gy = torch.randn_like(x)
    fwd, fwd_bwd = {}, {}
    for name, fn in impls.items():
        fn(x, weight, documents, unit).backward(gy)  # torch.compile compiles here, for gradients and without
        with torch.no_grad():
            fn(x, weight, documents, unit)
            fwd[name] = 1e3 * bench(lambda: fn(x, weight, documents, unit))
        fwd_bwd[name] = 1e3 * bench(lambda: fn(x, weight, documents, unit).backward(gy), grad_to_none=[x, weight])
    err = errors(x, weight, documents, unit, gy)
    times = [floor_us(x, weight, documents, False), *fwd.values(), floor_us(x, weight, documents, True),
             *fwd_bwd.values()]  # fmt: skip
    return (f"| {' | '.join(map(str, shape))} | {'yes' if packed else 'no'} | {unit[0] if unit else '-'} | "
            + " | ".join(f"{t:.1f}" for t in times) + f" | {' / '.join(f'{e:.1e}' for e in err)} |")  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, kernels in the interpreter")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # read at each launch
        device, shapes, bench, backend, mean_document = "cpu", SMOKE_SHAPES, cpu_bench, "eager", 8
    elif torch.cuda.is_available():
        device, shapes, backend, mean_document = "cuda", SHAPES, "inductor", MEAN_DOCUMENT
        bench = functools.partial(do_bench, warmup=25, rep=100, return_mode="median")
    else:
        raise SystemExit("needs a CUDA GPU (or --smoke)")
    impls = {"triton": short_conv_silu,
             "compiled": torch.compile(short_conv_silu_reference, dynamic=False, backend=backend),
             "eager": short_conv_silu_reference}  # fmt: skip
    print(f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU (SMOKE: interpreter)'}, x bf16, weight fp32, "
          f"µs; documents of {mean_document} tokens on average\n")  # fmt: skip
    print("| B | n | C | W | documents | unit | fwd floor | fwd triton | fwd compiled | fwd eager | "
          "f+b floor | f+b triton | f+b compiled | f+b eager | max rel err y / gx / gw |")  # fmt: skip
    print("|" + "---|" * 15)
    lines = []
    for shape, groups in shapes.items():
        for packed in (False, True):
            for unit in (None, groups):
                lines.append(row(shape, packed, unit, impls, bench, device, mean_document))
                print(lines[-1], flush=True)
    return lines


if __name__ == "__main__":
    main()
