"""Versions of the kernels timed against each other in one run on one GPU: before and after a change, or several
candidates against a baseline.

Each version is a folder in which `import flowhn_kernels` finds that version (e.g. an old commit's kernels/ linked as
OLD/flowhn_kernels). Each runs in a process of its own, the versions taking turns shape by shape, so that all meet
the same GPU clocks. Per anchor shape it prints delta_rule's fwd+bwd at R = 1 (eager and replayed from a CUDA graph)
and at R = 2, the peak memory and the largest bf16 error against float64 (bench_delta_rule.py's measures), then the
ratios of the first version's measures to each other version's.

    python kernels/benchmarks/compare_versions.py --versions old=/tmp/old,new=/tmp/new[,...] [--shapes 4,3,1,2,0]
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

MEASURES = ("fwd+bwd", "fwd+bwd graph", "R=2 fwd+bwd", "mem MiB", "max rel err")


def measure(shape_index):
    """One shape's measures for the flowhn_kernels this process imports."""
    from bench_delta_rule import SHAPES, accuracy, inputs, ours, peak_mib, time_fwd_bwd

    B, T, H, D = SHAPES[shape_index]
    x1 = inputs(B, T, H, D, 1, layout="fla")
    err, finite = accuracy(B, T, H, D, 1)
    return {"fwd+bwd": time_fwd_bwd(ours, x1), "fwd+bwd graph": time_fwd_bwd(ours, x1, graph=True),
            "R=2 fwd+bwd": time_fwd_bwd(ours, inputs(B, T, H, D, 2)), "mem MiB": peak_mib(ours, x1),
            "max rel err": err if finite else float("nan")}


def run_version(folder, shape_index):
    path = [folder] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    out = subprocess.run([sys.executable, __file__, "--worker", str(shape_index)], env=env, capture_output=True,
                         text=True, cwd=Path(__file__).parent)
    if out.returncode:
        raise RuntimeError(f"{folder} at shape {shape_index}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    from bench_delta_rule import SHAPES, shape_indices

    ap = argparse.ArgumentParser()
    ap.add_argument("--versions", help="label=folder,label=folder[,...]: the first is the baseline")
    ap.add_argument("--shapes", type=shape_indices, default=[4, 3, 1, 2, 0])
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(measure(args.worker)))
        return
    import torch

    versions = [v.split("=", 1) for v in args.versions.split(",")]
    labels = [v[0] for v in versions]
    if len(versions) < 2 or any(len(v) != 2 for v in versions) or len(set(labels)) != len(labels):
        raise ValueError(f"--versions: two or more label=folder pairs with distinct labels, got {args.versions!r}")
    base = labels[0]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; ms, MiB; ratio = {base} / version\n")
    print("| shape | version | " + " | ".join(MEASURES) + " |\n|---|---|" + "---|" * len(MEASURES), flush=True)
    for i in args.shapes:
        rows = {label: run_version(folder, i) for label, folder in versions}
        for label, row in rows.items():  # None: a graph that could not be captured
            print(f"| {SHAPES[i]} | {label} | " + " | ".join("–" if row[m] is None else f"{row[m]:.3g}"
                                                           for m in MEASURES) + " |")
        for label in labels[1:]:
            ratios = [rows[base][m] / rows[label][m] if rows[base][m] and rows[label][m] else float("nan")
                      for m in MEASURES]
            print(f"| {SHAPES[i]} | {base} / {label} | " + " | ".join(f"{r:.3f}" for r in ratios) + " |", flush=True)


if __name__ == "__main__":
    main()
