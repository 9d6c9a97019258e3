"""The DeltaNet branch's short causal depthwise convolution fused with SiLU: Triton kernels and their reference.

    y[t] = silu(Σ_j taps[j] · x[t − (W − 1 − j)]),   taps = weight[:, 0].T,   zero inputs before the first token

and, with `documents`, no tap reaching into an earlier packed document. x is channels-last (B, n, C), as the
projection gives it, so a tile of tokens × channels loads coalesced along C and each tap is one shifted load of it.
The backward recomputes the pre-activation instead of saving it: one pass of the same kernel writes its gradient
gpre = gy · silu'(pre) and, loading the recomputation's shifted inputs again once gpre is known, the weight gradient's
partial sums (summed afterwards: deterministic); a second one, looking ahead over gpre, the input gradient. A program
of the weight-gradient pass walks several tiles, each a few tokens deep along the channels so that its sums over the
tokens stay inside a thread, and stores once. (A first backward recomputed the pre-activation at every shifted row, W²
loads a tile: 453 µs at (16, 973, 1728) on an H200; a second walked tall tiles in a loop, each ending in sums across
warps: 326 µs for its first pass; the forward takes 52.)
"""

import re
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton.language as tl
from torch import Tensor

from .utils import cdiv, device_function, interpreting, kernel, pow2

MAX_WIDTH = 8
UNIT_EPS = tl.constexpr(1e-12)  # a unit group's norm is at least this, as F.normalize's
MAX_UNIT_GROUP = 256  # the kernels scale groups of a power of two up to this; larger or other sizes after them
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # the kernels take all but float64
# launch settings (tokens × channels of a tile, warps, tiles a program), measured at (16, 973, 1728, 4) and (16, 2048,
# 1728, 4) in bf16: the pass with the weight gradient sums its partial products over its tokens, so its tiles lie
# along the channels, where each sum stays inside a thread, and a program walks 16 of them before one store
# (kernels/benchmarks/NOTES.md, "Short conv: tiles per pass" to "tiles a program"; conv_tiles.py times the settings)
TILE = (16, 128, 4, 1)
WEIGHT_GRAD_TILE = (8, 512, 2, 16)

# Each copy of this module registers its own ops (see ops.py)
NAMESPACE = "flowhn_" + re.sub(r"\W", "_", __name__)


def causal_conv(x: torch.Tensor, weight: torch.Tensor, documents: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise causal convolution along the tokens of x (B, width - 1 + n, C), whose first width - 1 entries are the
    inputs before the first token (zeros, or a cache's window), with taps `weight` (C, 1, width): (B, n, C). With
    `documents` (B, n) no tap reaches into an earlier packed document.

    A sum of shifted products over the channels-last layout the projection gives, float32 sums: torch.compile fuses
    it into one kernel (a depthwise F.conv1d costs a transpose and a slow cuDNN kernel). One token is one product."""
    width = weight.shape[-1]
    length = x.shape[1] - width + 1
    taps = weight[:, 0].T  # (width, C): taps[j] multiplies the input width - 1 - j tokens back
    if length == 1:
        return (x * taps.to(x.dtype)).sum(1, keepdim=True)
    out = 0
    for j in range(width):
        shifted = x[:, j : j + length]
        back = width - 1 - j
        if documents is not None and back:
            same = F.pad(documents[:, back:] == documents[:, : length - back], (back, 0))
            shifted = shifted * same[..., None]
        out = out + shifted * taps[j].float()
    return out.to(x.dtype)


@device_function
def _shifted_rows(x, at, rows, back, n, c_ok, row_ok, documents, doc, C, HAS_DOCS: tl.constexpr,
                  AHEAD: tl.constexpr):
    """The tile's inputs `back` tokens before its rows (after them with AHEAD), fp32; zero outside the sequence or
    the row's document."""
    src = rows + back if AHEAD else rows - back
    ok = row_ok & (src < n) & (src >= 0)
    if HAS_DOCS:
        ok = ok & (tl.load(documents + src, mask=ok) == doc)
    return tl.load(x + at + src[:, None] * C, mask=ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)


@device_function
def _group_sums(t, BT: tl.constexpr, BC: tl.constexpr, K: tl.constexpr):
    """t (BT, BC) with each entry replaced by the sum of its group of K consecutive columns."""
    sums = tl.sum(tl.reshape(t, [BT, BC // K, K]), axis=2)
    return tl.reshape(tl.broadcast_to(sums[:, :, None], [BT, BC // K, K]), [BT, BC])


@device_function
def _group_norms(t, BT: tl.constexpr, BC: tl.constexpr, K: tl.constexpr):
    """The L2 norm of each entry's group of K consecutive columns of t (BT, BC)."""
    return tl.sqrt(_group_sums(t * t, BT, BC, K))


@kernel
def conv_kernel(x, taps, documents, y, gy, gw, n, C, W: tl.constexpr, WP: tl.constexpr, BT: tl.constexpr,
                BC: tl.constexpr, HAS_DOCS: tl.constexpr, AHEAD: tl.constexpr, EPILOGUE: tl.constexpr,
                WEIGHT_GRAD: tl.constexpr, TILES: tl.constexpr, UNIT_C: tl.constexpr, UNIT_K: tl.constexpr):
    """One tile of BT tokens × BC channels of one sequence: acc[t] = Σ_back taps[W − 1 − back] · x[t − back], or
    with AHEAD x[t + back]; terms outside the sequence or t's document are zero; fp32 sums. y = acc (EPILOGUE 0),
    silu(acc) (1: the forward) or gy · silu'(acc) (2: the pre-activation's gradient, acc recomputed); with UNIT_C > 0
    the SiLU's first UNIT_C channels are scaled to unit length in groups of UNIT_K (a power of two dividing BC), and
    epilogue 2 takes gy as the gradient of the scaled output. A program takes
    TILES tiles one after the other. With WEIGHT_GRAD (EPILOGUE 2) also its weight-gradient partial sums into row
    `run` of gw (programs, WP, C): tap W − 1 − back sums gpre[t] · x[t − back] over its tokens t. The shifted
    inputs are loaded a second time for it, from the cache the first loads have just filled, since gpre exists only
    once all W of them are summed (holding the W tiles in registers instead is untried)."""
    b = tl.program_id(2).to(tl.int64)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    c_ok = cols < C
    at = b * n * C + cols[None, :]  # row 0 of this sequence at this tile's channels
    tap_at = taps + (W - 1) * C + cols  # taps (W, C): the tap `back` tokens back at tap_at - back * C
    documents += b * n
    j = tl.arange(0, WP)
    gw_acc = tl.zeros([WP, BC], dtype=tl.float32)
    for i in tl.range(TILES):
        rows = (tl.program_id(0) * TILES + i) * BT + tl.arange(0, BT)
        row_ok = rows < n
        tile_ok = row_ok[:, None] & c_ok[None, :]
        doc = rows  # unused placeholder unless HAS_DOCS
        if HAS_DOCS:
            doc = tl.load(documents + rows, mask=row_ok)
        acc = tl.zeros([BT, BC], dtype=tl.float32)
        for back in tl.static_range(W):
            xs = _shifted_rows(x, at, rows, back, n, c_ok, row_ok, documents, doc, C, HAS_DOCS, AHEAD)
            acc += xs * tl.load(tap_at - back * C, mask=c_ok)[None, :]
        unit = (cols < UNIT_C)[None, :]
        if EPILOGUE == 1:
            acc = acc * tl.sigmoid(acc)
            if UNIT_C > 0:
                acc = tl.where(unit, acc / tl.maximum(_group_norms(acc, BT, BC, UNIT_K), UNIT_EPS), acc)
        if EPILOGUE == 2:
            sig = tl.sigmoid(acc)
            dy = tl.load(gy + at + rows[:, None] * C, mask=tile_ok, other=0.0).to(tl.float32)
            if UNIT_C > 0:  # gy is the unit vector u = s / max(‖s‖, eps)'s: gs = (gy − u (u · gy)) / ‖s‖
                s = acc * sig
                norm = _group_norms(s, BT, BC, UNIT_K)
                u = s / tl.maximum(norm, UNIT_EPS)
                along = tl.where(norm > UNIT_EPS, u * _group_sums(u * dy, BT, BC, UNIT_K), 0.0)  # eps: a constant
                dy = tl.where(unit, (dy - along) / tl.maximum(norm, UNIT_EPS), dy)
            acc = dy * sig * (1 + acc * (1 - sig))
        tl.store(y + at + rows[:, None] * C, acc.to(y.dtype.element_ty), mask=tile_ok)
        if WEIGHT_GRAD:
            for back in tl.static_range(W):
                xs = _shifted_rows(x, at, rows, back, n, c_ok, row_ok, documents, doc, C, HAS_DOCS, AHEAD)
                gw_acc += tl.where(j[:, None] == W - 1 - back, tl.sum(acc * xs, axis=0)[None, :], 0.0)
    if WEIGHT_GRAD:
        run = b * tl.num_programs(0) + tl.program_id(0)
        tl.store(gw + (run * WP + j[:, None]) * C + cols[None, :], gw_acc, mask=(j < W)[:, None] & c_ok[None, :])


def _taps(weight):
    """weight (C, 1, W) as the kernels read it: fp32 (W, C), taps[j] multiplying the input W − 1 − j tokens back, each
    tap a contiguous row (loads along C)."""
    return weight[:, 0].T.float().contiguous()


def _conv(x: Tensor, taps: Tensor, documents: Optional[Tensor], ahead=False, epilogue=0, gy=None, weight_grad=False,
          unit_channels=0, unit_size=1):
    """conv_kernel over all of x (B, n, C), contiguous: y, and with `weight_grad` (epilogue 2) the weight gradient
    too. The first `unit_channels` of the SiLU in unit groups of `unit_size` (0: none; see conv_kernel)."""
    (B, n, C), W = x.shape, taps.shape[0]
    BT, BC, warps, per_program = WEIGHT_GRAD_TILE if weight_grad else TILE
    BC = max(BC, unit_size)
    y = torch.empty_like(x)
    programs, WP = cdiv(n, BT * per_program), pow2(W, 1)
    gw = x.new_empty(B * programs, WP, C, dtype=torch.float32) if weight_grad else None  # rows past W never written
    if y.numel():
        docs = x if documents is None else documents  # placeholder pointers where a flag leaves an argument unused
        gy_arg, gw_arg = (x if t is None else t for t in (gy, gw))
        conv_kernel[(programs, cdiv(C, BC), B)](x, taps, docs, y, gy_arg, gw_arg, n, C, W, WP, BT, BC,
                                                documents is not None, ahead, epilogue, weight_grad, per_program,
                                                unit_channels, unit_size, num_warps=warps)  # fmt: skip
    if not weight_grad:
        return y
    return y, gw[:, :W].sum(0) if gw.numel() else x.new_zeros(W, C, dtype=torch.float32)


def _forward(x: Tensor, weight: Tensor, documents: Optional[Tensor], unit_channels: int, unit_size: int) -> Tensor:
    """silu(conv) (B, n, C) in x's dtype, its first `unit_channels` scaled to unit length in groups of `unit_size`."""
    docs = None if documents is None else documents.contiguous()
    return _conv(x.contiguous(), _taps(weight), docs, epilogue=1, unit_channels=unit_channels, unit_size=unit_size)


conv_silu_forward = torch.library.custom_op(f"{NAMESPACE}::conv_silu_forward", _forward, mutates_args=())


@conv_silu_forward.register_fake
def _(x, weight, documents, unit_channels, unit_size):
    return x.new_empty(x.shape)


def _backward(x: Tensor, weight: Tensor, documents: Optional[Tensor], unit_channels: int, unit_size: int,
              gy: Tensor) -> Tuple[Tensor, Tensor]:  # fmt: skip
    """(gx in x's dtype, gw in weight's shape and dtype): the pre-activation's gradient (the forward recomputed) with
    the weight gradient from the same tiles, then the input gradient as a convolution of it looking ahead."""
    x, gy = x.contiguous(), gy.contiguous()
    docs = None if documents is None else documents.contiguous()
    taps = _taps(weight)
    gpre, gw = _conv(x, taps, docs, epilogue=2, gy=gy, weight_grad=True, unit_channels=unit_channels,
                     unit_size=unit_size)  # fmt: skip
    gx = _conv(gpre, taps, docs, ahead=True)
    return gx, gw.T.contiguous().view(weight.shape).to(weight.dtype)


conv_silu_backward = torch.library.custom_op(f"{NAMESPACE}::conv_silu_backward", _backward, mutates_args=())


@conv_silu_backward.register_fake
def _(x, weight, documents, unit_channels, unit_size, gy):
    # contiguous, as the kernels write them (empty_like would copy a saved input's layout, which Inductor may permute)
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3])
    ctx.unit = inputs[3:]


def _backward_by(backward_fn):
    """The autograd backward, computed by the op (traced) or by its plain function (eager)."""

    def autograd_backward(ctx, gy):
        x, weight, documents = ctx.saved_tensors
        return (*backward_fn(x, weight, documents, *ctx.unit, gy), None, None, None)

    return autograd_backward


conv_silu_forward.register_autograd(_backward_by(conv_silu_backward), setup_context=_setup_context)


class _EagerConvSilu(torch.autograd.Function):
    """The same forward and backward as the ops, without their dispatch (host time paid in every layer)."""

    @staticmethod
    def forward(ctx, *inputs):
        _setup_context(ctx, inputs, None)
        return _forward(*inputs)

    backward = staticmethod(_backward_by(_backward))


def to_unit_groups(y: Tensor, channels: int, size: int) -> Tensor:
    """y (…, C) with its first `channels` scaled to unit length in groups of `size`, x / max(‖x‖, 1e-12) worked out
    in float32 at least: the scaling the kernels fuse, for the reference and for group sizes they do not take."""
    if not channels:
        return y
    head = y[..., :channels].unflatten(-1, (-1, size))
    head = F.normalize(head if y.dtype == torch.float64 else head.float(), dim=-1).flatten(-2).to(y.dtype)
    return torch.cat([head, y[..., channels:]], dim=-1)


def short_conv_silu_reference(x: Tensor, weight: Tensor, documents: Optional[Tensor] = None,
                              unit_groups: Optional[Tuple[int, int]] = None) -> Tensor:  # fmt: skip
    """short_conv_silu in plain PyTorch, any device and dtype, differentiable by autograd (no argument checks): what
    the kernels are tested against, and what short_conv_silu runs where they do not."""
    y = F.silu(causal_conv(F.pad(x, (0, 0, weight.shape[-1] - 1, 0)), weight, documents))
    return to_unit_groups(y, *(unit_groups or (0, 1)))


def _describe(t) -> str:
    return f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check(x, weight, documents, unit_groups):
    """ValueError naming the first argument the kernels cannot take."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.dtype not in FLOAT_DTYPES or x.shape[1] < 1:
        raise ValueError(f"x must be a 3-D floating tensor (B, n, C) with n ≥ 1 (float16, bfloat16, float32 or "
                         f"float64), got {_describe(x)}")  # fmt: skip
    B, n, C = x.shape
    if (not isinstance(weight, torch.Tensor) or weight.dtype not in FLOAT_DTYPES or weight.dim() != 3
            or weight.shape[:2] != (C, 1) or not 1 <= weight.shape[2] <= MAX_WIDTH):  # fmt: skip
        raise ValueError(f"weight must be a floating tensor (C={C}, 1, W) with 1 ≤ W ≤ {MAX_WIDTH}, "
                         f"got {_describe(weight)}")  # fmt: skip
    if weight.device != x.device:
        raise ValueError(f"weight must be on x's device {x.device}, got {weight.device}")
    if unit_groups is not None:
        ok = isinstance(unit_groups, tuple) and len(unit_groups) == 2 and all(isinstance(i, int) for i in unit_groups)
        if not (ok and unit_groups[1] >= 1 and 0 <= unit_groups[0] <= C and unit_groups[0] % unit_groups[1] == 0):
            raise ValueError(f"unit_groups must be None or (channels, size): integers with size ≥ 1 dividing channels "
                             f"and 0 ≤ channels ≤ C={C}, got {unit_groups!r}")  # fmt: skip
    if documents is None:
        return
    if (not isinstance(documents, torch.Tensor) or documents.shape != (B, n) or documents.dtype.is_floating_point
            or documents.dtype.is_complex or documents.dtype == torch.bool):  # fmt: skip
        raise ValueError(f"documents must be None or an integer tensor of shape (B, n) = {(B, n)}, "
                         f"got {_describe(documents)}")  # fmt: skip
    if documents.device != x.device:
        raise ValueError(f"documents must be on x's device {x.device}, got {documents.device}")


def short_conv_silu(x: Tensor, weight: Tensor, documents: Optional[Tensor] = None,
                    unit_groups: Optional[Tuple[int, int]] = None) -> Tensor:  # fmt: skip
    """silu of the causal depthwise convolution of x (B, n, C) with taps `weight` (C, 1, W), zero inputs before the
    first token and, with `documents` (B, n), none from an earlier packed document: (B, n, C) in x's dtype.
    `unit_groups` (channels, size): the output's first `channels` scaled to unit length in groups of `size` (DeltaNet's
    q and keys), in the kernels' epilogues where `size` is a power of two up to 256.

    Differentiable in x and weight. The Triton kernels run for float16, bfloat16 and float32 x on a GPU, or anywhere
    under TRITON_INTERPRET=1 (fp32 sums, SiLU on the fp32 pre-activation); otherwise, and for float64, the PyTorch
    reference. Under torch.compile the kernels are custom ops: one opaque node each for the forward and backward.
    """
    _check(x, weight, documents, unit_groups)
    channels, size = unit_groups or (0, 1)
    if x.dtype == torch.float64 or not (x.is_cuda or interpreting()):
        return short_conv_silu_reference(x, weight, documents, unit_groups)
    fused = size == pow2(size, 1) and size <= MAX_UNIT_GROUP
    inputs = (x.contiguous(), weight, documents, channels if fused else 0, size if fused else 1)
    y = conv_silu_forward(*inputs) if torch.compiler.is_compiling() else _EagerConvSilu.apply(*inputs)
    return y if fused else to_unit_groups(y, channels, size)
