"""One chunk of the LM head's weight gradient, summed across chunks in float32: each way of writing it, timed.

LinearCrossEntropy adds gradᵀ h ([vocab × rows] @ [rows × hidden], 16-bit inputs) into a float32 accumulator once
per chunk of rows. This prints the median µs (triton.testing.do_bench) of that one step written as a 16-bit product
and a float32 add (what main does), as cuBLAS products with `out_dtype=float32`, with and without `out=`, and the
bare 16-bit product as the anchor. CUDA, torch >= 2.8. The in-place addmm won here (session 37) and lost in the
whole training step in both forms tried (session 38, training/benchmarks/NOTES.md): main keeps the product and add.

    python -m training.benchmarks.head_weight_gradient [--rows 2048] [--vocab 49152] [--hidden 576]
"""

import argparse

import torch
from triton.testing import do_bench


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    args = p.parse_args(argv)
    grad = torch.randn(args.rows, args.vocab, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(args.rows, args.hidden, device="cuda", dtype=torch.bfloat16)
    acc = torch.zeros(args.vocab, args.hidden, device="cuda")
    f32 = torch.float32
    ways = {
        "mm to bf16 (anchor)": lambda: torch.mm(grad.t(), h),
        "mm to bf16, then the float32 add (main)": lambda: acc.add_(torch.mm(grad.t(), h)),
        "mm, out_dtype=float32": lambda: torch.mm(grad.t(), h, out_dtype=f32),
        "addmm(acc, out_dtype=float32): a new tensor": lambda: torch.addmm(acc, grad.t(), h, out_dtype=f32),
        "addmm(acc, out_dtype=float32, out=acc): in place": lambda: torch.addmm(acc, grad.t(), h, out_dtype=f32,
                                                                                 out=acc),
    }
    print(f"gradᵀ h at [{args.vocab} x {args.rows}] @ [{args.rows} x {args.hidden}], bf16 inputs, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n\n| way | µs |\n|---|---|")
    for name, fn in ways.items():
        print(f"| {name} | {1e3 * do_bench(fn, warmup=10, rep=100, return_mode='median'):.1f} |", flush=True)


if __name__ == "__main__":
    main()
