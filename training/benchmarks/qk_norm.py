"""The DeltaNet branch's L2 normalisation of q and k under torch.compile, alone, against a copy of the same bytes.

Inductor's bandwidth report (inductor_bandwidth.py, session 39) put the compiled norm of q or k in FAC's step at
~95 µs a call for 36 MB, ~390 GB/s, two calls a layer: far below the card's copy rate. This times the norm as the model
writes it beside other spellings of it, forward and forward+backward, at the branch's shape in FAC's step, with a
copy of q and k as the floor:

    python -m training.benchmarks.qk_norm [--rows 16 --length 973 --heads 9 --dim 64] [--code DIR]

--code DIR writes Inductor's generated code of each spelling there.
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code
from triton.testing import do_bench

from flowhn_kernels import l2_normalize


def as_model(q, k):
    """The model's spelling: l2_normalize on each (kernels/delta_rule.py)."""
    return l2_normalize(q), l2_normalize(k)


def by_rsqrt(q, k):
    """x · rsqrt(max(Σx², eps²)) in float32: one reduction and a multiply, no division or clamped norm."""

    def norm(x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.square().sum(-1, keepdim=True).clamp_min(1e-24))).to(x.dtype)

    return norm(q), norm(k)


def together(q, k):
    """q and k normalised as one tensor of 2H heads (they sit side by side in qkv)."""
    both = torch.cat([q, k.flatten(-2, -1)], dim=2)
    out = F.normalize(both.float(), dim=-1).to(q.dtype)
    return out[:, :, : q.shape[2]], out[:, :, q.shape[2] :].unflatten(2, k.shape[2:4])


def copy(q, k):
    """The floor: q and k read and written once."""
    return q * 1, k * 1


SPELLINGS = {"as_model": as_model, "by_rsqrt": by_rsqrt, "together": together, "copy": copy}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--length", type=int, default=973, help="tokens a row routes to DeltaNet (FAC: ~0.475 × 2048)")
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--code", type=Path, default=None)
    args = ap.parse_args(argv)
    B, T, H, K = args.rows, args.length, args.heads, args.dim
    qkv = torch.randn(B, T, 3 * H * K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grads = [torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16),
             torch.randn(B, T, H, 1, K, device="cuda", dtype=torch.bfloat16)]  # fmt: skip
    moved = 2 * 2 * B * T * H * K * 2  # q and k, read and written, bf16
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; q, k of ({B}, {T}, {H}, {K}) bf16 from one "
          f"qkv; µs; GB/s over q and k read and written once ({moved / 1e6:.1f} MB)\n")  # fmt: skip
    print("| spelling | fwd µs | fwd GB/s | fwd+bwd µs |\n|---|---|---|---|")
    for name, fn in SPELLINGS.items():
        compiled = torch.compile(fn)

        def forward():
            q, k, _ = qkv.split(H * K, dim=-1)
            return compiled(q.view(B, T, H, K), k.view(B, T, H, 1, K))

        def forward_backward():
            torch.autograd.backward(forward(), grads)

        if args.code is not None:
            args.code.mkdir(parents=True, exist_ok=True)
            _, code = run_and_get_code(forward_backward)
            (args.code / f"{name}.py").write_text("\n\n# ---- next module ----\n\n".join(code))
        forward_backward()
        with torch.no_grad():
            fwd = do_bench(forward) * 1e3
        both = do_bench(forward_backward) * 1e3
        print(f"| {name} | {fwd:.1f} | {moved / fwd / 1e3:.0f} | {both:.1f} |", flush=True)


if __name__ == "__main__":
    main()
