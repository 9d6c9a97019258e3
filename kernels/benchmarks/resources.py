"""Registers, spills and shared memory of every Triton kernel of delta_rule, compiled for Hopper (sm_90a) without a GPU.

Triton compiles to PTX on any machine and ships ptxas, whose report is what the device would load: registers per
thread, spill stores and loads (bytes per thread, local memory: slow), Triton's own shared-memory figure (the
H100/H200 give a block 227 KB) and from those two the blocks an SM can hold at once; nvdisasm counts the machine
instructions (SASS) of the kernel, and of its longest loop (a sequential pass's step) by opcode group: a static
measure of the work a step issues. Each kernel at key and
value width D in {64, 128}, bf16, rank R (default 1), with its launch settings (chunk.LAUNCH, recurrent.LAUNCH) and
with 8 warps, and with `--maxnreg` at those register caps (ptxas fits the kernel in fewer registers, spilling what
does not fit, so that more blocks share an SM). The narrow passes (B = 1) in their TMA form, the plain ones in their
pointer form unless --tma. Prints a markdown table; nothing runs, so it needs no device time.

    python kernels/benchmarks/resources.py [--dims 64,128] [--dtype bf16] [--rank 1]
                                            [--kernels grad_wy,prep] [--maxnreg 168,128] [--sass DIR] [--tma]

--sass DIR writes each row's SASS instructions there: two trees' listings compared with `diff -r` tell whether a
change leaves a kernel's machine code as it was (and so its earlier GPU tests and timings standing). A kernel that
gains an argument reads the later ones at other constant-bank offsets (`c[0x0][...]`); nothing else should move.
"""

import argparse
import inspect
import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from flowhn_kernels import chunk, recurrent
from flowhn_kernels.utils import COMPILE_OPTIONS, pow2

from bench_args import names, numbers

STATE_F32 = {"tinv", "init", "final", "dinit", "dfinal", "flows", "x0", "xs", "xout"}
INDEX_I32 = {"cu", "chunk_idx", "chunk_off", "seg_off"}
KERNELS = ("prep", "state_fwd", "output", "state_bwd", "grad_state", "grad_wy", "state_fwd_narrow", "state_bwd_narrow",
           "state_fwd_narrow_full", "state_bwd_narrow_full", "state_bwd_narrow16", "state_fwd_aug", "state_bwd_aug",
           "combine", "recurrent")
DTYPES = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def constexprs(name, D, dtype, R, tma=False):
    """The compile-time arguments the launch code passes at width D and rank R, by kernel. The narrow passes take
    their tiles by TMA, as at B = 1; `tma`: the plain ones too, as in sequences of chunk.TMA_MIN_CHUNKS or more."""
    bk, bv = chunk._blocks(D, D)
    bka, bva = chunk._blocks(D, 2 * D)  # the scan's flow passes run on K + V columns
    ck, cv = chunk._chunk_blocks(D, D)
    g = min(pow2(D), 64)
    rk, rv = recurrent.blocks(R, D, D)
    common = dict(UNIFORM=True, H=16, Q_HEADS=16, K_HEADS=16, R=R, K=D, V=D, RP=pow2(R, 1),
                  BT=chunk.tokens_per_chunk(R), DT=DTYPES[dtype], PREC="tf32x3" if dtype == "fp32" else "tf32",
                  TMA=False)
    # UNIFORM: a batch, as training runs them; Q_HEADS, K_HEADS: q and k contiguous, as the benchmark's
    return {
        "prep": dict(common, BK=ck, BV=cv),
        "state_fwd": dict(common, BK=bk, BV=bv, HAS_INIT=False, STORE_FINAL=False, AUG=False, VA=D, TMA=tma),
        "output": dict(common, BK=ck, BV=cv, SAVE_SCORES=D == 128),  # as at B = 1 (chunk.saves_scores)
        # the reverse pass reads the forward's scores where it runs narrowed (chunk.saves_scores), forms them at 64
        "state_bwd": dict(common, BK=bk, BV=bv, HAS_DFINAL=False, STORE_DINIT=False, AUG=False, VA=D,
                          SAVED_SCORES=False, TMA=tma),
        "state_fwd_narrow": dict(common, BK=bk, BV=min(bv, 32), HAS_INIT=False, STORE_FINAL=False, AUG=False, VA=D,
                                 TMA=True),
        "state_bwd_narrow": dict(common, BK=bk, BV=min(bv, 32), HAS_DFINAL=False, STORE_DINIT=False, AUG=False,
                                 VA=D, SAVED_SCORES=True, TMA=True),
        "state_bwd_narrow16": dict(common, BK=bk, BV=min(bv, 16), HAS_DFINAL=False, STORE_DINIT=False, AUG=False,
                                   VA=D, SAVED_SCORES=True, TMA=True),
        "grad_state": dict(common, BK=g, BV=g),
        "state_fwd_aug": dict(common, BK=bka, BV=bva, HAS_INIT=False, STORE_FINAL=True, AUG=True, VA=2 * D),
        "state_bwd_aug": dict(common, BK=bka, BV=bva, HAS_DFINAL=False, STORE_DINIT=True, AUG=True, VA=2 * D,
                              SAVED_SCORES=True),
        "combine": dict(H=16, K=D, V=D, BK=bk, BV=bv, KB=min(bk, 32), HAS_X0=True, STORE_OUT=True, REVERSE=False),
        "recurrent": dict(common, BK=rk, BV=rv, HAS_INIT=True, STORE_FINAL=True, NORMALIZE=True),  # as decoding runs
        "grad_wy": dict(common, BK=g, BV=g, CD=DTYPES[dtype] if chunk.WY_CANCELLING_16BIT else tl.float32),
    }[name.removesuffix("_full")]  # the narrow passes where they fill the GPU: the same kernels, launched otherwise


def blocks_per_sm(regs, warps, smem_bytes):
    """Blocks of a kernel one Hopper SM holds at once: 64K registers allocated per warp in units of 256, 228 KB of
    shared memory with 1 KB reserved per block, 64 warps, 32 blocks. Latency-bound kernels hide their loads across
    these blocks, so a kernel at one block an SM waits on each of them."""
    by_regs = 65536 // (-(-regs * 32 // 256) * 256) // warps
    by_smem = 228 * 1024 // (smem_bytes + 1024)
    return min(by_regs, by_smem, 64 // warps, 32)


def kernel_name(name):
    """The kernel behind a row: the scan's passes (_aug) and the narrow ones share the passes' kernels."""
    return name.removesuffix("_aug").split("_narrow")[0]


def report(name, D, dtype, R, launch, tma=False) -> dict:
    module = recurrent if name == "recurrent" else chunk
    fn = triton.runtime.jit.JITFunction(getattr(module, f"{kernel_name(name)}_kernel").fn)
    params = inspect.signature(fn.fn).parameters
    fixed = {a: v for a, v in constexprs(name, D, dtype, R, tma).items() if a in params}  # the kernel's own of the set
    signature = {}
    for arg in params:
        if arg in fixed:
            signature[arg] = "constexpr"
        elif arg.endswith("_d"):
            tile = chunk.tma_blocks(fixed["BT"], fixed["RP"], D, fixed["BV"])[arg]
            signature[arg] = f"tensordesc<{dtype}{tile}>"
        elif arg == "scale":
            signature[arg] = "fp32"
        elif arg in ("length", "c_lo", "c_hi", "chunk0", "v_stride", "q_stride", "k_stride"):
            signature[arg] = "i32"
        else:
            signature[arg] = "*fp32" if arg in STATE_F32 else "*i32" if arg in INDEX_I32 else f"*{dtype}"
    # what the JIT assumes at the anchor shapes: 16-byte aligned tensors, lengths a multiple of 16
    aligned = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a, kind in signature.items()
               if kind.startswith("*") or a in ("length", "v_stride", "q_stride", "k_stride")}
    source = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(a),): v for a, v in fixed.items()},
                       attrs=aligned)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={**launch, **COMPILE_OPTIONS})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        info = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", ptx.name, "-o", os.devnull],
                              capture_output=True, text=True, check=True).stderr
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([knobs.nvidia.nvdisasm.path, cubin.name], capture_output=True, text=True,
                              check=True).stdout
    regs = re.search(r"Used (\d+) registers", info)
    loop = main_loop(sass)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    return dict(regs=int(regs.group(1)), spill_st=int(spills.group(1)), spill_ld=int(spills.group(2)),
                smem_kb=compiled.metadata.shared / 1024,
                blocks=blocks_per_sm(int(regs.group(1)), launch["num_warps"], compiled.metadata.shared),
                instructions=len(sass_instructions(sass)[0]), loop=loop, sass=sass)


# opcode groups of the loop report: where a sequential pass's step spends its issue slots
OPCODE_GROUPS = (("integer", r"^U?(I[A-Z0-9]*|LOP3|LEA|SHF|SEL|PRMT|SGXT|VIADD)$"), ("global", r"^(LDG|STG)$"),
                 ("shared", r"^(LDS|STS|LDSM|STSM)$"), ("local", r"^(LDL|STL)$"), ("HGMMA", r"^HGMMA$"))


INSTRUCTION = r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(.*)"


def sass_instructions(sass):
    """The machine instructions of nvdisasm's listing as (address, opcode, operands), and the address of each branch
    label. Only lines with an opcode count: the listing's data sections also carry address comments."""
    labels, ops, target = {}, [], None
    for line in sass.splitlines():
        label = re.match(r"\s*\.L_x_(\d+):", line)
        if label:
            target = label.group(1)
            continue
        instr = re.match(INSTRUCTION, line)
        if instr:
            at = int(instr.group(1), 16)
            if target is not None:
                labels[target], target = at, None
            ops.append((at, instr.group(2), instr.group(3)))
    return ops, labels


def instruction_lines(sass):
    """The listing's instructions alone, one a line: without its data sections, which carry the source's paths and
    line numbers, so that the same machine code from two trees reads the same."""
    return "".join(line.strip() + "\n" for line in sass.splitlines() if re.match(INSTRUCTION, line))


def main_loop(sass):
    """Instruction count and opcode groups of the longest loop (the span of the longest backward branch), or None."""
    ops, labels = sass_instructions(sass)
    loops = []
    for at, op, rest in ops:
        branch = re.search(r"\.L_x_(\d+)", rest) if op == "BRA" else None
        if branch and labels.get(branch.group(1), at) < at:
            loops.append((labels[branch.group(1)], at))
    if not loops:
        return None
    start, end = max(loops, key=lambda span: span[1] - span[0])
    body = [op for at, op, _ in ops if start <= at <= end]
    return dict(instructions=len(body), **{group: sum(bool(re.match(pattern, op)) for op in body)
                                           for group, pattern in OPCODE_GROUPS})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=numbers("head widths 1-256", 1, 257), default=[64, 128])
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--kernels", type=names("kernels", KERNELS), default=list(KERNELS),
                        help="comma-separated subset")
    parser.add_argument("--maxnreg", type=numbers("register caps 1-255", 1, 256), default=[],
                        help="register caps, e.g. 168,128: each kernel at its own settings capped at each")
    parser.add_argument("--sass", type=Path, default=None, help="write each row's SASS listing to this folder")
    parser.add_argument("--tma", action="store_true", help="the plain passes (state_fwd, state_bwd) in their TMA form")
    args = parser.parse_args(argv)
    caps = args.maxnreg
    print(f"triton {triton.__version__}, sm_90a, {args.dtype}, R = {args.rank}\n")
    print("| kernel | D | warps, stages, cap | registers | spill stores / loads (B/thread) | shared KB | blocks an SM "
          "| SASS instructions | main loop: instructions (integer / global / shared / local / HGMMA) |")
    print("|---|---|---|---|---|---|---|---|---|")
    dtype = TORCH_DTYPES[args.dtype]
    for D in args.dims:
        for name in args.kernels:
            tma = constexprs(name, D, args.dtype, args.rank, args.tma).get("TMA", False)
            own = recurrent.LAUNCH if name == "recurrent" else chunk.launch(name, D, dtype, args.rank, tma)
            tuned = {"num_warps": 4, "num_stages": 3, **own}
            launches = [tuned, dict(tuned, num_warps=8)] if tuned["num_warps"] != 8 else [tuned]
            for launch in launches + [dict(tuned, maxnreg=cap) for cap in caps]:
                r = report(name, D, args.dtype, args.rank, launch, args.tma)
                cap = f", {launch['maxnreg']}" if "maxnreg" in launch else ""
                if args.sass is not None:
                    args.sass.mkdir(parents=True, exist_ok=True)
                    row = f"{name}_D{D}_R{args.rank}_{launch['num_warps']}w{launch['num_stages']}s{cap[2:]}"
                    (args.sass / f"{row}.sass").write_text(instruction_lines(r["sass"]))
                print(f"| {name} | {D} | {launch['num_warps']}, {launch['num_stages']}{cap} | {r['regs']} | "
                      f"{r['spill_st']} / {r['spill_ld']} | {r['smem_kb']:.0f} | {r['blocks']} | "
                      f"{r['instructions']} | "
                      f"{loop_cell(r['loop'])} |", flush=True)


def loop_cell(loop):
    if loop is None:
        return "–"
    return f"{loop['instructions']} ({' / '.join(str(loop[group]) for group, _ in OPCODE_GROUPS)})"


if __name__ == "__main__":
    main()
