"""throughput.py with Inductor's per-kernel bandwidth report: which generated kernels run below the memory's rate.

Run with TORCHINDUCTOR_PROFILE=1 and TORCHINDUCTOR_PROFILE_OUTPUT=FILE (CUDA only: the report times Triton kernels)
and throughput's own arguments, e.g.

    TORCHINDUCTOR_PROFILE=1 TORCHINDUCTOR_PROFILE_OUTPUT=bandwidth.txt \
        python -m training.benchmarks.inductor_bandwidth --compile on --compile-mode default --models flowhn-FAC \
        --warmup 1 --steps 1 --decode-batch-sizes '' --no-calibrate

Inductor then times each kernel of every compiled graph once and writes its bytes (its own count of the kernel's
reads and writes) and GB/s. torch 2.11 calls the generated module's `benchmark_compiled_module` without the inputs it
takes ("missing 1 required positional argument: 'args'"; torch 2.13 passes them), so each module loaded here gets
them from its own `get_args`. Each row of throughput.py runs in a child process, so the children run this
script too (`child_command`), and the loader is replaced there, where Inductor compiles. Not under CUDA graphs
(`--compile-mode default`): the report launches kernels one by one.
"""

import sys

from torch._inductor import codecache

from training.benchmarks import throughput

_load = codecache.PyCodeCache.load_by_key_path


def _load_with_benchmark_inputs(*args, **kwargs):
    module = _load(*args, **kwargs)
    bench = getattr(module, "benchmark_compiled_module", None)
    if bench is not None:
        if not hasattr(module, "get_args"):
            raise RuntimeError("inductor_bandwidth: this torch's generated module has no get_args() to build the "
                               "benchmark's inputs; run throughput.py with TORCHINDUCTOR_PROFILE on its own")
        module.benchmark_compiled_module = lambda *a, **kw: bench(*(a or (module.get_args(),)), **kw)
    return module


def child_command(argv):
    """A row's child process: this script, so that the child's Inductor loads its modules through the mend."""
    return [sys.executable, "-m", "training.benchmarks.inductor_bandwidth", *argv]


if __name__ == "__main__":
    codecache.PyCodeCache.load_by_key_path = staticmethod(_load_with_benchmark_inputs)
    throughput.child_command = child_command
    throughput.main()
