"""Matrix products of one FlowHN layer, apart or grouped: forward and both gradients, timed from CUDA graphs at the
135M model's shapes for FAC (each branch on about half the batch's tokens) and for `none` (every token to both).

The profile of session 25 put FAC's layer products at ~475 TFLOP/s against `none`'s ~569 on one H100: at half the
rows, above all in the weight gradients (a small output reduced over the tokens), cuBLAS runs further from the card's
rate. Each row sets one way of issuing the products against another, with the same weights and gradients:

- attention's q, k, v: three products, or one of the three widths together (the model's `qkv_proj`);
- the MLP's gate and up: two, or one (`gate_up_proj`);
- β: its h·r = 9 features, or padded to 16 (`aligned_linear`, which pads the weight at each call: here padded once);
- a d × d weight's gradient alone (attention's o_proj, DeltaNet's g_proj and o_proj, the fusion's two): one product,
  or its rows in slices as one batched product, then summed (the weight gradients at FAC's rows ran at ~239 TFLOP/s
  in session 25's profile, cuBLAS's `64x128 splitK` kernel, against ~419 at `none`'s rows);
- both branches' MLPs: one MLP per branch on its own tokens, or the two as one grouped product over both branches'
  tokens (`torch._grouped_mm`), or that with the weights' gradients apart: candidates for FAC's own matmul rate,
  not in the model.

    python -m training.benchmarks.linear_groups [--batch-size 16] [--seq-len 2048] [--out FILE]

`--smoke` runs the tiny preset on the CPU (timed by the wall clock) to test the script.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from flowhn_hf.modeling_flowhn import attention_window
from flowhn_hf.presets import preset_config

KERNEL_BENCHMARKS = str(Path(__file__).resolve().parents[2] / "kernels" / "benchmarks")
if KERNEL_BENCHMARKS not in sys.path:  # its scripts import each other from their folder
    sys.path.insert(0, KERNEL_BENCHMARKS)
from bench_delta_rule import replayed_ms  # noqa: E402


def time_us(step, device: torch.device, label: str, reps: int = 50) -> float:
    """µs of step(): on a GPU the median of its replays from a CUDA graph (the kernel benchmark's replayed_ms; the
    model's training step runs under one too), NaN where it cannot be captured; elsewhere the wall clock's mean."""
    if device.type == "cuda":
        ms = replayed_ms(step, label)
        return float("nan") if ms is None else 1e3 * ms
    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(reps):
        step()
    return (time.perf_counter() - start) / reps * 1e6


def leaf(*shape, device, scale=1.0):
    return (torch.randn(*shape, device=device, dtype=torch.bfloat16) * scale).requires_grad_()


def backward_step(forward, grads, leaves):
    """A training step's share of these products: forward, then the gradients of every leaf."""

    def step():
        for t in leaves:
            t.grad = None
        torch.autograd.backward(forward(), grads)

    return step


def shared_input(rows: int, d: int, widths: list[int], pad_to: int, device):
    """Products of one input x by several weights: apart, or as one product over their stacked weights (padded to a
    multiple of `pad_to` rows), whose output is cut into the same pieces."""
    x = leaf(rows, d, device=device)
    weights = [leaf(w, d, device=device, scale=d**-0.5) for w in widths]
    stacked = torch.cat(weights).detach()
    stacked = F.pad(stacked, (0, 0, 0, -stacked.shape[0] % pad_to)).requires_grad_()
    grads = [torch.randn(rows, w, device=device, dtype=torch.bfloat16) for w in widths]
    stacked_grad = F.pad(torch.cat(grads, dim=1), (0, stacked.shape[0] - sum(widths)))

    def apart():
        return [F.linear(x, w) for w in weights]

    def together():
        return [F.linear(x, stacked)]

    got = together()[0][:, : sum(widths)].split(widths, dim=1)
    check(apart(), got)
    return backward_step(apart, grads, [x, *weights]), backward_step(together, [stacked_grad], [x, stacked])


class GroupedRowsLinear(torch.autograd.Function):
    """The rows of x in groups (group g ends at offsets[g]), each times its own weight: grouped products forward and
    for x's gradient, and one ordinary product per group for the weights' gradients, which cuBLAS splits along their
    long reduction and a grouped product does not."""

    @staticmethod
    def forward(ctx, x, weight, offsets, rows):
        ctx.save_for_backward(x, weight, offsets)
        ctx.rows = rows
        # grouped_mm takes the second operand as (groups, K, N), here a transposed view of the (N, K) weights
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=offsets)

    @staticmethod
    def backward(ctx, grad):
        x, weight, offsets = ctx.saved_tensors
        grad_x = torch._grouped_mm(grad, weight, offs=offsets)
        grad_weight = torch.stack([g.T @ xg for g, xg in zip(grad.split(ctx.rows), x.split(ctx.rows))])
        return grad_x, grad_weight, None, None


def branch_mlps(rows: tuple[int, int], d: int, inner: int, device):
    """Two SwiGLU MLPs, one per branch on its own tokens: apart; each of their two products one grouped product over
    both branches' tokens (the rows of branch g at offsets[g-1]:offsets[g]); or grouped but for the weights'
    gradients (GroupedRowsLinear)."""
    xs = [leaf(n, d, device=device) for n in rows]
    gate_up = leaf(2, 2 * inner, d, device=device, scale=d**-0.5)
    down = leaf(2, d, inner, device=device, scale=inner**-0.5)
    both = torch.cat(xs).detach().requires_grad_()
    offsets = torch.tensor(rows, device=device).cumsum(0).to(torch.int32)
    grads = [torch.randn(n, d, device=device, dtype=torch.bfloat16) for n in rows]

    def swiglu(h):
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up

    def apart():
        return [F.linear(swiglu(F.linear(x, gate_up[g])), down[g]) for g, x in enumerate(xs)]

    def grouped():
        h = swiglu(torch._grouped_mm(both, gate_up.transpose(1, 2), offs=offsets))
        return [torch._grouped_mm(h, down.transpose(1, 2), offs=offsets)]

    def grouped_weight_gradients_apart():
        h = swiglu(GroupedRowsLinear.apply(both, gate_up, offsets, list(rows)))
        return [GroupedRowsLinear.apply(h, down, offsets, list(rows))]

    steps = {"apart": backward_step(apart, grads, [*xs, gate_up, down])}
    steps["apart"]()
    want = [gate_up.grad, down.grad, torch.cat([x.grad for x in xs])]
    for name, forward in [("grouped", grouped), ("grouped, weight gradients apart", grouped_weight_gradients_apart)]:
        check(apart(), forward()[0].split(list(rows)))
        steps[name] = backward_step(forward, [torch.cat(grads)], [both, gate_up, down])
        steps[name]()
        check(want, [gate_up.grad, down.grad, both.grad])
    return steps


def sliced_weight_gradient(rows: int, d: int, slice_counts: list[int], device):
    """A d × d weight's gradient over `rows` tokens, gradᵀ x: one product, and {slices: the rows cut into that many
    equal slices as one batched product whose fp32 partial sums are then added} (Inductor's decompose-K under
    max-autotune; cuBLAS's splitK kernels split the same reduction inside one launch, by their own choice of split
    and tile)."""
    grad, x = (torch.randn(rows, d, device=device, dtype=torch.bfloat16) for _ in range(2))

    def one():
        return grad.T @ x

    def sliced(slices):
        def step():
            parts = grad.view(slices, -1, d).transpose(1, 2), x.view(slices, -1, d)
            if device.type == "cuda":
                return torch.bmm(*parts, out_dtype=torch.float32).sum(0)
            return torch.bmm(*(part.float() for part in parts)).sum(0)  # (no bf16-in, fp32-out bmm on the CPU)

        check([one()], [step()])
        return step

    return one, {slices: sliced(slices) for slices in slice_counts}


def check(want, got):
    """The two ways give the same products (or gradients), to bf16 rounding."""
    for w, g in zip(want, got):
        error = ((g.float() - w.float()).norm() / w.float().norm()).item()
        if not error < 2e-2:
            raise AssertionError(f"the two ways' products differ: relative error {error:.2e}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny preset on the CPU: tests the script")
    p.add_argument("--batch-size", type=int, default=None, help="sequences (default 16; 2 smoke)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048; 64 smoke)")
    p.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    preset = "tiny" if args.smoke else "135m"
    tokens = (args.batch_size or (2 if args.smoke else 16)) * (args.seq_len or (64 if args.smoke else 2048))
    fac = preset_config(preset, split_mode="flop_aware_circulating")
    none = preset_config(preset, split_mode="none")
    window = attention_window(0, fac)
    to_attention = tokens // window.period * window.width
    fac_rows = (to_attention, tokens - to_attention)

    d, hd = fac.hidden_size, fac.head_dim
    qkv = [fac.num_attention_heads * hd, fac.num_key_value_heads * hd, fac.num_key_value_heads * hd]
    beta = fac.delta_num_heads * fac.delta_rank
    shared = [
        ("attention q, k, v → one product", (fac_rows[0], tokens), qkv, 1),
        ("MLP gate, up → one product (FAC's width)", fac_rows, [fac.intermediate_size] * 2, 1),
        ("MLP gate, up → one product (`none`'s width)", (tokens,), [none.intermediate_size] * 2, 1),
        (f"β, {beta} features → padded to {beta + -beta % 8}", (fac_rows[1], tokens), [beta], 8),
    ]
    rows = []
    for name, counts, widths, pad_to in shared:
        for n in counts:
            apart, together = shared_input(n, d, widths, pad_to, device)
            rows.append((name, f"{n:,}", time_us(apart, device, name), time_us(together, device, name)))
    for n in (*fac_rows, tokens):
        one, sliced = sliced_weight_gradient(n, d, [s for s in (4, 8, 16) if n % s == 0], device)
        one_us = time_us(one, device, "d × d weight gradient")  # once: every slice count is set against the same time
        for slices, step in sliced.items():
            name = f"d × d weight gradient → rows in {slices} slices, batched"
            rows.append((name, f"{n:,}", one_us, time_us(step, device, name)))
    mlps = [("FAC", fac_rows, fac.intermediate_size), ("`none`", (tokens,) * 2, none.intermediate_size)]
    for label, counts, inner in mlps:
        steps = branch_mlps(counts, d, inner, device)
        apart = time_us(steps.pop("apart"), device, f"branch MLPs apart ({label})")
        for way, step in steps.items():
            name = f"both branches' MLPs → {way} ({label})"
            rows.append((name, " + ".join(f"{n:,}" for n in counts), apart, time_us(step, device, name)))

    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke)"
    lines = [
        f"{name}, torch {torch.__version__}; bf16, forward and both gradients (the d × d rows: the weight's gradient "
        "alone), µs (on a GPU the median of CUDA graph replays)",
        "",
        "| products: one way → another | rows | one way µs | another µs | another / one |",
        "|---|---|---|---|---|",
        *(f"| {n} | {r} | {a:.1f} | {t:.1f} | {t / a:.2f} |" for n, r, a, t in rows),
    ]
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
