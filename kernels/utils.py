"""Helpers shared by the Triton modules: interpreter-aware kernel launching, block sizes, custom-op namespaces."""

import contextlib
import functools
import os
import re

import torch
import triton
import triton.language as tl


def op_namespace(module_name: str) -> str:
    """A torch.library namespace for the custom ops of module `module_name`: a Hub checkpoint's flat copy of the code
    imports under another module name than the installed package, and registers its own ops beside the package's."""
    return "flowhn_" + re.sub(r"\W", "_", module_name)


# What every compiled launch asks Triton for: fused multiply-adds, as the kernels were tested and timed (Triton's
# default until 3.10 turns it off; 3.9 warns in every process that does not say)
COMPILE_OPTIONS = {"enable_fp_fusion": True}


def interpreting() -> bool:
    """Whether Triton kernels should run in the interpreter (TRITON_INTERPRET=1, read at launch)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class kernel:
    """A Triton kernel that picks the compiled or the interpreted form when it is launched.

    triton.jit decides at decoration (import) time from TRITON_INTERPRET; deciding per launch
    keeps CPU tests valid whatever order pytest imports modules in. triton.language's own jitted
    helpers (tl.sum, tl.cdiv, ...) were decided at triton's import too: an interpreted launch swaps
    in their interpreted forms for its duration. `do_not_specialize`: integer arguments Triton
    compiles no variants for (see Repeats).
    """

    def __init__(self, fn, do_not_specialize=()):
        self.fn, self.do_not_specialize = fn, do_not_specialize
        self.arity = fn.__code__.co_argcount
        self._forms = {}

    def jit(self):
        """A new compiled form, with its own cache of compiled kernels."""
        return triton.runtime.jit.JITFunction(self.fn, do_not_specialize=self.do_not_specialize)

    def _form(self, interp):
        if interp not in self._forms:
            if interp:
                from triton.runtime.interpreter import InterpretedFunction

                self._forms[interp] = InterpretedFunction(self.fn)
            else:
                self._forms[interp] = self.jit()
        return self._forms[interp]

    def __getitem__(self, grid):
        interp = interpreting()
        launcher = self._form(interp)[grid]
        if not interp:
            return functools.partial(launcher, **COMPILE_OPTIONS)

        def interpreted(*args, **kwargs):
            with _interpreted_language():
                return launcher(*args, **kwargs)

        return interpreted


class Repeats:
    """Launches of one kernel within one call: the first launch of each `key` goes through Triton's dispatch, the
    others straight to the compiled kernel it returned, by Triton's own runner (3-4 µs of host time a launch on the
    CPU box against 10-13 through the dispatch; kernels/benchmarks/NOTES.md v17). Every argument is passed,
    constexprs included, as the dispatch passes them to the same runner.

    The caller's promise: launches with one key differ only in their grid and in arguments the kernel does not
    specialise on (`do_not_specialize`), and pass the same tensors. (A key worked out here from every argument's id
    would keep that promise itself, but costs ~1.5 µs a launch, half of what the runner saves at 4 windows.)"""

    def __init__(self, kern: kernel):
        self.kernel, self._compiled = kern, {}

    def __call__(self, grid, *args, key=None, **options):
        compiled = self._compiled.get(key)
        if compiled is None:
            if len(args) != self.kernel.arity:  # the runner takes no defaults
                raise TypeError(f"{self.kernel.fn.__name__} takes {self.kernel.arity} arguments, got {len(args)}")
            compiled = self.kernel[grid](*args, **options)
            if compiled is not None:  # (the interpreter's launches return None: each one goes through it)
                self._compiled[key] = compiled
        else:
            compiled[tuple(grid) + (1,) * (3 - len(grid))](*args)


class device_function(triton.runtime.jit.JITFunction):
    """A jitted helper for our kernels that their interpreted forms can call as well: compiled kernels inline it
    as any JITFunction; under the interpreter a call runs its interpreted form (a plain JITFunction refuses calls)."""

    @functools.cached_property
    def _interpreted(self):
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(self.fn)

    def __call__(self, *args, **kwargs):
        return self._interpreted(*args, **kwargs)


@functools.cache
def _interpreted_helpers():
    """(module, name, interpreted form) for every jitted helper of triton.language."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return [(module, name, InterpretedFunction(value.fn)) for module in (tl, tl.standard)
            for name, value in vars(module).items() if isinstance(value, JITFunction)]  # fmt: skip


def _patched_namespaces():
    """What an interpreted launch patches: triton.language's namespaces, and the interpreter's own (see
    _patch_lang_tensor)."""
    from triton.runtime import interpreter

    names = [tl, tl.core, tl.math, tl.standard, tl.core.tensor, getattr(tl.core, "tensor_descriptor_base", None)]
    return [ns for ns in names if ns is not None] + [interpreter]


def _patch_lang_tensor(patch):
    """The interpreter's patch of tl.tensor, plus an __index__ that takes a scalar held as a 1-element array: the
    interpreter's own calls int() on the array, which NumPy 2 refuses, so `range(n)` failed for a loaded n."""

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    return patched


@contextlib.contextmanager
def _interpreted_language():
    """Interpreted helpers for one launch, and triton.language exactly as it was afterwards.

    Triton 3.6's interpreter patches triton.language's builtins for a kernel and restores them, but a call of an
    interpreted helper from inside the kernel patches them again (tl.core's among them) and never restores: a kernel
    compiled later in the same process then fails in code generation. Every attribute is put back as it was.
    """
    from triton.runtime import interpreter

    saved = [(ns, dict(vars(ns))) for ns in _patched_namespaces()]
    for module, name, interpreted in _interpreted_helpers():
        setattr(module, name, interpreted)
    interpreter._patch_lang_tensor = _patch_lang_tensor(interpreter._patch_lang_tensor)
    try:
        yield
    finally:
        for ns, before in saved:
            for name in [n for n in vars(ns) if n not in before]:
                delattr(ns, name)
            for name, value in before.items():
                if vars(ns).get(name) is not value:
                    setattr(ns, name, value)
        # A helper's rewritten form runs in its module's globals, into which the interpreter put its own names
        # (interpreter_semantic, ...) when it rewrote it; those names are gone now, so the rewrite must be redone.
        restored = [vars(ns) for ns, _ in saved]
        cache = interpreter.InterpretedFunction.rewritten_fn
        for fn in [fn for fn in cache if any(getattr(fn, "__globals__", None) is g for g in restored)]:
            del cache[fn]


def pow2(n: int, least: int = 16) -> int:
    """Smallest power of two ≥ max(n, least): Triton block shapes (and tl.dot's 16) need it. (Not
    triton.next_power_of_2: a constexpr function, microseconds of host time a call, paid every launch.)"""
    return max(1 << (n - 1).bit_length(), least)


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for launch grids (not triton.cdiv, for the same reason as pow2)."""
    return -(-a // b)


_DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def dot_dtype(dtype):
    """Triton dtype for tl.dot operands: the input dtype, or float32 for bfloat16 under the
    interpreter (which stores bfloat16 as raw 16-bit integers and cannot multiply them)."""
    if dtype == torch.bfloat16 and interpreting():
        return tl.float32
    return _DOT_DTYPES[dtype]


def dot_precision(dtype) -> str:
    """tl.dot precision for fp32 operands: "tf32x3" (near fp32) for fp32 inputs, one tf32 pass
    otherwise, where the inputs themselves carry fewer bits than tf32."""
    return "tf32x3" if dtype == torch.float32 else "tf32"
