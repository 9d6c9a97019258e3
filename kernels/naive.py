"""Step-by-step DeltaNet recurrence: the ground truth that every other path is tested against."""

import torch


def naive_recurrence(q, k, v, beta, scale, initial_state=None, output_final_state=False):
    """Token-by-token recurrence on canonical shapes, one sequence batch (no cu_seqlens).

    q [B,T,H,K], k [B,T,H,R,K], v [B,T,H,R,V], beta [B,T,H,R]. Accumulates in float32, or in
    float64 when q is float64. Returns o [B,T,H,V] and the final state (or None), both in
    the accumulation dtype.
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, T, H, R, K = k.shape
    V = v.shape[-1]
    q, k, v, beta = (x.to(acc) for x in (q, k, v, beta))
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc)
    outs = []
    for t in range(T):
        kt = k[:, t]  # [B,H,R,K]
        # every component reads S_{t-1}: the R corrections are summed, not composed
        u = beta[:, t, ..., None] * (v[:, t] - torch.einsum("bhrk,bhkv->bhrv", kt, S))
        S = S + torch.einsum("bhrk,bhrv->bhkv", kt, u)
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S) * scale)
    return torch.stack(outs, dim=1), (S if output_final_state else None)
