"""Launch settings of short_conv's backward pass with the weight gradient, timed on a GPU against the committed one.

Each setting is (tokens a tile, channels a tile, warps, tiles a program): a program walks its tiles in a loop and sums
its weight-gradient partial products over all of them before one store. For every setting: that pass alone and the
whole backward (`_backward`, with the input-gradient pass at short_conv.TILE), do_bench medians in µs, and the largest
difference of its gx and gw from the committed setting's (gx must agree bit for bit; gw to float32 rounding). Prints
a markdown table per shape.

    python kernels/benchmarks/conv_tiles.py [--settings 128x64x4x1,4x1024x4x16,...]
"""

import argparse

import torch
from triton.testing import do_bench

from flowhn_kernels import short_conv

from bench_args import settings

SHAPES = [(16, 973, 1728, 4), (16, 2048, 1728, 4)]  # (B, n, C, W): FAC's DeltaNet rows; `none`'s and the hybrid's
SETTINGS = "128x64x4x1,32x64x4x4,16x128x4x8,4x512x2x16,4x1024x4x16,8x256x1x16,8x512x2x8"


def microseconds(fn):
    return 1e3 * do_bench(fn, warmup=25, rep=200, return_mode="median")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", type=settings("BTxBCxWARPSxTILES settings, each ≥ 1", 4, "x"), default=SETTINGS,
                        help="comma-separated BTxBCxWARPSxTILES")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    committed = short_conv.WEIGHT_GRAD_TILE
    for B, n, C, W in SHAPES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(B, n, C, generator=g).cuda().bfloat16()
        weight = (torch.randn(C, 1, W, generator=g) / W**0.5).cuda()
        gy = torch.randn(B, n, C, generator=g).cuda().bfloat16()
        taps = short_conv._taps(weight)
        gx0, gw0 = short_conv._backward(x, weight, None, 0, 1, gy)
        print(f"\n{torch.cuda.get_device_name()}, (B, n, C, W) = {(B, n, C, W)}, bf16, µs; committed {committed}\n")
        print("| setting | pass with the weight gradient | backward | max abs Δgx | max rel Δgw |")
        print("|---|---|---|---|---|")
        for setting in args.settings:
            short_conv.WEIGHT_GRAD_TILE = setting
            try:
                gx, gw = short_conv._backward(x, weight, None, 0, 1, gy)
                one = microseconds(lambda: short_conv._conv(x, taps, None, epilogue=2, gy=gy, weight_grad=True))
                whole = microseconds(lambda: short_conv._backward(x, weight, None, 0, 1, gy))
                dgx = (gx.float() - gx0.float()).abs().max().item()
                dgw = ((gw - gw0).abs().max() / gw0.abs().max()).item()
                print(f"| {setting} | {one:.1f} | {whole:.1f} | {dgx:.1e} | {dgw:.1e} |", flush=True)
            except Exception as error:  # a setting that does not compile or launch is a row, not the end of the run
                print(f"| {setting} | failed: {type(error).__name__}: {str(error)[:80]} | | | |", flush=True)
        short_conv.WEIGHT_GRAD_TILE = committed


if __name__ == "__main__":
    main()
