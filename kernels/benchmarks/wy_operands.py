"""grad_wy's operand choice on the GPU: speed against accuracy for the two settings of chunk.WY_CANCELLING_16BIT
(16-bit or fp32 operands for the cancelling products of dT). Until v29 Tᵀ dU and Tᵀ dW had a setting of their own
(NOTES.md v6 has the four); with T saved in the input dtype fp32 operands there give the same values.

For each: fwd+bwd at (8, 2048, 16, 128) in bf16, the error at that anchor shape, and the largest error of the bf16
alike-keys test of tests/test_kernels.py over three seeds (its tolerance is 4e-2).

    python kernels/benchmarks/wy_operands.py
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))
import bench_delta_rule as bench  # noqa: E402
import test_kernels as tk  # noqa: E402
from flowhn_kernels import chunk  # noqa: E402
from flowhn_kernels.delta_rule import chunk_delta_rule  # noqa: E402


def alike_keys_error(seed):
    """(largest relative error, its output's name) over o, the state and the gradients of the bf16 alike-keys test's
    inputs."""
    torch.manual_seed(seed)
    xs = tk.alike_keys_inputs(1, torch.bfloat16, "cuda")
    do = torch.randn(*xs[0].shape[:3], xs[2].shape[-1], dtype=torch.float64, device="cuda")
    ds = torch.randn_like(xs[4], dtype=torch.float64)
    got = tk.run(chunk_delta_rule, xs, do, ds)
    want = tk.run(tk.fk.delta_rule_naive, xs, do, ds, dtype=torch.float64)
    names = ["o", "final_state", "dq", "dk", "dv", "dbeta", "dinitial_state"]
    return max((tk.rel(g, w), name) for g, w, name in zip(got, want, names))


def main():
    xs = bench.inputs(8, 2048, 16, 128, 1, layout="fla")
    print("| dT products | fwd+bwd ms | anchor error | alike keys, max of 3 seeds |")
    print("|---|---|---|---|")
    for cancelling in (False, True):
        chunk.WY_CANCELLING_16BIT = cancelling
        ms = bench.time_fwd_bwd(bench.ours, xs)
        err, finite = bench.accuracy(8, 2048, 16, 128, 1)
        alike, worst = max(alike_keys_error(seed) for seed in range(3))
        print(f"| {'16-bit' if cancelling else 'fp32'} | {ms:.3f} | {err:.1e}{'' if finite else ' NaN/Inf'} | "
              f"{alike:.2e} ({worst}){', fails' if alike >= tk.ALIKE_KEYS_BF16_TOL else ''} |", flush=True)


if __name__ == "__main__":
    main()
