"""Every matrix product of one 135M training step, timed as cuBLAS runs it and as Inductor's max-autotune picks it.

`throughput.py --compile-mode max-autotune` answers the same question for a whole step, but it autotunes for ~8
minutes a model and compares across calls. Here the products themselves are collected once, with fake tensors,
from a forward and backward of the model under bf16 (shapes, strides and how often each occurs in a step), and each
distinct one is timed on the GPU in one process: `torch.mm` (cuBLAS by its heuristics), then the same product compiled
with `mode="max-autotune-no-cudagraphs"` (Inductor times cuBLAS against its Triton templates and decompose-K and
keeps the fastest). Both are medians of CUDA-graph replays. The step's sums say what max-autotune would take off the
products of each model; the largest products by cuBLAS time go first, and `--max-seconds` stops before the rest.

    python -m training.benchmarks.gemm_autotune [--models flowhn-FAC,flowhn-none] [--max-seconds 240] [--out FILE]

`--smoke` collects the tiny preset's products and times them on the CPU by the wall clock, to test the script.
"""

import argparse
import collections
import time
from pathlib import Path
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from flowhn_hf import modeling_flowhn
from flowhn_hf.presets import preset_config
from training.benchmarks.linear_groups import check, time_us

SPLIT_MODES = {"flowhn-FAC": "flop_aware_circulating", "flowhn-none": "none"}
PRODUCTS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}


class ProductCensus(TorchDispatchMode):
    """Counts the matrix products that run under it, by (shape, strides) of both operands."""

    def __init__(self):
        super().__init__()
        self.products = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in PRODUCTS:
            a, b = args[-2:]
            self.products[(tuple(a.shape), a.stride(), tuple(b.shape), b.stride())] += 1
        return func(*args, **(kwargs or {}))


def delta_rule_stand_in(q, k, v, beta, **_):
    """The DeltaNet op's shapes and dependencies without its arithmetic (its kernels hold no product counted here, and
    its PyTorch path would add the CPU's products): o depends on q, k, v and beta, so their products' gradients
    run."""
    if k.dim() == 5:  # rank R > 1: [B, T, H, R, ·]
        k, v, beta = k.sum(3), v.sum(3), beta.sum(3)
    return v + 0 * (q * k).sum(-1, keepdim=True) * beta[..., None], None


def step_products(preset: str, split_mode: str, batch: int, seq_len: int) -> collections.Counter:
    """{(a shape, a strides, b shape, b strides): times a step} for a forward and backward of the model in bf16."""
    model = modeling_flowhn.FlowHNForCausalLM(preset_config(preset, split_mode=split_mode)).to(torch.bfloat16)
    with FakeTensorMode(allow_non_fake_inputs=True):  # shapes only: the weights are real, every activation fake
        ids = torch.zeros(batch, seq_len, dtype=torch.long)
        with mock.patch.object(modeling_flowhn, "delta_rule", delta_rule_stand_in), ProductCensus() as census:
            torch.autograd.grad(model(input_ids=ids, labels=ids).loss, list(model.parameters()))
    return census.products


def operands(key, device):
    a_shape, a_stride, b_shape, b_stride = key
    return [torch.empty_strided(shape, stride, device=device, dtype=torch.bfloat16).normal_()
            for shape, stride in ((a_shape, a_stride), (b_shape, b_stride))]  # fmt: skip


def matmul(a, b):
    return a @ b


def autotuned(a, b):
    """a @ b as max-autotune compiles it for these exact operands, checked against cuBLAS's product."""
    torch._dynamo.reset()  # one graph per product: no recompilation limit, no dynamic shapes
    product = torch.compile(matmul, mode="max-autotune-no-cudagraphs", dynamic=False)
    check([a @ b], [product(a, b)])
    return lambda: product(a, b)


def describe(key) -> str:
    (m, k), a_stride, (_, n), b_stride = key
    layout = "".join("N" if stride[1] == 1 else "T" for stride in (a_stride, b_stride))
    return f"{m} × {k} · {k} × {n} ({layout})"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny preset on the CPU: tests the script")
    p.add_argument("--models", default="flowhn-FAC,flowhn-none", help=f"comma-separated, of {', '.join(SPLIT_MODES)}")
    p.add_argument("--batch-size", type=int, default=None, help="sequences (default 16; 2 smoke)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048; 64 smoke)")
    p.add_argument("--max-seconds", type=float, default=240, help="autotune no further product after this many seconds")
    p.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = p.parse_args(argv)
    models = args.models.split(",")
    if unknown := set(models) - set(SPLIT_MODES):
        p.error(f"--models: unknown {sorted(unknown)}; choose from {', '.join(SPLIT_MODES)}")
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    preset = "tiny" if args.smoke else "135m"
    batch, seq_len = args.batch_size or (2 if args.smoke else 16), args.seq_len or (64 if args.smoke else 2048)
    counts = {name: step_products(preset, SPLIT_MODES[name], batch, seq_len) for name in models}
    every = sorted(set().union(*counts.values()))

    start = time.perf_counter()
    rows = []
    plain_us = {key: time_us(lambda a=a, b=b: a @ b, device, describe(key))
              for key in every for a, b in [operands(key, device)]}  # fmt: skip
    for key in sorted(every, key=lambda key: -plain_us[key] * max(c[key] for c in counts.values())):
        if time.perf_counter() - start > args.max_seconds:
            break
        tuned = time_us(autotuned(*operands(key, device)), device, f"{describe(key)}, max-autotune")
        rows.append((key, plain_us[key], tuned))

    where = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}; µs, medians of CUDA-graph replays"
             if device.type == "cuda" else f"CPU, torch {torch.__version__}; µs, wall-clock means")
    header = " | ".join(f"{name} a step" for name in models)
    lines = [f"# Products of one {preset} training step ({batch} × {seq_len} tokens, bf16)", "",
             f"{where}; {len(rows)} of {len(every)} products timed (largest first)", "",
             f"| product | {header} | torch.mm µs | max-autotune µs | ratio |", "|---|" + "---|" * (len(models) + 3)]
    for key, plain, tuned in rows:
        per_step = " | ".join(str(counts[name][key]) for name in models)
        lines.append(f"| {describe(key)} | {per_step} | {plain:.1f} | {tuned:.1f} | {tuned / plain:.2f} |")
    lines.append("")
    for name in models:
        timed = [(counts[name][key], plain, tuned) for key, plain, tuned in rows if counts[name][key]]
        whole = sum(count * plain_us[key] for key, count in counts[name].items()) / 1e3
        lines.append(f"- {name}: the step's products take {whole:.2f} ms under torch.mm; the "
                     f"{sum(c for c, *_ in timed)} timed take {sum(c * p for c, p, _ in timed) / 1e3:.2f} ms, "
                     f"{sum(c * t for c, _, t in timed) / 1e3:.2f} ms under max-autotune")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
