"""The signature-inspired solver for the UT transform (ParallelFlow §4), in PyTorch.

Instead of a triangular solve, T = (I + strict ⊙ diag(β) K Kᵀ)⁻¹ is read as a path sum over the
chunk's (row, column) grid, like a signature kernel solved over a 2-D grid. For rows r after
column c (by token), the field

    E(r, c) = k_rᵀ Φ(r, c) k_c,     Φ(r, c) = Π over tokens strictly between c and r of (I − Σ_i β_i k_i k_iᵀ)

obeys E(r, c) = G[r, c] − Σ_{tok(c) < tok(m) < tok(r)} β_m G[r, m] E(m, c) with G = K Kᵀ, and
T[r, c] = −β_r E(r, c). Each sweep fills one diagonal of token offset d = tok(r) − tok(c) for
every cell at once, from diagonals < d: L − 1 sweeps of independent work, no sequential row
substitution. W = T diag(β) K as in DESIGN.md §3.
"""

import torch


def ut_transform_signature(k, beta, rank):
    """W = T diag(β) K for chunks k [..., L·R, K], beta [..., L·R], rows ordered (token, component).

    Returns (W, T). Any float dtype; run in float64 for comparisons.
    """
    rows = k.shape[-2]
    tok = torch.arange(rows // rank, device=k.device).repeat_interleave(rank)
    offset = tok[:, None] - tok[None, :]  # token distance of each cell
    gram = k @ k.transpose(-1, -2)
    field = torch.zeros_like(gram)
    for d in range(1, rows // rank):
        # paths from column c to row r through rows m strictly between them by token
        between = (offset > 0) & (offset < d)  # [m, c]: m after c, closer than d
        through = (gram * beta[..., None, :]) @ (field * between)  # Σ_m β_m G[r, m] E(m, c)
        cell = offset == d
        field = torch.where(cell, gram - through, field)
    eye = torch.eye(rows, dtype=k.dtype, device=k.device)
    t = torch.where(offset > 0, -beta[..., :, None] * field, eye)
    return t @ (beta[..., None] * k), t
