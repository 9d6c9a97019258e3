"""The chunked and recurrent kernels as torch.library custom ops, with autograd.

torch.compile sees each call as one opaque node whose output shapes come from the fake implementations below, so a
model that calls delta_rule compiles into whole graphs around its DeltaNet layers instead of breaking at each.
Tensors arrive in the canonical shapes of delta_rule (q [B,T,H,K], k [B,T,H,R,K], v [B,T,H,R,V], beta [B,T,H,R]);
`offsets` are the packed documents' cu_seqlens as host integers (None: B equal sequences). A final state that was
not asked for, and an initial-state gradient that is not needed, come back as empty tensors (an op can't return None).
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .chunk import ROWS, chunk_bwd, chunk_counts, chunk_fwd, make_plan, saves_scores, tokens_per_chunk
from .recurrent import recurrent_fwd
from .utils import op_namespace

# Each copy of this module registers its own ops: the installed package and a Hub checkpoint's flat copy of these
# files can be loaded side by side.
NAMESPACE = op_namespace(__name__)


def _rows(x, unit=1):
    """x [N,...] as it is when each row's entries are contiguous and its rows lie a multiple of `unit` elements apart
    (any distance for 1), else a copy."""
    return x if x[0].is_contiguous() and x.stride(0) % unit == 0 else x.contiguous()


def pack(q, k, v, beta, any_stride=False):
    """Canonical [B,T,...] tensors as [B·T,...] ones, the kernels' packed layout: each token's entries contiguous, the
    tokens any distance apart for v, and for q and k a whole number of a head's rows apart (chunk.heads_apart: a
    constant of the chunked kernels' compilation). So the three can be slices of a wider projection, as the model's
    are of its short conv's output, and are read in place: a copy would cost a pass over them in every forward and
    again in every backward. any_stride: q and k at any token stride, as the recurrent kernel reads them (at
    decoding, a copy is a launch a step)."""
    B, T, H, R, K = k.shape
    q = _rows(q.reshape(B * T, H, K), 1 if any_stride else K)
    k = _rows(k.reshape(B * T, H, R, K), 1 if any_stride else R * K)
    return q, k, _rows(v.reshape(B * T, H, R, -1)), beta.reshape(B * T, H, R).contiguous()


def _plan(k, offsets):
    B, T, _, R, _ = k.shape
    return make_plan(B, T, R, k.device, offsets)


def _state_or_empty(state, like):
    return like.new_empty(0, dtype=torch.float32) if state is None else state


def _chunk_count(k, offsets) -> int:
    B, T, _, R, _ = k.shape
    return sum(chunk_counts([T] * B if offsets is None else [b - a for a, b in zip(offsets, offsets[1:])], R))


def _state_shape(k, v, offsets):
    B, _, H, _, K = k.shape
    return (B if offsets is None else len(offsets) - 1, H, K, v.shape[-1])


def _chunk_forward(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, initial_state: Optional[Tensor], scale: float,
    offsets: Optional[List[int]], output_final_state: bool, scan: Optional[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(o, final state, and what the backward reuses: T, W, U, the chunk-entry states and the scores)."""
    B, T, H = q.shape[:3]
    init = None if initial_state is None else initial_state.contiguous()
    o, final, saved = chunk_fwd(*pack(q, k, v, beta), scale, init, _plan(k, offsets), output_final_state, scan)
    return (o.view(B, T, H, -1), _state_or_empty(final, q), *saved)


chunk_forward = torch.library.custom_op(f"{NAMESPACE}::chunk_forward", _chunk_forward, mutates_args=())


@chunk_forward.register_fake
def _(q, k, v, beta, initial_state, scale, offsets, output_final_state, scan):
    nc, H, R, K, V = _chunk_count(k, offsets), q.shape[2], k.shape[3], k.shape[-1], v.shape[-1]
    state_shape = _state_shape(k, v, offsets)
    final = q.new_empty(state_shape if output_final_state else (0,), dtype=torch.float32)
    scores = saves_scores(state_shape[0], H, K, V, q.device)  # state_shape[0]: the sequences
    return (q.new_empty(*q.shape[:3], V), final, k.new_empty(nc, H, ROWS, ROWS),
            k.new_empty(nc, H, ROWS, K), v.new_empty(nc, H, ROWS, V), k.new_empty(nc, H, K, V),
            k.new_empty((nc, H, tokens_per_chunk(R), ROWS) if scores else (0,)))  # fmt: skip


def _chunk_backward(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, tinv: Tensor, w: Tensor, u: Tensor, hs: Tensor, qk: Tensor,
    do: Tensor, dfinal: Optional[Tensor], scale: float, offsets: Optional[List[int]], need_dinit: bool,
    scan: Optional[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(dq, dk, dv, dβ, d initial state)."""
    B, T, H = q.shape[:3]
    dfinal = None if dfinal is None else dfinal.contiguous()
    grads = chunk_bwd(*pack(q, k, v, beta), scale, (tinv, w, u, hs, qk), do.reshape(B * T, H, -1), dfinal,
                      _plan(k, offsets), need_dinit, scan)  # fmt: skip
    *grads, dinit = grads
    return (*(g.view(x.shape) for g, x in zip(grads, (q, k, v, beta))), _state_or_empty(dinit, q))


chunk_backward = torch.library.custom_op(f"{NAMESPACE}::chunk_backward", _chunk_backward, mutates_args=())


@chunk_backward.register_fake
def _(q, k, v, beta, tinv, w, u, hs, qk, do, dfinal, scale, offsets, need_dinit, scan):
    dinit = q.new_empty(_state_shape(k, v, offsets) if need_dinit else (0,), dtype=torch.float32)
    # contiguous, as the kernels write them (empty_like would copy a saved input's layout, which Inductor may permute)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), beta.new_empty(beta.shape), dinit


def _setup_context(ctx, inputs, output):
    q, k, v, beta, initial_state, scale, offsets, _, scan = inputs
    ctx.save_for_backward(q, k, v, beta, *output[2:])
    # T, W, U, hs and the scores are outputs only to be saved: autograd would otherwise hand the backward a zero
    # gradient for each (320 MiB at (8, 2048, 16, 128), and the time to fill it)
    ctx.set_materialize_grads(False)
    ctx.scale, ctx.offsets, ctx.scan = scale, offsets, scan
    ctx.init_dtype = None if initial_state is None else initial_state.dtype


def _backward_by(chunk_backward_fn):
    """The backward of the chunked forward, computed by the op (traced) or by its plain function (eager)."""

    def backward(ctx, do, dfinal, *_):
        q, k, v, beta, *saved = ctx.saved_tensors
        need_dinit = ctx.init_dtype is not None and ctx.needs_input_grad[4]
        if do is None:  # a loss on the final state alone
            do = q.new_zeros(*q.shape[:3], v.shape[-1])
        if dfinal is not None and dfinal.numel() == 0:  # no final state was asked for
            dfinal = None
        *grads, dinit = chunk_backward_fn(q, k, v, beta, *saved, do, dfinal, ctx.scale, ctx.offsets, need_dinit,
                                          ctx.scan)  # fmt: skip
        return (*grads, dinit.to(ctx.init_dtype) if need_dinit else None, None, None, None, None)

    return backward


chunk_forward.register_autograd(_backward_by(chunk_backward), setup_context=_setup_context)


class _EagerChunk(torch.autograd.Function):
    """The same forward and backward as the ops, without their dispatch (hundreds of µs of host time a call)."""

    @staticmethod
    def forward(ctx, *inputs):  # ctx in forward: a separate setup_context costs an inspect.signature bind per call
        output = _chunk_forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    backward = staticmethod(_backward_by(_chunk_backward))


def chunk(*args):
    """The chunked forward, differentiable: the op under torch.compile, the plain autograd function otherwise."""
    return chunk_forward(*args) if torch.compiler.is_compiling() else _EagerChunk.apply(*args)


def _recurrent_forward(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, initial_state: Optional[Tensor], scale: float,
    offsets: Optional[List[int]], output_final_state: bool, normalize_qk: bool,
) -> Tuple[Tensor, Tensor]:  # fmt: skip
    """(o, final state), one token at a time; forward only. normalize_qk: q and k scaled to unit length in the
    kernel."""
    B, T, H = q.shape[:3]
    init = None if initial_state is None else initial_state.contiguous()
    plan = _plan(k, offsets)
    o, final = recurrent_fwd(*pack(q, k, v, beta, any_stride=True), scale, init, plan, output_final_state,
                             normalize_qk)
    return o.view(B, T, H, -1), _state_or_empty(final, q)


recurrent_forward = torch.library.custom_op(f"{NAMESPACE}::recurrent_forward", _recurrent_forward, mutates_args=())


@recurrent_forward.register_fake
def _(q, k, v, beta, initial_state, scale, offsets, output_final_state, normalize_qk):
    final = q.new_empty(_state_shape(k, v, offsets) if output_final_state else (0,), dtype=torch.float32)
    return q.new_empty(*q.shape[:3], v.shape[-1]), final


def recurrent(*args):
    """The recurrent op under torch.compile, its plain function otherwise (an eager custom-op call's host time,
    paid in every layer at every decoded token)."""
    return (recurrent_forward if torch.compiler.is_compiling() else _recurrent_forward)(*args)
