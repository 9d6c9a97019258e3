"""The LM head's softmax cross-entropy kernel against float64 autograd, in the interpreter on CPU (and on a GPU)."""

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES
from flowhn_kernels import cross_entropy, softmax_cross_entropy, softmax_cross_entropy_reference

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def expected(logits, labels):
    """Per-row loss and d(summed loss)/d logits by autograd in float64, ignored rows zero."""
    x = logits.double().requires_grad_()
    loss = F.cross_entropy(x, labels, ignore_index=-100, reduction="none")
    loss.sum().backward()
    return x.grad, loss.detach()


def relative(got, want):
    """‖got − want‖ / ‖want‖, against 1 where want is all zeros (a one-word vocabulary)."""
    return ((got.double() - want).norm() / want.norm().clamp(min=1)).item()


@pytest.mark.parametrize("triton_env", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("vocab", [1, 37, 2 * cross_entropy.LAUNCH.block + 5])
def test_kernel_against_float64(triton_env, dtype, vocab):
    torch.manual_seed(vocab)
    rows = 7 if triton_env == "cpu" else 300
    logits = (3 * torch.randn(rows, vocab)).to(dtype).to(triton_env)
    labels = torch.randint(0, vocab, (rows,), device=triton_env)
    labels[1] = -100
    grad, loss = softmax_cross_entropy(logits, labels)
    want_grad, want_loss = expected(logits, labels)
    assert grad.dtype == dtype and loss.dtype == torch.float32
    assert torch.isfinite(grad).all() and torch.isfinite(loss).all()
    assert relative(loss, want_loss) < 1e-5
    assert relative(grad, want_grad) < TOL[dtype]
    assert (grad[1] == 0).all() and loss[1] == 0


@pytest.mark.parametrize("triton_env", DEVICES, indirect=True)
@pytest.mark.parametrize("launch", [(16, 1), (16, 2), (64, 4)], ids=str)
def test_every_launch_gives_the_same_rows(triton_env, launch, monkeypatch):
    """The launch settings that bench_cross_entropy.py --settings times: blocks smaller than the row, so that both
    passes walk several, the first from the partial block at the row's end."""
    monkeypatch.setattr(cross_entropy, "LAUNCH", cross_entropy.Launch(*launch))
    torch.manual_seed(1)
    logits = (3 * torch.randn(5, 200)).to(triton_env)
    labels = torch.tensor([199, -100, 0, 64, 17], device=triton_env)
    grad, loss = softmax_cross_entropy(logits, labels)
    want_grad, want_loss = expected(logits, labels)
    assert relative(loss, want_loss) < 1e-5 and relative(grad, want_grad) < TOL[torch.float32]
    assert (grad[1] == 0).all() and loss[1] == 0


def test_cpu_path_is_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    logits, labels = torch.randn(5, 11), torch.tensor([3, -100, 0, 10, 4])
    for got, want in zip(softmax_cross_entropy(logits, labels), softmax_cross_entropy_reference(logits, labels)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    want_grad, want_loss = expected(logits, labels)
    torch.testing.assert_close(softmax_cross_entropy(logits, labels)[0].double(), want_grad)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="logits"):
        softmax_cross_entropy(torch.randn(2, 3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        softmax_cross_entropy(torch.randn(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        softmax_cross_entropy(torch.randn(2, 3), torch.zeros(2))


@pytest.mark.parametrize("triton_env", ["cpu"], indirect=True)
def test_op_passes_torch_library_opcheck(triton_env):
    logits, labels = torch.randn(4, 50), torch.tensor([1, -100, 49, 0])
    torch.library.opcheck(cross_entropy.xent_op, (logits, labels), test_utils=("test_schema", "test_faketensor",
                                                                            "test_aot_dispatch_static"))  # fmt: skip


def test_benchmark_script_runs(benchmark_script, monkeypatch):
    """kernels/benchmarks/bench_cross_entropy.py, tiny and interpreted (its --smoke mode sets TRITON_INTERPRET)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert benchmark_script("bench_cross_entropy").main(["--smoke"]) < 1e-2
