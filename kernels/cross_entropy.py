"""Softmax cross-entropy of a block of logits and its gradient, in one Triton kernel.

The LM head's loss (flowhn_hf's LinearCrossEntropy) works through the tokens a chunk at a time: logits = h Wᵀ, then
each row's loss lse − logit[target] and the gradient softmax − onehot, which the next two products consume. Left to
Inductor that middle step took two kernels and 0.49 ms per 2048 × 49,152 chunk on an H200 (7.8 ms of an 88 ms
135M training step); its floor is two reads of the logits and one write of the gradient. One program per row: an
online max and sum of exponentials over the row from its end, then the gradient from its start, so that the second
pass begins on the blocks the first read last. How many rows are in flight (warps a program, and so programs an SM)
decides whether the second pass finds its row still in L2 (`LAUNCH`; timed by
kernels/benchmarks/bench_cross_entropy.py --settings).
"""

from typing import NamedTuple, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import interpreting, kernel, op_namespace

IGNORE_INDEX = -100
NAMESPACE = op_namespace(__name__)


class Launch(NamedTuple):
    """The kernel's launch: vocabulary entries a program loads at once, and its warps."""

    block: int
    warps: int


# At 49,152 words, 0.190 ms a 2048-row chunk on an H100 against 0.215 at the first launch (2048 entries, 8 warps,
# first pass forwards; session 37): 132 rows in flight, 12 MB of logits, where 1,056 rows (99 MB) outran the 50 MB
# L2. Walking the first pass backwards took 2048 x 8 to 0.210 and 4096 x 16 from 0.212 to 0.199
LAUNCH = Launch(8192, 16)


@kernel
def xent_kernel(logits, labels, grad, loss, V, IGNORE: tl.constexpr, BLOCK: tl.constexpr):
    """Row `program_id`: loss = lse − logit[label], grad = softmax − onehot(label); zeros for an ignored label."""
    row = tl.program_id(0).to(tl.int64)
    src = logits + row * V
    dst = grad + row * V
    label = tl.load(labels + row)
    keep = label != IGNORE
    target = tl.maximum(label, 0)
    cols = tl.arange(0, BLOCK)
    # finite start: a lane that only ever sees masked (-inf) entries keeps exp(m - m_new) = 1 and adds exp(-inf) = 0
    m = tl.full([BLOCK], -1e30, tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    blocks = tl.cdiv(V, BLOCK)
    for i in range(0, blocks):
        start = (blocks - 1 - i) * BLOCK
        x = tl.load(src + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    top = tl.max(m, axis=0)
    lse = top + tl.log(tl.sum(s * tl.exp(m - top), axis=0))
    picked = tl.load(src + target).to(tl.float32)
    tl.store(loss + row, tl.where(keep, lse - picked, 0.0))
    for start in range(0, V, BLOCK):
        inside = start + cols < V
        p = tl.exp(tl.load(src + start + cols, mask=inside, other=0.0).to(tl.float32) - lse)
        g = tl.where(start + cols == target, p - 1.0, p)
        tl.store(dst + start + cols, tl.where(keep, g, 0.0).to(grad.dtype.element_ty), mask=inside)


def softmax_cross_entropy_reference(logits: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
    """(gradient in logits' dtype, per-row loss in float32) in plain PyTorch; labels of -100 are ignored."""
    x = logits.float()
    keep = labels != IGNORE_INDEX
    target = labels.clamp(min=0)
    lse = x.logsumexp(-1)
    loss = (lse - x.gather(1, target[:, None]).squeeze(1)) * keep
    p = (x - lse[:, None]).exp()
    onehot = torch.arange(x.shape[1], device=x.device)[None, :] == target[:, None]
    grad = torch.where(onehot, p - 1, p) * keep[:, None]
    return grad.to(logits.dtype), loss


def _softmax_cross_entropy(logits: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
    logits = logits.contiguous()
    n, V = logits.shape
    grad = torch.empty_like(logits)
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        xent_kernel[(n,)](logits, labels.contiguous(), grad, loss, V, IGNORE=IGNORE_INDEX,
                          BLOCK=min(LAUNCH.block, triton.next_power_of_2(V)), num_warps=LAUNCH.warps)
    return grad, loss


xent_op = torch.library.custom_op(f"{NAMESPACE}::softmax_cross_entropy", _softmax_cross_entropy, mutates_args=())


@xent_op.register_fake
def _(logits, labels):
    return logits.new_empty(logits.shape), logits.new_empty(logits.shape[0], dtype=torch.float32)


def softmax_cross_entropy(logits: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
    """(d loss / d logits, per-row loss) of rows `logits` (n, V) against `labels` (n,), -100 ignored (zero loss and
    gradient). Not differentiable itself: it hands back the gradient. The Triton kernel on CUDA or under
    TRITON_INTERPRET=1, the PyTorch reference otherwise."""
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits: expected a 2-D floating tensor (rows, vocabulary), got {tuple(logits.shape)} "
                         f"{logits.dtype}")  # fmt: skip
    if labels.shape != logits.shape[:1] or labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"labels: expected int64 or int32 of shape {tuple(logits.shape[:1])}, got "
                         f"{tuple(labels.shape)} {labels.dtype}")  # fmt: skip
    if logits.dtype == torch.float64 or not (logits.device.type == "cuda" or interpreting()):
        return softmax_cross_entropy_reference(logits, labels)
    return xent_op(logits, labels)
