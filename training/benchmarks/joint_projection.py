"""DeltaNet's input projections of a preset at the given row counts (by default the 135M model's: FAC's 15,616 routed
rows and `none`'s 32,768), forward + backward, eager, bf16 autocast over fp32 weights, do_bench medians in µs, each
grouping twice in turn. Every grouping runs through the model's `joint_linear` on the model's own `qkv_proj`,
`g_proj` and `b_proj` (widths below: the 135M preset's):

- separate: q | k | v (1,728 features), the gate (576) and β (9, padded to 16) as three products, as before
  session 42;
- joint3: one product over the three weights stacked and padded to 2,320 (the model's since session 42);
- joint2: q | k | v and the gate joint (2,304), β apart.

    python -m training.benchmarks.joint_projection [--preset 350m] [--rows 15616,32768]
                                                        # CUDA only; the NOTES log of session 44 has its output

The model's own A/B (the whole step) is queue 0p in NOTES.md.
"""

import argparse

import torch
from triton.testing import do_bench

from flowhn_hf import preset_config
from flowhn_hf.presets import PRESETS
from flowhn_hf.modeling_flowhn import FlowHNDeltaNet, joint_linear


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="135m", help="whose DeltaNet widths (default 135m)")
    p.add_argument("--rows", default="15616,32768", help="row counts, comma-separated (FAC's and none's at 16 × 2048)")
    args = p.parse_args(argv)
    counts = args.rows.split(",")
    if not all(c.strip().isdigit() and int(c) > 0 for c in counts):
        p.error(f"--rows: expected positive whole numbers, comma-separated, got {args.rows!r}")
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (it times cuBLAS's products)")
    for rows in map(int, counts):
        time_groupings(args.preset, rows)


def time_groupings(preset, rows):
    """Print each grouping's fwd+bwd time at `rows` rows, twice in turn."""
    torch.manual_seed(0)
    mixer = FlowHNDeltaNet(preset_config(preset), 0).cuda()
    qkv, g, b = mixer.qkv_proj, mixer.g_proj, mixer.b_proj
    groupings = {"separate": ((qkv,), (g,), (b,)), "joint3": ((qkv, g, b),), "joint2": ((qkv, g), (b,))}
    x = torch.randn(rows, qkv.in_features, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grads = [torch.randn(rows, linear.out_features, device="cuda", dtype=torch.bfloat16) for linear in (qkv, g, b)]

    def step(groups):
        for t in (x, *mixer.parameters()):
            t.grad = None
        with torch.autocast("cuda", torch.bfloat16):
            outs = [out for group in groups for out in joint_linear(x, *group)]
        torch.autograd.backward(outs, grads)

    for name, groups in list(groupings.items()) * 2:
        ms = do_bench(lambda: step(groups), warmup=300, rep=1000)
        print(f"{preset} {rows} rows, {name}: {ms * 1000:.1f} µs fwd+bwd", flush=True)


if __name__ == "__main__":
    main()
