"""Shared fixtures: the device Triton kernels run on, the kernel benchmark scripts as modules, and a fresh virtualenv
without this package for remote-code loading tests; the devices a test runs on and the relative error it measures."""

import importlib
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REMOTE_CODE_PACKAGES = ["torch", "triton", "transformers", "safetensors", "tokenizers"]
CUDA = torch.cuda.is_available()
# the CPU always (Triton kernels in the interpreter), the GPU where there is one
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU"))]


def rel(a, b):
    """‖a − b‖ / ‖b‖, in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture
def triton_env(monkeypatch, request):
    """Device for Triton kernels: the interpreter on CPU, rounding as the GPU does (round_as_on_the_gpu), or the GPU
    when the test asks for cuda (parametrize it indirectly); flowhn_kernels reads TRITON_INTERPRET at each launch."""
    device = request.param if hasattr(request, "param") else "cpu"
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        round_as_on_the_gpu(monkeypatch)
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return device


def round_as_on_the_gpu(monkeypatch):
    """Make Triton's interpreter round 16-bit floats as Hopper does, so that bf16 errors measured on the CPU are the
    GPU's (kernels/benchmarks/NOTES.md v18): fp32 -> bf16 casts and stores round to nearest even (the interpreter
    drops the low bits), tl.dot takes bf16 operands as the compiled kernels do (utils.dot_dtype gives the interpreter
    fp32 ones, since it cannot multiply bf16), and fp32 operands of a one-pass "tf32" product lose their low 13 bits,
    as the tensor cores read them. Written against triton 3.6's interpreter (constraints.txt pins it)."""
    import numpy as np
    import torch
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    import flowhn_kernels as fk

    cast = InterpreterBuilder.cast_impl

    def bf16_bits(x):
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16)
        return x.view(torch.int16).numpy().view(np.uint16)

    def rounded_cast(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return TensorHandle(bf16_bits(src.data), dst_type.scalar)
        return cast(self, src, dst_type)

    def operand(x):
        if x.dtype == tl.bfloat16:
            return (np.asarray(x.data).astype(np.uint32) << 16).view(np.float32)
        return x.data

    def tf32(a):
        return (np.ascontiguousarray(a, dtype=np.float32).view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        x, y = operand(a), operand(b)
        if a.dtype == tl.float32 and b.dtype == tl.float32 and str(input_precision).upper().endswith("TF32"):
            x, y = tf32(x), tf32(y)
        return TensorHandle(np.matmul(x, y, dtype=d.data.dtype) + d.data, d.dtype.scalar)

    monkeypatch.setattr(InterpreterBuilder, "cast_impl", rounded_cast)
    monkeypatch.setattr(InterpreterBuilder, "create_dot", dot)
    monkeypatch.setattr(fk.chunk, "dot_dtype", lambda dtype: fk.utils._DOT_DTYPES[dtype])


@pytest.fixture
def benchmark_script():
    """Import a script of kernels/benchmarks by name, as those scripts import each other (their folder on the path)."""
    folder = str(REPO / "kernels" / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module


@pytest.fixture(scope="session")
def bare_python(tmp_path_factory) -> Path:
    """Python of a new virtualenv holding torch, triton and transformers but not flowhn.

    Versions come from the repo's constraints.txt, so pip takes them from its cache.
    """
    env_dir = tmp_path_factory.mktemp("bare-venv")
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "-c", str(REPO / "constraints.txt"), *REMOTE_CODE_PACKAGES],
        check=True,
    )
    probe = run_bare(python, "import flowhn_hf", env_dir)
    assert probe.returncode != 0, "the bare virtualenv must not see flowhn_hf"
    return python


def run_bare(python: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `code` with the bare interpreter, outside the repo so nothing of it is importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([str(python), "-c", code], cwd=cwd, env=env, capture_output=True, text=True)
