"""throughput.py with Inductor's per-kernel bandwidth report: which generated kernels run below the memory's rate.

Run with TORCHINDUCTOR_PROFILE=1 and TORCHINDUCTOR_PROFILE_OUTPUT=FILE (CUDA only: the report times Triton kernels)
and throughput's own arguments, e.g.

    TORCHINDUCTOR_PROFILE=1 TORCHINDUCTOR_PROFILE_OUTPUT=bandwidth.txt \
        python -m training.benchmarks.inductor_bandwidth --compile on --compile-mode default --models flowhn-FAC \
        --warmup 1 --steps 1 --decode-batch-sizes '' --no-calibrate

Inductor then times each kernel of every compiled graph once and writes its bytes (its own count of the kernel's
reads and writes) and GB/s. torch 2.11 calls the generated module's `benchmark_compiled_module` without the inputs it
takes ("missing 1 required positional argument: 'args'"; torch 2.13 passes them), so each module loaded here gets
them from its own `get_args`. Not under CUDA graphs (`--compile-mode default`): the report launches kernels one by one.
"""

import runpy
import sys

from torch._inductor import codecache

_load = codecache.PyCodeCache.load_by_key_path


def _load_with_benchmark_inputs(*args, **kwargs):
    module = _load(*args, **kwargs)
    bench = getattr(module, "benchmark_compiled_module", None)
    if bench is not None and hasattr(module, "get_args"):
        module.benchmark_compiled_module = lambda *a, **kw: bench(*(a or (module.get_args(),)), **kw)
    return module


if __name__ == "__main__":
    codecache.PyCodeCache.load_by_key_path = staticmethod(_load_with_benchmark_inputs)
    sys.argv[0] = "throughput"
    runpy.run_module("training.benchmarks.throughput", run_name="__main__")
