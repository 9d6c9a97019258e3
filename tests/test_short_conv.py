"""short_conv_silu (the DeltaNet branch's short causal conv + SiLU): Triton kernels against a float64 evaluation of
short_conv_silu_reference.

On CPU the kernels run in the Triton interpreter: the `triton_env` fixture sets TRITON_INTERPRET=1 for the test only
(read at each launch). With CUDA the same tests also run compiled on the GPU. The interpreter pays per operation, so
the shapes are small: n = 130 spans three of the weight-gradient pass's 64-token tiles, C = 200 several channel blocks.
"""


import pytest
import torch

from conftest import CUDA, DEVICES, rel
from flowhn_kernels import short_conv
from flowhn_kernels.short_conv import short_conv_silu, short_conv_silu_reference

# relative error (norm) vs float64 on the same rounded inputs: the outputs' own rounding, and fp32 sums
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
# (n, C, W): one token, a tile's part, two token blocks of the backward; channels within one block and over several
SHAPES = [(1, 37, 4), (3, 200, 2), (17, 200, 4), (130, 37, 2)]


def documents_for(B, n, device):
    """Packed documents, rows differing: row 0 starts with a one-token document, row 1 holds one mid-row."""
    documents = torch.zeros(B, n, dtype=torch.long)
    for row, starts in enumerate([(1, n // 2), (n // 3, n // 3 + 1)][:B]):
        for start in starts:
            documents[row, start:] += 1
    return documents.to(device)


def run(fn, x, weight, documents, gy, unit_groups=None):
    """y, grad x and grad weight of fn on fresh leaf copies of x and weight."""
    x, weight = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    y = fn(x, weight, documents, unit_groups)
    y.backward(gy)
    return y, x.grad, weight.grad


def check(x, weight, documents, tol, unit_groups=None):
    """Forward and both gradients against the float64 reference on the same inputs and output gradient."""
    gy = torch.randn(x.shape, dtype=torch.float64, device=x.device).to(x.dtype)
    got = run(short_conv_silu, x, weight, documents, gy, unit_groups)
    want = run(short_conv_silu_reference, x.double(), weight.double(), documents, gy.double(), unit_groups)
    for name, g, w, like in zip(("y", "grad x", "grad weight"), got, want, (x, x, weight)):
        assert g.shape == like.shape and g.dtype == like.dtype, name
        assert torch.isfinite(g).all(), name
        assert rel(g, w) < tol, f"{name}: relative error {rel(g, w):.2e} > {tol:.0e}"


def make_inputs(B, n, C, W, dtype=torch.float32, device="cpu", weight_dtype=None):
    x = torch.randn(B, n, C, dtype=torch.float64).to(device, dtype)
    weight = torch.randn(C, 1, W, dtype=torch.float64).to(device, weight_dtype or dtype)
    return x, weight


@pytest.mark.parametrize("triton_env", DEVICES, indirect=True)
@pytest.mark.parametrize("packed", [False, True], ids=["one-document", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_kernels_against_float64_reference(triton_env, dtype, packed):
    torch.manual_seed(0)
    for n, C, W in SHAPES:
        x, weight = make_inputs(2, n, C, W, dtype, triton_env)
        check(x, weight, documents_for(2, n, triton_env) if packed else None, TOL[dtype])


@pytest.mark.parametrize("triton_env", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_unit_groups_against_float64_reference(triton_env, dtype):
    """The first channels scaled to unit length in groups, as DeltaNet's q and keys: in the kernels' epilogues for
    powers of two (groups within one of several channel blocks, and one group as wide as a block), after them for
    other sizes; a group of zero inputs stays zero (the norm's floor) and passes finite gradients, gy · 1e12 (beyond
    float16's range, there as for F.normalize)."""
    torch.manual_seed(5)
    for (n, C, W), groups in [((17, 200, 4), (128, 32)), ((130, 37, 2), (32, 16)), ((3, 300, 3), (256, 256)),
                              ((9, 100, 4), (96, 24))]:  # fmt: skip
        x, weight = make_inputs(2, n, C, W, dtype, triton_env)
        if dtype != torch.float16:
            x[:, :, : groups[1]] = 0
        check(x, weight, documents_for(2, n, triton_env), TOL[dtype], groups)


@pytest.mark.parametrize("triton_env", DEVICES, indirect=True)
def test_widths_weight_dtype_and_layout(triton_env):
    """W = 1 and 8, an fp32 weight on bf16 x (autocast's), non-contiguous x, int32 documents."""
    torch.manual_seed(1)
    for W in (1, 8):
        x, weight = make_inputs(2, 20, 24, W, device=triton_env)
        check(x, weight, documents_for(2, 20, triton_env).int(), TOL[torch.float32])
    x, weight = make_inputs(2, 17, 37, 4, torch.bfloat16, triton_env, weight_dtype=torch.float32)
    check(x, weight, documents_for(2, 17, triton_env), TOL[torch.bfloat16])
    x = torch.randn(2, 37, 17, device=triton_env).transpose(1, 2)
    check(x, weight, None, TOL[torch.float32])


def test_cpu_without_interpreter_runs_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(2)
    x, weight = make_inputs(2, 17, 37, 4, torch.bfloat16)
    documents = documents_for(2, 17, "cpu")
    gy = torch.randn_like(x)
    for got, want in zip(run(short_conv_silu, x, weight, documents, gy),
                         run(short_conv_silu_reference, x, weight, documents, gy)):
        assert torch.equal(got, want)


BAD = [
    (dict(x=torch.zeros(4, 37)), "x must be a 3-D floating"),
    (dict(x=torch.zeros(2, 5, 37, dtype=torch.long)), "x must be a 3-D floating"),
    (dict(x=torch.zeros(2, 0, 37)), "x must be .* n ≥ 1"),
    (dict(weight=torch.zeros(36, 1, 4)), "weight must be .*C=37"),
    (dict(weight=torch.zeros(37, 2, 4)), "weight must be"),
    (dict(weight=torch.zeros(37, 1, 9)), "weight must be .* W ≤ 8"),
    (dict(weight=torch.zeros(37, 1, 0)), "weight must be .* 1 ≤ W"),
    (dict(weight=torch.zeros(37, 1, 4, dtype=torch.long)), "weight must be a floating"),
    (dict(documents=torch.zeros(2, 6, dtype=torch.long)), r"documents must be .* \(B, n\) = \(2, 5\)"),
    (dict(documents=torch.zeros(2, 5)), "documents must be .* integer"),
    (dict(documents=torch.zeros(2, 5, dtype=torch.bool)), "documents must be .* integer"),
    (dict(unit_groups=(32, 0)), r"unit_groups must be .* size ≥ 1"),
    (dict(unit_groups=(30, 4)), r"unit_groups must be .* dividing channels"),
    (dict(unit_groups=(40, 8)), r"unit_groups must be .* ≤ C=37"),
    (dict(unit_groups=[32, 16]), r"unit_groups must be None or \(channels, size\)"),
]


@pytest.mark.parametrize("interpret", [False, True], ids=["reference", "interpreter"])
@pytest.mark.parametrize("bad,message", BAD, ids=[m.split()[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_inputs_raise_value_errors_naming_the_argument(monkeypatch, interpret, bad, message):
    monkeypatch.setenv("TRITON_INTERPRET", "1" if interpret else "0")
    args = dict(x=torch.randn(2, 5, 37), weight=torch.randn(37, 1, 4), documents=None, unit_groups=None) | bad
    with pytest.raises(ValueError, match=message):
        short_conv_silu(**args)


@pytest.mark.parametrize("triton_env", ["cpu"], indirect=True)
def test_custom_ops_pass_torch_library_opcheck(triton_env):
    """Schema, fake (meta) shapes, autograd registration and AOT dispatch, as torch.compile relies on them."""
    torch.manual_seed(3)
    x, weight = make_inputs(2, 6, 20, 3)
    documents = documents_for(2, 6, "cpu")
    for docs, unit in ((None, (0, 1)), (documents, (16, 8))):
        torch.library.opcheck(short_conv.conv_silu_forward, (x.requires_grad_(), weight.requires_grad_(), docs, *unit))
    # the backward as Inductor may call it: a saved input in another memory layout, outputs contiguous all the same
    permuted = x.detach().transpose(1, 2).contiguous().transpose(1, 2)
    backward_args = (permuted, weight.detach(), documents, 16, 8, torch.randn_like(x))
    torch.library.opcheck(short_conv.conv_silu_backward, backward_args)


@pytest.mark.parametrize("triton_env", ["cpu"], indirect=True)
def test_compiles_without_graph_breaks(triton_env):
    """fullgraph=True: the checks, the dispatch and both ops trace; the compiled function gives the eager results."""
    torch.manual_seed(4)
    x, weight = make_inputs(2, 9, 20, 4, torch.bfloat16, weight_dtype=torch.float32)
    documents = documents_for(2, 9, "cpu")
    gy = torch.randn_like(x)
    torch._dynamo.reset()
    compiled = torch.compile(short_conv_silu, fullgraph=True, backend="aot_eager")
    for unit in (None, (16, 8)):
        got, want = (run(fn, x, weight, documents, gy, unit) for fn in (compiled, short_conv_silu))
        assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_benchmark_smoke_run(monkeypatch, capsys, benchmark_script):
    """kernels/benchmarks/bench_short_conv.py --smoke: tiny shapes on the CPU, every row filled in."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the script sets it; this puts it back afterwards
    bench = benchmark_script("bench_short_conv")
    lines = bench.main(["--smoke"])
    out = capsys.readouterr().out
    assert "| B | n | C | W | documents | unit |" in out and "SMOKE" in out
    assert len(lines) == 4 * len(bench.SMOKE_SHAPES)
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 15 and all(float(t) > 0 for t in cells[7:10] + cells[11:14]), line
        assert all(float(e) < 2e-2 for e in cells[14].split(" / ")), line
