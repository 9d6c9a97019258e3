"""DeltaNet's input projections at the 135M model's FAC shape (15,616 routed rows, d 576), forward + backward, eager,
bf16 autocast over fp32 weights, do_bench medians in µs, each variant twice in turn:

- separate: q | k | v (1,728 features), the gate (576) and β (9, padded to 16) as three products, as before
  session 42;
- joint3: one product over the three weights stacked and padded to 2,320 (`joint_linear`, the model's since
  session 42);
- joint2: q | k | v and the gate joint (2,304), β apart.

    python -m training.benchmarks.joint_projection      # CUDA only; the NOTES log of session 42 has its output

The model's own A/B (the whole step) is queue 0p in NOTES.md.
"""
import torch
import torch.nn.functional as F
from triton.testing import do_bench


def main():
    torch.manual_seed(0)
    rows, d = 15616, 576
    shapes = (("qkv", 1728), ("g", 576), ("b", 9))
    W = {n: (torch.randn(m, d, device="cuda") * 0.02).requires_grad_() for n, m in shapes}
    x = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grads = {n: torch.randn(rows, w.shape[0], device="cuda", dtype=torch.bfloat16) for n, w in W.items()}

    def padded(w):
        return F.pad(w, (0, 0, 0, -w.shape[0] % 8))

    def separate():
        with torch.autocast("cuda", torch.bfloat16):
            outs = [F.linear(x, W["qkv"]), F.linear(x, W["g"]), F.linear(x, padded(W["b"]))[:, :9]]
        torch.autograd.backward(outs, [grads[n] for n in ("qkv", "g", "b")])

    def joint3():
        with torch.autocast("cuda", torch.bfloat16):
            p = F.linear(x, padded(torch.cat([W["qkv"], W["g"], W["b"]])))
        outs = p.split([1728, 576, 9, 7], -1)[:3]
        torch.autograd.backward(outs, [grads[n] for n in ("qkv", "g", "b")])

    def joint2():
        with torch.autocast("cuda", torch.bfloat16):
            p = F.linear(x, torch.cat([W["qkv"], W["g"]]))
            b = F.linear(x, padded(W["b"]))[:, :9]
        outs = [*p.split([1728, 576], -1), b]
        torch.autograd.backward(outs, [grads[n] for n in ("qkv", "g", "b")])

    def zero():
        for t in (x, *W.values()):
            t.grad = None

    for name, fn in (("separate", separate), ("joint3", joint3), ("joint2", joint2)) * 2:
        ms = do_bench(lambda: (zero(), fn()), warmup=300, rep=1000)
        print(f"{name}: {ms * 1000:.1f} µs fwd+bwd")


if __name__ == "__main__":
    main()
