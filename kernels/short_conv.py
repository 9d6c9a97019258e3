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


@kernel
def conv_kernel(x, taps, documents, y, gy, gw, n, C, W: tl.constexpr, WP: tl.constexpr, BT: tl.constexpr,
                BC: tl.constexpr, HAS_DOCS: tl.constexpr, AHEAD: tl.constexpr, EPILOGUE: tl.constexpr,
                WEIGHT_GRAD: tl.constexpr, TILES: tl.constexpr):
    """One tile of BT tokens × BC channels of one sequence: acc[t] = Σ_back taps[W − 1 − back] · x[t − back], or
    with AHEAD x[t + back]; terms outside the sequence or t's document are zero; fp32 sums. y = acc (EPILOGUE 0),
    silu(acc) (1: the forward) or gy · silu'(acc) (2: the pre-activation's gradient, acc recomputed). A program takes
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
        if EPILOGUE == 1:
            acc = acc * tl.sigmoid(acc)
        if EPILOGUE == 2:
            sig = tl.sigmoid(acc)
            dy = tl.load(gy + at + rows[:, None] * C, mask=tile_ok, other=0.0).to(tl.float32)
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


def _conv(x: Tensor, taps: Tensor, documents: Optional[Tensor], ahead=False, epilogue=0, gy=None, weight_grad=False):
    """conv_kernel over all of x (B, n, C), contiguous: y, and with `weight_grad` (epilogue 2) the weight gradient
    too."""
    (B, n, C), W = x.shape, taps.shape[0]
    BT, BC, warps, per_program = WEIGHT_GRAD_TILE if weight_grad else TILE
    y = torch.empty_like(x)
    programs, WP = cdiv(n, BT * per_program), pow2(W, 1)
    gw = x.new_empty(B * programs, WP, C, dtype=torch.float32) if weight_grad else None  # rows past W never written
    if y.numel():
        docs = x if documents is None else documents  # placeholder pointers where a flag leaves an argument unused
        gy_arg, gw_arg = (x if t is None else t for t in (gy, gw))
        conv_kernel[(programs, cdiv(C, BC), B)](x, taps, docs, y, gy_arg, gw_arg, n, C, W, WP, BT, BC,
                                                documents is not None, ahead, epilogue, weight_grad, per_program,
                                                num_warps=warps)  # fmt: skip
    if not weight_grad:
        return y
    return y, gw[:, :W].sum(0) if gw.numel() else x.new_zeros(W, C, dtype=torch.float32)


def _forward(x: Tensor, weight: Tensor, documents: Optional[Tensor]) -> Tensor:
    """silu(conv) (B, n, C) in x's dtype."""
    docs = None if documents is None else documents.contiguous()
    return _conv(x.contiguous(), _taps(weight), docs, epilogue=1)


conv_silu_forward = torch.library.custom_op(f"{NAMESPACE}::conv_silu_forward", _forward, mutates_args=())


@conv_silu_forward.register_fake
def _(x, weight, documents):
    return x.new_empty(x.shape)


def _backward(x: Tensor, weight: Tensor, documents: Optional[Tensor], gy: Tensor) -> Tuple[Tensor, Tensor]:
    """(gx in x's dtype, gw in weight's shape and dtype): the pre-activation's gradient (the forward recomputed) with
    the weight gradient from the same tiles, then the input gradient as a convolution of it looking ahead."""
    x, gy = x.contiguous(), gy.contiguous()
    docs = None if documents is None else documents.contiguous()
    taps = _taps(weight)
    gpre, gw = _conv(x, taps, docs, epilogue=2, gy=gy, weight_grad=True)
    gx = _conv(gpre, taps, docs, ahead=True)
    return gx, gw.T.contiguous().view(weight.shape).to(weight.dtype)


conv_silu_backward = torch.library.custom_op(f"{NAMESPACE}::conv_silu_backward", _backward, mutates_args=())


@conv_silu_backward.register_fake
def _(x, weight, documents, gy):
    # contiguous, as the kernels write them (empty_like would copy a saved input's layout, which Inductor may permute)
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_by(backward_fn):
    """The autograd backward, computed by the op (traced) or by its plain function (eager)."""

    def autograd_backward(ctx, gy):
        x, weight, documents = ctx.saved_tensors
        return (*backward_fn(x, weight, documents, gy), None)

    return autograd_backward


conv_silu_forward.register_autograd(_backward_by(conv_silu_backward), setup_context=_setup_context)


class _EagerConvSilu(torch.autograd.Function):
    """The same forward and backward as the ops, without their dispatch (host time paid in every layer)."""

    @staticmethod
    def forward(ctx, *inputs):
        _setup_context(ctx, inputs, None)
        return _forward(*inputs)

    backward = staticmethod(_backward_by(_backward))


def _describe(t) -> str:
    return f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check(x, weight, documents):
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
    if documents is None:
        return
    if (not isinstance(documents, torch.Tensor) or documents.shape != (B, n) or documents.dtype.is_floating_point
            or documents.dtype.is_complex or documents.dtype == torch.bool):  # fmt: skip
        raise ValueError(f"documents must be None or an integer tensor of shape (B, n) = {(B, n)}, "
                         f"got {_describe(documents)}")  # fmt: skip
    if documents.device != x.device:
        raise ValueError(f"documents must be on x's device {x.device}, got {documents.device}")


def short_conv_silu(x: Tensor, weight: Tensor, documents: Optional[Tensor] = None) -> Tensor:
    """silu of the causal depthwise convolution of x (B, n, C) with taps `weight` (C, 1, W), zero inputs before the
    first token and, with `documents` (B, n), none from an earlier packed document: (B, n, C) in x's dtype.

    Differentiable in x and weight. The Triton kernels run for float16, bfloat16 and float32 x on a GPU, or anywhere
    under TRITON_INTERPRET=1 (fp32 sums, SiLU on the fp32 pre-activation); otherwise, and for float64, the PyTorch
    reference. Under torch.compile the kernels are custom ops: one opaque node each for the forward and backward.
    """
    _check(x, weight, documents)
    if x.dtype == torch.float64 or not (x.is_cuda or interpreting()):
        return F.silu(causal_conv(F.pad(x, (0, 0, weight.shape[-1] - 1, 0)), weight, documents))
    inputs = (x.contiguous(), weight, documents)
    return conv_silu_forward(*inputs) if torch.compiler.is_compiling() else _EagerConvSilu.apply(*inputs)
