"""Where a training step's GPU time goes: torch.profiler over a few steps of one benchmark model (issue 6).

Builds a model exactly as `throughput.py` does (same names, same batch, same precision, eager or compiled), runs its
warm-up steps, then profiles `--steps` training steps and prints the kernels by total GPU time, with each kernel
put in a group (DeltaNet kernels, matmuls, attention, Inductor-fused code, other element-wise, optimizer, copies) and
the ops that launched it, so that what to fuse or speed up next is read off one table. Writes the table to
--out-dir (and $OUT) as profile_<model>.md, and a Chrome trace when --trace is given; with several models, also
their groups side by side (profile_groups.md), each model's time against the first's.

    python -m training.benchmarks.profile_step --models flowhn-FAC,llama --compile on
    python -m training.benchmarks.profile_step --smoke --models flowhn-FAC      # CPU: tests the script
"""

import argparse
import os
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from torch.profiler import ProfilerActivity, profile

from training.benchmarks import throughput as tp

# First match wins: the order puts the specific names before the generic ones.
GROUPS = (
    ("deltanet", r"delta|_wy_|prep_kernel|state_(fwd|bwd)|grad_(wy|state)|output_kernel|combine_kernel|chunk_"),
    ("attention", r"flash|fmha|attention|sdpa|efficient_attention"),
    ("matmul", r"gemm|matmul|cutlass|sm90_xmma|nvjet|cublas|wgmma"),
    ("optimizer", r"adam|multi_tensor"),
    ("inductor", r"^triton_"),
    ("convolution", r"conv"),
    ("copy", r"copy|memcpy|memset|cat|index|scatter|gather|fill"),
    ("element-wise", r"elementwise|reduce|vectorized|unrolled|softmax|norm"),
)


def group_of(name):
    low = name.lower()
    for group, pattern in GROUPS:
        if re.search(pattern, low):
            return group
    return "other"


def launchers(prof, device_type):
    """{kernel name: Counter of what launched it}: the op that issued the launch and, after "<-", its nearest
    ancestor outside ATen (a custom op, an autograd node, Inductor's compiled region), so that an ATen kernel in a
    compiled step can be traced to the model code behind it. On the CPU, where the rows are ops, the ancestor alone."""
    found = defaultdict(Counter)
    for event in prof.events():
        if device_type == "cuda":
            names = [kernel.name for kernel in event.kernels]
            if not names:
                continue
        elif event.device_type == torch.autograd.DeviceType.CPU:
            names = [event.key]
        else:
            continue
        parent = event.cpu_parent
        while parent is not None and parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        where = parent.name if parent is not None else "top level"
        for name in names:
            found[name][f"{event.name} <- {where}" if device_type == "cuda" else where] += 1
    return found


def kernel_rows(prof, steps, device_type):
    """(name, group, calls per step, µs per step) of every device kernel, biggest first. Regions a user annotated
    (the optimizer's step) appear on the GPU's timeline as well, over kernels already counted: left out."""
    rows = []
    for event in prof.key_averages():
        if event.is_user_annotation:
            continue
        if device_type == "cuda":
            total = event.self_device_time_total
            if total <= 0 or event.device_type != torch.autograd.DeviceType.CUDA:
                continue
        else:
            total = event.self_cpu_time_total
            if total <= 0 or event.key.startswith("ProfilerStep"):
                continue
        rows.append((event.key, group_of(event.key), event.count / steps, total / steps))
    return sorted(rows, key=lambda r: -r[3])


def by_group(rows):
    """{group: [launches per step, µs per step]} of kernel_rows' rows."""
    groups = defaultdict(lambda: [0.0, 0.0])
    for _, group, calls, us in rows:
        groups[group][0] += calls
        groups[group][1] += us
    return groups


def report(name, rows, groups, step_ms, top, launched_by):
    total = sum(r[3] for r in rows)
    lines = [f"## {name}: {step_ms:.1f} ms a step (wall, unprofiled), kernels {total / 1000:.1f} ms a step", "",
             "| group | launches/step | ms/step | share |", "|---|---|---|---|"]  # fmt: skip
    for group, (calls, us) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"| {group} | {calls:.0f} | {us / 1000:.2f} | {100 * us / total:.1f}% |")
    lines += ["", "| kernel | group | calls/step | µs/step | share | launched by (launches in all steps) |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for kernel, group, calls, us in rows[:top]:
        short = kernel if len(kernel) <= 90 else kernel[:87] + "..."
        by = "; ".join(f"{op} ({n})" for op, n in launched_by[kernel].most_common(3)) or "-"
        lines.append(f"| `{short.replace('|', '/')}` | {group} | {calls:.0f} | {us:.0f} | {100 * us / total:.1f}% | "
                     f"{by.replace('|', '/')} |")
    return "\n".join(lines)


def profile_model(name, args, extra, device, batch):
    state = {"target": tp.target_parameters(args), "calibration_note": "not calibrated when profiling"}
    torch.manual_seed(0)
    with torch.device(device):
        model, _ = tp.build_model(name, args, state)
    step = tp.training_step(model, batch, args, device, compiled=args.compile == "on")
    for _ in range(args.warmup):
        step()
    tp.synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    tp.synchronize(device)
    step_ms = 1000 * (time.perf_counter() - start) / args.steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        tp.synchronize(device)
    if extra.trace:
        prof.export_chrome_trace(str(extra.trace_dir / f"trace_{name}.json"))
    torch._dynamo.reset()
    rows = kernel_rows(prof, args.steps, device.type)
    groups = by_group(rows)
    text = report(name + (" (compiled)" if args.compile == "on" else ""), rows, groups, step_ms, extra.top,
                  launchers(prof, device.type))  # fmt: skip
    return text, {group: us / 1000 for group, (_, us) in groups.items()}


def comparison(groups):
    """Markdown: ms a step of each group, one column per model, and each later model's time over the first's
    (what a model does apart from the first one, group by group)."""
    names = list(groups)
    first = groups[names[0]]
    order = sorted({g for model in groups.values() for g in model}, key=lambda g: -first.get(g, 0.0))
    lines = ["| group | " + " | ".join(f"{n} ms" for n in names) + "".join(f" | {n} / {names[0]}" for n in names[1:])
             + " |", "|---|" + "---|" * (2 * len(names) - 1)]  # fmt: skip
    for group in order + ["all"]:
        times = [sum(m.values()) if group == "all" else m.get(group, 0.0) for m in groups.values()]
        ratios = [f"{t / times[0]:.2f}" if times[0] else "–" for t in times[1:]]
        lines.append(f"| {group} | " + " | ".join(f"{t:.2f}" for t in times) + "".join(f" | {r}" for r in ratios)
                     + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--top", type=int, default=30, help="kernels listed per model")
    p.add_argument("--trace", action="store_true", help="also write a Chrome trace per model")
    extra, rest = p.parse_known_args(argv)
    args = tp.parse_args(rest)  # throughput's own options: --models, --compile, --smoke, --batch-size, ...
    if args.compile == "both":
        raise SystemExit("--compile: choose on or off here")
    device = torch.device(args.device)
    out_dirs = [args.out_dir] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
    extra.trace_dir = out_dirs[-1]
    batch = torch.randint(0, tp.flowhn_config(args, "none").vocab_size, (args.batch_size, args.seq_len),
                          generator=torch.Generator().manual_seed(0)).to(device)  # fmt: skip
    groups = {}
    for name in args.models:
        text, groups[name] = profile_model(name, args, extra, device, batch)
        print(text, "\n", flush=True)
        for out in out_dirs:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"profile_{name}.md").write_text(text + "\n")
        tp.free_memory(device)
    if len(groups) > 1:
        text = "## Kernel time by group, ms a step\n\n" + comparison(groups)
        print(text, flush=True)
        for out in out_dirs:
            (out / "profile_groups.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
