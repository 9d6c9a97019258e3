"""DeltaNet's input projections at the 135M model's FAC shape (15,616 routed rows), forward + backward, eager, bf16
autocast over fp32 weights, do_bench medians in µs, each grouping twice in turn. Every grouping runs through the
model's `joint_linear` on the model's own `qkv_proj`, `g_proj` and `b_proj`:

- separate: q | k | v (1,728 features), the gate (576) and β (9, padded to 16) as three products, as before
  session 42;
- joint3: one product over the three weights stacked and padded to 2,320 (the model's since session 42);
- joint2: q | k | v and the gate joint (2,304), β apart.

    python -m training.benchmarks.joint_projection      # CUDA only; the NOTES log of session 42 has its output

The model's own A/B (the whole step) is queue 0p in NOTES.md.
"""

import torch
from triton.testing import do_bench

from flowhn_hf import preset_config
from flowhn_hf.modeling_flowhn import FlowHNDeltaNet, joint_linear

ROWS = 15616  # FAC's DeltaNet tokens in a 16 × 2048 batch


def main():
    torch.manual_seed(0)
    mixer = FlowHNDeltaNet(preset_config("135m"), 0).cuda()
    qkv, g, b = mixer.qkv_proj, mixer.g_proj, mixer.b_proj
    groupings = {"separate": ((qkv,), (g,), (b,)), "joint3": ((qkv, g, b),), "joint2": ((qkv, g), (b,))}
    x = torch.randn(ROWS, qkv.in_features, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grads = [torch.randn(ROWS, linear.out_features, device="cuda", dtype=torch.bfloat16) for linear in (qkv, g, b)]

    def step(groups):
        for t in (x, *mixer.parameters()):
            t.grad = None
        with torch.autocast("cuda", torch.bfloat16):
            outs = [out for group in groups for out in joint_linear(x, *group)]
        torch.autograd.backward(outs, grads)

    for name, groups in list(groupings.items()) * 2:
        ms = do_bench(lambda: step(groups), warmup=300, rep=1000)
        print(f"{name}: {ms * 1000:.1f} µs fwd+bwd")


if __name__ == "__main__":
    main()
