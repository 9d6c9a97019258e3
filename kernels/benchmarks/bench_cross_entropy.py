"""Benchmark the LM head's softmax cross-entropy kernel against its PyTorch reference, eager and compiled.

One chunk of logits as LinearCrossEntropy hands it over (rows x vocabulary, bf16): the row losses and the gradient
softmax − onehot. Prints the median times (triton.testing.do_bench, ms), the memory floors (the gradient written once
and the logits read twice, or once where the second pass finds them in L2, over the copy rate measured in the same
run) and the kernel's error against float64; then the kernel at each launch setting of `--settings` (vocabulary
entries a load and warps: cross_entropy.LAUNCH), with its outputs' largest difference from
the committed launch's.

    python kernels/benchmarks/bench_cross_entropy.py [--rows 2048] [--vocab 49152] [--settings 2048x8,4096x16]
    python kernels/benchmarks/bench_cross_entropy.py --smoke      # CPU, the interpreter: tests the script
"""

import argparse
import os

import torch
from triton.testing import do_bench

from flowhn_kernels import cross_entropy, softmax_cross_entropy, softmax_cross_entropy_reference

from bench_args import settings

SETTINGS = "2048x8,4096x16,4096x32,8192x16,8192x32,16384x16,16384x32"


def copy_rate(device) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    x = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=10, rep=50, return_mode="median")
    return 2 * x.numel() / (ms * 1e-3)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--settings", type=settings("BLOCKxWARPS launches, each ≥ 1", 2, "x"), default=SETTINGS,
                   help="comma-separated BLOCKxWARPS launches to time")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU in Triton's interpreter")
    args = p.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        args.rows, args.vocab, args.settings = 4, 300, [(64, 1)]
    device = "cpu" if args.smoke else "cuda"
    torch.manual_seed(0)
    logits = (4 * torch.randn(args.rows, args.vocab, device=device)).to(torch.bfloat16)
    labels = torch.randint(0, args.vocab, (args.rows,), device=device)
    labels[::7] = -100
    grad, loss = softmax_cross_entropy(logits, labels)
    want_grad, want_loss = softmax_cross_entropy_reference(logits.double(), labels)
    error = ((grad.double() - want_grad).norm() / want_grad.norm()).item()
    rows = [("Triton kernel", lambda: softmax_cross_entropy(logits, labels))]
    if not args.smoke:
        compiled = torch.compile(softmax_cross_entropy_reference)
        rows += [("reference, torch.compile", lambda: compiled(logits, labels)),
                 ("reference, eager", lambda: softmax_cross_entropy_reference(logits, labels))]  # fmt: skip
    print(f"rows {args.rows}, vocabulary {args.vocab}, bf16 logits; gradient error vs float64 {error:.2e}, "
          f"loss error {((loss.double() - want_loss).abs().max()).item():.2e}\n")  # fmt: skip
    print("| what | ms |\n|---|---|")
    for name, fn in rows:
        ms = do_bench(fn, warmup=10, rep=50, return_mode="median") if not args.smoke else float("nan")
        print(f"| {name} | {ms:.3f} |")
    if not args.smoke:
        read_write = logits.numel() * logits.element_size() / copy_rate(device) * 1e3
        print(f"| floor: logits read twice, gradient written once | {3 * read_write:.3f} |")
        print(f"| floor: logits read once, gradient written once | {2 * read_write:.3f} |")
    committed = cross_entropy.LAUNCH
    print(f"\n| launch (block x warps; committed {'x'.join(str(int(v)) for v in committed)}) | ms | "
          f"max abs Δgrad | max abs Δloss |\n|---|---|---|---|")  # fmt: skip
    for setting in args.settings:
        cross_entropy.LAUNCH, name = cross_entropy.Launch(*setting), "x".join(map(str, setting))
        try:
            got_grad, got_loss = softmax_cross_entropy(logits, labels)
            ms = do_bench(lambda: softmax_cross_entropy(logits, labels), warmup=10, rep=50, return_mode="median") \
                if not args.smoke else float("nan")
            d_grad = (got_grad.float() - grad.float()).abs().max().item()
            print(f"| {name} | {ms:.3f} | {d_grad:.1e} | {(got_loss - loss).abs().max().item():.1e} |", flush=True)
        except Exception as failure:  # a setting that does not compile or launch is a row, not the end of the run
            print(f"| {name} | failed: {type(failure).__name__}: {str(failure)[:80]} | | |", flush=True)
        finally:
            cross_entropy.LAUNCH = committed
    return error


if __name__ == "__main__":
    main()
