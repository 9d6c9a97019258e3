"""Chunked parallel-flow DeltaNet in plain PyTorch (DESIGN.md §3), differentiable by autograd."""

import torch

CHUNK = 64


def chunk_masks(tokens: int, rank: int, device):
    """Masks over the tokens·rank rows of a chunk, rows ordered by token then component.

    strict[r, c]: row r's token comes strictly after column c's token (the UT-transform mask;
    the R components of one token do not see each other). causal[t, c]: token t is at or after
    the token of row c (which corrections query t sees).
    """
    tok = torch.arange(tokens, device=device).repeat_interleave(rank)
    strict = tok[:, None] > tok[None, :]
    causal = torch.arange(tokens, device=device)[:, None] >= tok[None, :]
    return strict, causal


def chunk_flows(q, k, v, beta, chunk: int = CHUNK):
    """Per-chunk quantities of the UT transform.

    Inputs are already in the accumulation dtype and padded to a multiple of `chunk` tokens.
    Returns (q, k, w, u_tilde, causal) with q [B,H,N,C,K], k and w [B,H,N,C·R,K], u_tilde
    [B,H,N,C·R,V] and causal [C, C·R], where W = T diag(β) K and Ũ = T diag(β) V with
    T = (I + strict ⊙ diag(β) K Kᵀ)⁻¹.
    """
    B, Tp, H, R, K = k.shape
    V = v.shape[-1]
    N = Tp // chunk
    q = q.view(B, N, chunk, H, K).permute(0, 3, 1, 2, 4)
    k = k.view(B, N, chunk, H, R, K).permute(0, 3, 1, 2, 4, 5).reshape(B, H, N, chunk * R, K)
    v = v.view(B, N, chunk, H, R, V).permute(0, 3, 1, 2, 4, 5).reshape(B, H, N, chunk * R, V)
    beta = beta.view(B, N, chunk, H, R).permute(0, 3, 1, 2, 4).reshape(B, H, N, chunk * R, 1)
    strict, causal = chunk_masks(chunk, R, q.device)
    a = (beta * k) @ k.transpose(-1, -2) * strict
    eye = torch.eye(chunk * R, dtype=a.dtype, device=a.device)
    lhs = eye + a
    w = torch.linalg.solve_triangular(lhs, beta * k, upper=False, unitriangular=True)
    u_tilde = torch.linalg.solve_triangular(lhs, beta * v, upper=False, unitriangular=True)
    return q, k, w, u_tilde, causal


def reference_chunked(q, k, v, beta, scale, initial_state=None, output_final_state=False, chunk: int = CHUNK):
    """Chunked flows with the sequential state pass across chunks, canonical shapes, no cu_seqlens.

    Returns o and the final state (or None) in the accumulation dtype (float64 for float64 q,
    else float32).
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, T, H, R, K = k.shape
    V = v.shape[-1]
    pad = (-T) % chunk
    # padding tokens have k = 0 and beta = 0, so they leave the state unchanged
    q, k, v, beta = (torch.nn.functional.pad(x.to(acc), (0, 0) * (x.dim() - 2) + (0, pad)) for x in (q, k, v, beta))
    q, k, w, u_tilde, causal = chunk_flows(q, k, v, beta, chunk)
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc)
    outs = []
    for c in range(q.shape[2]):
        u = u_tilde[:, :, c] - w[:, :, c] @ S
        qc, kc = q[:, :, c], k[:, :, c]
        outs.append(qc @ S + ((qc @ kc.transpose(-1, -2)) * causal) @ u)
        S = S + kc.transpose(-1, -2) @ u
    o = torch.stack(outs, dim=2).permute(0, 2, 3, 1, 4).reshape(B, -1, H, V)[:, :T] * scale
    return o, (S if output_final_state else None)
