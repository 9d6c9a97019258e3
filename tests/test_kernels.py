"""DeltaNet kernels: PyTorch reference and Triton kernels (interpreter on CPU) vs the float64 recurrence."""

import pytest
import torch

import flowhn_kernels as fk


def make_inputs(B, T, H, R, K, V, dtype=torch.float64, squeeze=False, seed=None, device="cpu", grad=False):
    """Fresh random inputs: q, v normal, k L2-normalised, beta in (0, 2/R) so Σβ ≤ 2."""
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    q = torch.randn(B, T, H, K, generator=g, dtype=torch.float64)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, R, K, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, H, R, V, generator=g, dtype=torch.float64)
    beta = (torch.rand(B, T, H, R, generator=g, dtype=torch.float64) * 0.9 + 0.1) * 2 / R
    if squeeze:
        k, v, beta = k[:, :, :, 0], v[:, :, :, 0], beta[..., 0]
    out = [x.to(device=device, dtype=dtype).requires_grad_(grad) for x in (q, k, v, beta)]
    return out


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("T", [1, 17, 64, 65, 130])
@pytest.mark.parametrize("R", [1, 2, 3])
def test_reference_matches_naive_float64(T, R):
    q, k, v, beta = make_inputs(2, T, 2, R, 16, 8)
    s0 = torch.randn(2, 2, 16, 8, dtype=torch.float64)
    o1, s1 = fk.delta_rule_naive(q, k, v, beta, initial_state=s0, output_final_state=True)
    o2, s2 = fk.delta_rule_reference(q, k, v, beta, initial_state=s0, output_final_state=True)
    assert o2.dtype == torch.float64 and o2.shape == (2, T, 2, 8) and s2.shape == (2, 2, 16, 8)
    assert rel(o2, o1) < 1e-12 and rel(s2, s1) < 1e-12


def test_reference_gradients_flow():
    q, k, v, beta = make_inputs(1, 70, 2, 2, 8, 4, grad=True)
    s0 = torch.randn(1, 2, 8, 4, dtype=torch.float64, requires_grad=True)
    o, s = fk.delta_rule_reference(q, k, v, beta, initial_state=s0, output_final_state=True)
    (o.square().sum() + s.sum()).backward()
    for x in (q, k, v, beta, s0):
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
