"""Helpers shared by the Triton modules: interpreter-aware kernel launching and block sizes."""

import os

import torch
import triton


def interpreting() -> bool:
    """Whether Triton kernels should run in the interpreter (TRITON_INTERPRET=1, read at launch)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class kernel:
    """A Triton kernel that picks the compiled or the interpreted form when it is launched.

    triton.jit decides at decoration (import) time from TRITON_INTERPRET; deciding per launch
    keeps CPU tests valid whatever order pytest imports modules in. Kernels built this way must
    not call jitted functions, triton.language's own included (tl.sum, tl.zeros, tl.cdiv): those
    were decided at triton's import. Use tl.full, row sums as products with ones, and while loops
    for run-time trip counts (the interpreter cannot index with its 1-element scalars).
    """

    def __init__(self, fn):
        self.fn = fn
        self._forms = {}

    def _form(self):
        interp = interpreting()
        if interp not in self._forms:
            if interp:
                from triton.runtime.interpreter import InterpretedFunction

                self._forms[interp] = InterpretedFunction(self.fn)
            else:
                self._forms[interp] = triton.runtime.jit.JITFunction(self.fn)
        return self._forms[interp]

    def __getitem__(self, grid):
        return self._form()[grid]


def pow2(n: int, least: int = 16) -> int:
    """Smallest power of two ≥ max(n, least): Triton block shapes (and tl.dot's 16) need it."""
    return max(triton.next_power_of_2(n), least)


def dot_dtype(dtype):
    """Triton dtype for tl.dot operands: the input dtype, or float32 for bfloat16 under the
    interpreter (which stores bfloat16 as raw 16-bit integers and cannot multiply them)."""
    import triton.language as tl

    if dtype == torch.bfloat16:
        return tl.float32 if interpreting() else tl.bfloat16
    return {torch.float16: tl.float16, torch.float32: tl.float32}[dtype]



def dot_precision(dtype) -> str:
    """tl.dot precision for fp32 operands: "tf32x3" (near fp32) for fp32 inputs, one tf32 pass
    otherwise, where the inputs themselves carry fewer bits than tf32."""
    return "tf32x3" if dtype == torch.float32 else "tf32"
