"""Shared fixtures: the device Triton kernels run on, the kernel benchmark scripts as modules, and a fresh virtualenv
without this package for remote-code loading tests."""

import importlib
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REMOTE_CODE_PACKAGES = ["torch", "triton", "transformers", "safetensors", "tokenizers"]


@pytest.fixture
def triton_env(monkeypatch, request):
    """Device for Triton kernels: the interpreter on CPU, the GPU when the test asks for cuda (parametrize it
    indirectly); flowhn_kernels reads TRITON_INTERPRET at each launch."""
    device = request.param if hasattr(request, "param") else "cpu"
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return device


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
