"""End-to-end throughput of FlowHN against its peers, all of about the same parameter count, on one GPU (issue 6).

Models (each built, trained and decoded in turn, each row in a child process of its own, so that a failure fills
its row with the error, or a crash (segmentation fault, CUDA error, killed for memory) with how the process ended and
the last lines of its stderr, and the run goes on; the children inherit the environment, so PYTHONFAULTHANDLER=1
puts a crash's Python stack in the log):

- FlowHN from preset "135m" in each split mode (none, alternating, flop_aware, flop_aware_circulating), and FAC
  with the split ratio from `flowhn_hf.calibrate_split`;
- a sequential hybrid of FlowHN's own blocks (attention block, DeltaNet block, ...; `sequential_hybrid.py`), its
  SwiGLU width solved to FlowHN's parameter count;
- transformers' Llama in SmolLM-135M's shape (d 576, 30 layers, 9 heads / 3 KV heads, SwiGLU 1536, vocab 49152,
  tied embeddings), SDPA attention;
- flash-linear-attention's DeltaNetForCausalLM (d 576, 30 layers, 9 heads of 64, gated output norm), its SwiGLU
  width solved to FlowHN's count, only when `import fla` works.

Measured per model: training tokens/s over the same random batch (fused AdamW, bf16 autocast over fp32 weights by
default; warmup steps, then timed steps between CUDA synchronizations), eager or under `torch.compile` (`--compile`:
the model's forward with its loss, the same call for every model, compiled during the untimed warm-up steps; the
optimizer step and `generate` stay eager), model FLOPs per token and MFU against the bf16 matmul rate measured on
the card in the same run (once, by the parent process), peak memory (torch.cuda.max_memory_allocated, weights + AdamW
state + activations), and decode throughput of `generate` (prompt 2048, 256 new tokens, greedy, batch 1 and 32, bf16
weights). The FLOP formulas are in `model_flops` and NOTES.md.

Writes RESULTS.md, results.json and throughput.png (if matplotlib is installed) to --out-dir (default: beside this
file; with --smoke: runs/benchmarks-smoke) and to $OUT when that is set, after every row, so a run cut short keeps
its finished rows. `--max-minutes` starts no row that the mean time of the finished rows says would end past it.

    python -m training.benchmarks.throughput                          # GPU, the full run, eager
    python -m training.benchmarks.throughput --compile both           # each model eager, then compiled
    python -m training.benchmarks.throughput --smoke                  # CPU, tiny models, under a minute

`--trees main=.,candidate=.carry/candidate` runs every row once from each source tree in turn (each a checkout or a
`git archive` of this repository; each row's child process imports that tree's flowhn_hf and kernels and runs its
throughput.py): an A/B of a change on one machine in one call, the trees taking turns model by model.
"""

import argparse
import ast
import gc
import itertools
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import deque
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

import flowhn_hf
from flowhn_hf import FlowHNForCausalLM, preset_config
from flowhn_hf import modeling_flowhn as mf
from flowhn_hf.configuration_flowhn import DELTA_CHUNK_SIZE

from training.benchmarks.sequential_hybrid import SequentialHybridForCausalLM, matched_width, sequential_config
from training.compilation import MODES, SCOPES, compile_in_place

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SHORT = {"none": "none", "alternating": "alternating", "flop_aware": "FA", "flop_aware_circulating": "FAC"}
# In order of importance: with --max-minutes, the last ones are the first left out.
DEFAULT_MODELS = (
    "llama", "flowhn-FAC", "flowhn-none", "sequential", "llama-bf16-residual", "flowhn-FA", "fla-deltanet",
    "flowhn-alternating", "flowhn-FAC-calibrated",
)  # fmt: skip


# --------------------------------------------------------------------------------------------------- model builders


def flowhn_config(args, split_mode, attention_ratio=None):
    overrides = dict(split_mode=split_mode)
    if args.smoke:
        overrides["max_position_embeddings"] = max(args.seq_len, 64)
    elif args.seq_len != 2048:  # "auto" resolves the split for a sequence of max_position_embeddings tokens
        overrides["max_position_embeddings"] = args.seq_len
    if attention_ratio is not None:
        overrides["attention_ratio"] = attention_ratio
    if args.split_period is not None:
        overrides["split_period"] = args.split_period
    return preset_config(args.preset, **overrides)


def target_parameters(args) -> int:
    """The count every other model is sized to: FlowHN flop_aware_circulating's."""
    return flowhn_hf.count_parameters(flowhn_config(args, "flop_aware_circulating"))


def llama_config(args):
    from transformers import LlamaConfig

    positions = max(args.seq_len, args.prompt_len + args.new_tokens)
    if args.smoke:
        shape = dict(vocab_size=1024, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    else:  # SmolLM-135M's shape
        shape = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3)  # fmt: skip
    return LlamaConfig(
        **shape, max_position_embeddings=positions, tie_word_embeddings=True, rms_norm_eps=1e-5,
        attn_implementation="sdpa", bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip


def fla_config(args, target):
    """flash-linear-attention's DeltaNet in FlowHN's widths (d, 64-wide heads), Llama's depth, the SwiGLU width
    solved to `target` parameters."""
    from fla.models import DeltaNetConfig

    reference = flowhn_config(args, "flop_aware_circulating")
    d, head = reference.hidden_size, reference.delta_head_dim
    layers = 4 if args.smoke else 30

    def config_with(width):
        return DeltaNetConfig(
            vocab_size=reference.vocab_size, hidden_size=d, num_heads=d // head, num_hidden_layers=layers,
            intermediate_size=width, tie_word_embeddings=True, use_gate=True, norm_eps=1e-5,
            max_position_embeddings=max(args.seq_len, args.prompt_len + args.new_tokens),
            bos_token_id=None, eos_token_id=None, pad_token_id=None,
        )  # fmt: skip

    from fla.models import DeltaNetForCausalLM

    return matched_width(config_with, DeltaNetForCausalLM, target)


def build_model(name, args, state):
    """(model, facts) for benchmark model `name`; facts hold the split ratios and notes for the table."""
    facts = {}
    if name.startswith("flowhn-"):
        mode_short = name[len("flowhn-"):].removesuffix("-calibrated")
        mode = {v: k for k, v in SHORT.items()}[mode_short]
        ratio = None
        if name.endswith("-calibrated"):
            ratio = state.get("calibrated_ratio")
            if ratio is None:
                raise SkipModel(state.get("calibration_note", "no calibrated ratio"))
        config = flowhn_config(args, mode, ratio)
        facts["rho_model"] = config.attention_ratio_from_cost_model(args.seq_len) if mode.startswith("flop") else None
        facts["rho_used"] = config.resolved_attention_ratio
        if mode.startswith("flop"):
            facts["rho_calibrated"] = state.get("calibrated_ratio")
        return FlowHNForCausalLM(config), facts
    if name == "sequential":
        config = sequential_config(flowhn_config(args, "flop_aware_circulating"), state["target"])
        return SequentialHybridForCausalLM(config), facts
    if name in ("llama", "llama-bf16-residual"):
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(llama_config(args))
        if name == "llama-bf16-residual":  # FlowHN's `autocast_residual`, given to the Llama for a like-for-like row
            model.model.embed_tokens.register_forward_hook(lambda module, inputs, out: mf.residual_stream(out, True))
        return model, facts
    if name == "fla-deltanet":
        try:
            import fla  # noqa: F401  (only here: the package never imports fla)
            from fla.models import DeltaNetForCausalLM
        except Exception as error:  # noqa: BLE001
            raise SkipModel(f"flash-linear-attention not importable ({type(error).__name__}: {error})") from None
        return DeltaNetForCausalLM(fla_config(args, state["target"])), facts
    raise ValueError(f"unknown model {name!r}: choose from {', '.join(DEFAULT_MODELS)}")


class SkipModel(Exception):
    """A model that can't run here (missing package, missing calibration): its row says why."""


# ----------------------------------------------------------------------------------------------------- FLOP counting


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def attention_core_flops(tokens, heads, head_dim):
    """Forward FLOPs of causal attention over `tokens` tokens: QKᵀ and AV over the tokens·tokens/2 causal pairs,
    2·hd FLOPs per pair and head each: 2·H·hd·n²."""
    return 2 * heads * head_dim * tokens**2


def deltanet_core_flops(tokens, heads, key_dim, value_dim, rank=1, chunk=DELTA_CHUNK_SIZE):
    """Forward FLOPs of the chunked delta rule over `tokens` tokens, beyond the projections: per token and head,
    2 x the multiply-adds of the UT transform (R²·C·(2K+V)/2), the state read and write (2·R·K·V), the output's
    state term (K·V) and its intra-chunk term (R·C·(K+V)/2), with C the chunk length (64)."""
    r, c, k, v = rank, chunk, key_dim, value_dim
    macs = r * r * c * (2 * k + v) / 2 + 2 * r * k * v + k * v + r * c * (k + v) / 2
    return 2 * heads * tokens * macs


def model_flops(name, model, seq_len) -> dict:
    """Forward FLOPs of one sequence of `seq_len` tokens, by term. Training counts 3x (forward + backward).

    dense: 2·P·n for each block of P parameters that n of the sequence's tokens pass through (the embedding lookup
    counts nothing; the tied output matrix counts once, as the LM head: 2·d·V per token); attention: 2·H·hd·n² per
    attention layer over the n tokens it sees; deltanet: `deltanet_core_flops` per DeltaNet layer.
    """
    dense = attention = deltanet = 0.0
    config = model.config
    if isinstance(model, FlowHNForCausalLM):
        for layer, window in zip(model.model.layers, model.model.attention_windows):
            n_att = window.count(0, seq_len)  # all of them with split_mode "none"
            n_del = seq_len if config.split_mode == "none" else seq_len - n_att
            dense += 2 * _params(layer.attention_branch) * n_att + 2 * _params(layer.deltanet_branch) * n_del
            dense += 2 * _params(layer.fusion) * seq_len
            attention += attention_core_flops(n_att, config.num_attention_heads, config.head_dim)
            deltanet += deltanet_core_flops(
                n_del, config.delta_num_heads, config.delta_head_dim, config.delta_value_head_dim, config.delta_rank
            )
    elif isinstance(model, SequentialHybridForCausalLM):
        for i, block in enumerate(model.model.layers):
            dense += 2 * _params(block) * seq_len
            if i % 2 == 0:
                attention += attention_core_flops(seq_len, config.num_attention_heads, config.head_dim)
            else:
                deltanet += deltanet_core_flops(
                    seq_len, config.delta_num_heads, config.delta_head_dim, config.delta_value_head_dim,
                    config.delta_rank,
                )  # fmt: skip
    elif name.startswith("llama"):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        for layer in model.model.layers:
            dense += 2 * _params(layer) * seq_len
            attention += attention_core_flops(seq_len, config.num_attention_heads, head_dim)
    elif name == "fla-deltanet":
        for layer in model.model.layers:
            dense += 2 * _params(layer) * seq_len
            a = layer.attn
            deltanet += deltanet_core_flops(seq_len, a.num_heads, a.head_k_dim, a.head_v_dim)
    else:
        raise ValueError(f"no FLOP count for {name!r}")
    head = 2 * config.hidden_size * config.vocab_size * seq_len
    forward = dense + head + attention + deltanet
    return {"dense": dense, "lm_head": head, "attention": attention, "deltanet": deltanet, "forward": forward,
            "train": 3 * forward}  # fmt: skip


# ------------------------------------------------------------------------------------------------------ measurements


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def matmul_rate(device, smoke) -> tuple[float, str]:
    """Measured dense matmul rate (FLOP/s) of the card: bf16 n³ products of random matrices on CUDA (n 8192),
    float32 on the CPU (n 512 with --smoke, else 1024): median over 5 timings of 10 products each, after 3 warm-ups."""
    if device.type == "cuda":
        n, dtype, repeats = 8192, torch.bfloat16, 10
    else:
        n, dtype, repeats = (512 if smoke else 1024), torch.float32, 3
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize(device)
        times.append((time.perf_counter() - start) / repeats)
    del a, b
    free_memory(device)
    seconds = sorted(times)[len(times) // 2]
    return 2 * n**3 / seconds, f"{n}x{n}x{n} {str(dtype).removeprefix('torch.')} torch.matmul"


def compile_model(model, backend="inductor", mode=None, scope="model"):
    """Compile `model` in place, the whole model with its loss or (`scope="layers"`) each decoder layer with the rest
    eager, with room for a graph per layer. The helper is `flowhn-train --compile`'s, so a row timed with a scope and
    mode is what `flowhn-train --compile --compile-scope ... --compile-mode ...` trains at. FlowHN compiles into one
    graph (its kernels are custom ops, and a batch without a mask or position ids needs no host sync), but a model
    that breaks inside its layers gets a graph per layer specialisation, and past the recompile limit (default 8)
    Dynamo would run the rest eagerly without a word. `mode`: torch.compile's ("reduce-overhead" replays CUDA graphs).
    In place, the model stays compiled: what should run eagerly afterwards runs under
    `torch.compiler.set_stance("force_eager")`. Call `torch._dynamo.reset()` when done with it."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    compile_in_place(model, scope, accumulates_gradients=False, backend=backend, mode=mode)  # a step: one backward


def training_step(model, batch, args, device, precision=None, compiled=False):
    """A function running one full training step (forward with its loss, backward, fused AdamW step) on `batch`
    and returning the detached loss: every model's step, timed here and profiled by profile_step.py alike."""
    precision = precision or args.precision
    if compiled:
        compile_model(model, args.compile_backend, args.compile_mode, args.compile_scope)
    model.train()
    model.zero_grad(set_to_none=True)
    if precision == "bf16":
        model.to(torch.bfloat16)
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused)
    autocast = precision == "autocast"

    def step():
        torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs ("reduce-overhead"): the last step's outputs are done
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            # no cache: nothing is decoded in training (transformers' Llama would build one by default)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach().clone()  # a CUDA graph's output is overwritten by its next replay

    return step


def train_throughput(model, batch, args, device, precision=None, compiled=False) -> dict:
    """Tokens/s of full training steps (`training_step`) on `batch`, timed between synchronizations after
    `args.warmup` untimed steps. With `compiled`, the forward with its loss runs compiled (`compile_model`): the
    warm-up steps compile it (their time, `warmup_s`, is reported apart). Every step trains on the same batch, so a
    step that learns lowers the loss: a row whose last loss is not below its first gets a warning."""
    step = training_step(model, batch, args, device, precision, compiled)
    start = time.perf_counter()
    warmup_losses = [step() for _ in range(args.warmup)]
    synchronize(device)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    synchronize(device)
    seconds = time.perf_counter() - start
    loss, first = float(loss), float(warmup_losses[0]) if warmup_losses else None
    del step  # and the optimizer state it holds
    if compiled:  # the next model starts with no cached graphs, none counting toward its recompile limit
        torch._dynamo.reset()
    tokens = batch.numel() * args.steps
    result = {"train_tokens_per_s": tokens / seconds, "step_s": seconds / args.steps, "warmup_s": warmup_s,
              "first_loss": first, "final_loss": loss}  # fmt: skip
    if not math.isfinite(loss):
        result["warning"] = "non-finite loss"
    elif first is not None and not loss < first:
        result["warning"] = f"the loss did not fall ({first:.4f} at the first step): the step does not train"
    return result


@torch.no_grad()
def decode_throughput(model, args, device, batch_size) -> dict:
    """`generate` from a random prompt of `args.prompt_len` tokens, greedy, exactly `args.new_tokens` new tokens.

    decode tokens/s = batch·(new − 1) / (time of the full generate − time of a generate of 1 new token, i.e. the
    prefill); the end-to-end rate batch·new / full time is kept in results.json too.
    """
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (batch_size, args.prompt_len), generator=generator).to(device)
    mask = torch.ones_like(prompt)

    @torch.compiler.set_stance("force_eager")  # a row's training may have compiled the model in place
    def generate(new):
        out = model.generate(
            input_ids=prompt, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
            num_beams=1, pad_token_id=0, use_cache=True,
        )  # fmt: skip
        if out.shape[1] != args.prompt_len + new:
            raise RuntimeError(f"generate returned {out.shape[1] - args.prompt_len} new tokens, not {new}")
        return out

    generate(min(4, args.new_tokens))  # warm-up: kernel compilation, cache allocation
    timings = {}
    for new in (1, args.new_tokens, 1):  # the prefill is timed twice and the shorter kept
        synchronize(device)
        start = time.perf_counter()
        generate(new)
        synchronize(device)
        timings[new] = min(timings.get(new, math.inf), time.perf_counter() - start)
    decode_s = timings[args.new_tokens] - timings[1]
    result = {
        f"generate_b{batch_size}_tokens_per_s": batch_size * args.new_tokens / timings[args.new_tokens],
        f"prefill_b{batch_size}_s": timings[1],
        f"generate_b{batch_size}_s": timings[args.new_tokens],
    }
    if decode_s > 0:
        result[f"decode_b{batch_size}_tokens_per_s"] = batch_size * (args.new_tokens - 1) / decode_s
    return result


def calibrate(args, device, state):
    """The split ratio `flowhn_hf.calibrate_split` measures for FAC at this sequence length."""
    config = flowhn_config(args, "flop_aware_circulating")  # calibrate_split sets the ratio on this copy
    # A bare config has no attention implementation: the branches would fall back to eager attention, which
    # materialises the T x T scores. Time the one the models run with.
    config._attn_implementation = "sdpa"
    kwargs = {"steps": 3} if args.smoke else {"batch_size": args.batch_size}
    start = time.perf_counter()
    try:
        ratio = flowhn_hf.calibrate_split(config, args.seq_len, device, **kwargs)
        state["calibrated_ratio"] = float(ratio)
        print(f"calibrate_split: attention_ratio {ratio:.4f} in {time.perf_counter() - start:.1f} s", flush=True)
    except Exception as error:  # noqa: BLE001
        state["calibration_note"] = f"calibrate_split failed: {type(error).__name__}: {error}"
        print(state["calibration_note"], flush=True)
    free_memory(device)


def run_model(name, args, device, batch, state, compiled=False) -> dict:
    """One row of the table: build `name`, time its training (eager or compiled), then its decoding (always eager)."""
    row = {"model": name, "compiled": compiled}
    model = None
    if name.endswith("-calibrated") and "calibrated_ratio" not in state and "calibration_note" not in state:
        calibrate(args, device, state)  # only when its row comes up: a run cut short spends no time on it
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        torch.manual_seed(0)
        with torch.device(device):
            model, facts = build_model(name, args, state)
        row.update(facts)
        row["params"] = _params(model)
        try:  # the model's structure may have moved on from what the count reads: measure anyway
            flops = model_flops(name, model, args.seq_len)
            row["train_flops_per_token"] = flops["train"] / args.seq_len
            row["flops_by_term"] = {k: v / args.seq_len for k, v in flops.items()}
        except Exception as error:  # noqa: BLE001
            row["note"] = f"no FLOP count ({type(error).__name__}: {error})"
            traceback.print_exc()
    except SkipModel as reason:
        row["skipped"] = str(reason)
        print(f"{name}: skipped: {reason}", flush=True)
        return row
    except Exception as error:  # noqa: BLE001
        row["error"] = f"build: {type(error).__name__}: {error}"
        traceback.print_exc()
        del model
        free_memory(device)
        return row

    try:
        try:
            row.update(train_throughput(model, batch, args, device, compiled=compiled))
        except Exception as error:  # noqa: BLE001
            # A model whose kernels refuse autocast over fp32 weights (mixed dtypes) gets one try in bf16 weights,
            # and its row says so; out of memory is final.
            if args.precision != "autocast" or isinstance(error, torch.OutOfMemoryError):
                raise
            traceback.print_exc()
            row["note"] = (row.get("note", "") + f" bf16 weights (autocast failed: {type(error).__name__}: "
                           f"{str(error)[:120]})").strip()  # fmt: skip
            free_memory(device)
            row.update(train_throughput(model, batch, args, device, precision="bf16", compiled=compiled))
        if device.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    except Exception as error:  # noqa: BLE001
        row["error"] = f"train: {type(error).__name__}: {str(error)[:300]}"
        traceback.print_exc()
    free_memory(device)

    if args.decode_batch_sizes:
        try:
            model.eval()
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                model.to(torch.bfloat16)
            for batch_size in args.decode_batch_sizes:
                try:
                    row.update(decode_throughput(model, args, device, batch_size))
                except Exception as error:  # noqa: BLE001
                    # bf16 decoding refused (a dtype mismatch somewhere): one try in float32, said in the row.
                    if next(model.parameters()).dtype != torch.bfloat16 or isinstance(error, torch.OutOfMemoryError):
                        raise
                    traceback.print_exc()
                    free_memory(device)
                    model.to(torch.float32)
                    row["note"] = (row.get("note", "") + f" decode in float32 (bf16 failed: {type(error).__name__}: "
                                   f"{str(error)[:120]})").strip()  # fmt: skip
                    row.update(decode_throughput(model, args, device, batch_size))
                free_memory(device)
        except Exception as error:  # noqa: BLE001
            row["error"] = (row.get("error", "") + f" decode: {type(error).__name__}: {str(error)[:300]}").strip()
            traceback.print_exc()
    del model
    free_memory(device)
    return row


def add_mfu(row, peak_flops):
    """MFU of a measured row by its FLOP count, and by the common shorthand 6·N per token (whatever a token passes
    through), for comparison with other reports."""
    if "train_tokens_per_s" not in row:
        return
    if "train_flops_per_token" in row:
        row["mfu"] = row["train_flops_per_token"] * row["train_tokens_per_s"] / peak_flops
    row["mfu_6n"] = 6 * row["params"] * row["train_tokens_per_s"] / peak_flops


def child_command(argv):
    """The command line of a row's child process: this script, with `argv`."""
    return [sys.executable, "-m", "training.benchmarks.throughput", *argv]


def without_trees(argv):
    """argv less its --trees option: a child runs one tree, whose own throughput.py may not know the option."""
    out, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--trees="):
            skip = False
        elif arg == "--trees":
            skip = True
        else:
            out.append(arg)
    return out


def run_row(name, compiled, argv, args, tree=None) -> dict:
    """`run_model` in a child process (this script with `argv`, narrowed to the one row; with `tree`, that tree's
    throughput.py on its own code): a crash there fills the row with how the process ended and the last lines of its
    stderr, which is passed through as it comes."""
    argv = [*without_trees(argv), "--models", name, "--compile", "on" if compiled else "off"]
    if compiled and args.compile == "both":
        argv += ["--decode-batch-sizes", ""]  # decoding is eager: timed in the eager row only
    with tempfile.TemporaryDirectory() as tmp:
        if tree is None:  # the parent may have found this repository through sys.path alone (run as a file)
            paths = [os.environ.get("PYTHONPATH"), str(ROOT)]
        else:  # the tree's packages first, kernels/ importable as flowhn_kernels without an install
            (Path(tmp) / "flowhn_kernels").symlink_to(args.trees[tree] / "kernels", target_is_directory=True)
            paths = [tmp, str(args.trees[tree])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
        result = Path(tmp) / "row.json"
        child = subprocess.Popen(child_command([*argv, "--child-json", str(result)]), env=env,
                                 cwd=None if tree is None else args.trees[tree],
                                 stderr=subprocess.PIPE, text=True, errors="replace")  # fmt: skip
        tail = deque(maxlen=3)
        for line in child.stderr:
            sys.stderr.write(line)
            if line.strip():
                tail.append(line.strip())
        code = child.wait()
        row = json.loads(result.read_text()) if result.exists() else {"model": name, "compiled": compiled}
    if tree is not None:
        row["tree"] = tree
    if code:
        how = f"signal {-code} ({signal.Signals(-code).name})" if code < 0 else f"exit status {code}"
        stderr = " / ".join(tail)[-400:]
        row["error"] = (row.get("error", "") + f" crashed: {how}; stderr ends: {stderr}").strip()
    return row


# ----------------------------------------------------------------------------------------------------------- reports


def _fmt(value, spec, missing="–"):
    return missing if value is None else format(value, spec)


LABELS = {
    "llama": "Llama (transformers, SDPA)",
    "llama-bf16-residual": "Llama, bf16 residual stream",
    "sequential": "Sequential hybrid (attn, DeltaNet, ...)",
    "fla-deltanet": "fla DeltaNet",
    "flowhn-none": "FlowHN none",
    "flowhn-alternating": "FlowHN alternating",
    "flowhn-FA": "FlowHN flop_aware",
    "flowhn-FAC": "FlowHN flop_aware_circulating",
    "flowhn-FAC-calibrated": "FlowHN FAC, calibrated ρ",
}


def _percent(value):
    return "–" if value is None else f"{100 * value:.1f}%"


def label(row) -> str:
    tree = f" [{row['tree']}]" if row.get("tree") else ""
    return LABELS.get(row["model"], row["model"]) + (" (compiled)" if row.get("compiled") else "") + tree


def markdown_table(rows, args) -> str:
    sizes = args.decode_batch_sizes
    head = ["model", "params (M)", "ρ cost model", "ρ calibrated", "ρ used", "train tok/s", "warm-up s",
            "train GFLOP/tok", "MFU", "MFU 6N", "peak mem (GiB)"] + [f"decode tok/s b={x}" for x in sizes] + [
            "notes"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        note = "; ".join(row[k] for k in ("skipped", "error", "note", "warning") if row.get(k))
        flops = row.get("train_flops_per_token")
        cells = [
            label(row),
            _fmt(row.get("params") and row["params"] / 1e6, ".1f"),
            _fmt(row.get("rho_model"), ".3f"),
            _fmt(row.get("rho_calibrated"), ".3f"),
            _fmt(row.get("rho_used"), ".3f"),
            _fmt(row.get("train_tokens_per_s"), ",.0f"),
            _fmt(row.get("warmup_s"), ".1f"),
            _fmt(flops and flops / 1e9, ".3f"),
            _percent(row.get("mfu")),
            _percent(row.get("mfu_6n")),
            _fmt(row.get("peak_memory_gib"), ".1f"),
            *(_fmt(row.get(f"decode_b{x}_tokens_per_s"), ",.0f") for x in sizes),
            note.replace("|", "/").replace("\n", " "),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment(device, state) -> dict:
    import transformers
    import triton

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    env = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    try:
        import fla

        env["flash-linear-attention"] = getattr(fla, "__version__", "?")
    except Exception:  # noqa: BLE001
        env["flash-linear-attention"] = "not installed"
    env["matmul_rate_tflops"] = state["peak_flops"] / 1e12
    env["matmul_rate_how"] = state["peak_how"]
    return env


PRECISIONS = {"autocast": "bf16 autocast over fp32 weights", "bf16": "bf16 weights", "fp32": "float32"}


def write_reports(rows, args, env, out_dirs):
    smoke = " (SMOKE RUN: tiny models on CPU, numbers meaningless)" if args.smoke else ""
    decode_weights = "bf16 weights" if args.device.startswith("cuda") else "fp32 weights"
    inductor = ", ".join(f"{k}={v!r}" for k, v in args.inductor_config.items()) or "default"
    compile_args = f'backend="{args.compile_backend}"' + (f', mode="{args.compile_mode}"' if args.compile_mode else "")
    compiled_what = (f"the whole model with its loss compiled in place, `model.compile({compile_args})`"
                     if args.compile_scope == "model" else
                     f"each decoder layer compiled in place, `layer.compile({compile_args})`, the rest eager")
    compiled_what += f" (as `flowhn-train --compile --compile-scope {args.compile_scope}`)"
    text = "\n".join([
        f"# Throughput: FlowHN vs its peers{smoke}",
        "",
        f"Generated by `training/benchmarks/throughput.py` on {env['date']}. Method and formulas: NOTES.md beside "
        "this file.",
        "",
        f"- Device: **{env['device']}**; torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, "
        f"transformers {env['transformers']}, flash-linear-attention {env['flash-linear-attention']}, "
        f"Python {env['python']}.",
        f"- Matmul rate measured in this run: **{env['matmul_rate_tflops']:.4g} TFLOP/s** ({env['matmul_rate_how']}); "
        "MFU is over this.",
        f"- Training: batch {args.batch_size} × {args.seq_len} tokens of random ids (the same batch for every model), "
        f"AdamW (fused on CUDA), {PRECISIONS[args.precision]}; {args.warmup} warm-up steps, then {args.steps} timed "
        f"steps. \"(compiled)\": {compiled_what}, compiled during the warm-up steps (warm-up s: their wall time, "
        f"compilation included; Inductor's config: {inductor}); the other rows eager.",
        f"- Decode: `generate`, random prompt of {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, "
        f"min_new_tokens = max_new_tokens, {decode_weights}; decode tok/s = batch·(new−1) / (generate time − "
        "prefill time).",
        "- ρ: the fraction of tokens routed to attention (cost model: `attention_ratio_from_cost_model(seq_len)`; "
        "calibrated: `flowhn_hf.calibrate_split`; used: what the model ran with)"
        + ("." if args.split_period is None else f"; FlowHN split_period {args.split_period}."),
        "",
        markdown_table(rows, args),
        "",
    ])  # fmt: skip
    record = json.dumps({"environment": env, "args": vars(args), "rows": rows}, indent=1, default=str)
    for i, out in enumerate(out_dirs):
        out.mkdir(parents=True, exist_ok=True)
        (out / "RESULTS.md").write_text(text)
        (out / "results.json").write_text(record)
        if i == 0:
            plotted = plot(rows, out / "throughput.png", env, args)
        elif plotted:  # drawn once, copied
            shutil.copyfile(out_dirs[0] / "throughput.png", out / "throughput.png")
    return text


def plot(rows, path, env, args):
    """Training tokens/s, MFU, and decode tokens/s (one bar per decode batch size, log scale; a panel only when
    decoding ran) per model."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    labels = [label(r) for r in rows]
    tps = [r.get("train_tokens_per_s") or 0 for r in rows]
    mfu = [100 * (r.get("mfu") or 0) for r in rows]
    colors = ["tab:orange" if r["model"].startswith("flowhn") else "tab:gray" for r in rows]
    sizes = args.decode_batch_sizes
    fig, axes = plt.subplots(1, 3 if sizes else 2, figsize=(17 if sizes else 12, 0.45 * len(rows) + 2), sharey=True)
    for ax, values, title, fmt in ((axes[0], tps, "training tokens/s", "{:,.0f}"), (axes[1], mfu, "MFU (%)", "{:.1f}")):
        bars = ax.barh(range(len(rows)), values, color=colors)
        ax.set_title(title)
        for bar, value, row in zip(bars, values, rows):
            text = fmt.format(value) if value else ("skipped" if row.get("skipped") else "failed")
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + text, va="center", fontsize=8)
        ax.margins(x=0.25)
    height = 0.8 / max(1, len(sizes))
    for j, size in enumerate(sizes):
        values = [r.get(f"decode_b{size}_tokens_per_s") or 0 for r in rows]
        offsets = [i - 0.4 + height * (j + 0.5) for i in range(len(rows))]
        alpha = 1 - 0.45 * j / max(1, len(sizes) - 1)
        bars = axes[2].barh(offsets, values, height=height, label=f"batch {size}", alpha=alpha, color=colors)
        for bar, value in zip(bars, values):
            if value:
                y = bar.get_y() + bar.get_height() / 2
                axes[2].text(bar.get_width(), y, f" {value:,.0f} (b{size})", va="center", fontsize=7)
    if sizes:
        if any(r.get(f"decode_b{s}_tokens_per_s") for r in rows for s in sizes):
            axes[2].set_xscale("log")
            axes[2].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axes[2].set_title(f"decode tokens/s (prompt {args.prompt_len}, {args.new_tokens} new; log)")
        axes[2].margins(x=0.3)
    axes[0].set_yticks(range(len(rows)), labels)
    axes[0].invert_yaxis()
    smoke = "SMOKE RUN, tiny models: " if args.smoke else ""
    fig.suptitle(f"{smoke}{env['device']}, training batch {args.batch_size}×{args.seq_len}, torch {env['torch']}",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -------------------------------------------------------------------------------------------------------------- main


def batch_sizes(text):
    """argparse type of a comma-separated list of batch sizes, each a whole number ≥ 1; empty: none."""
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sizes = [0]
    if not all(size >= 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes, each a whole number ≥ 1, got {text!r}")
    return sizes


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--smoke", action="store_true", help="tiny models on the CPU, a few steps: tests the script")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated subset of the models")
    p.add_argument("--preset", default=None, help="FlowHN preset (default 135m; tiny with --smoke)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per training step (default 16; 2 smoke)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048; 64 smoke)")
    p.add_argument("--warmup", type=int, default=None, help="untimed training steps (default 3; 1 smoke)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default 10; 2 smoke)")
    p.add_argument("--prompt-len", type=int, default=None, help="decode prompt tokens (default 2048; 8 smoke)")
    p.add_argument("--new-tokens", type=int, default=None, help="decode new tokens (default 256; 3 smoke)")
    p.add_argument("--decode-batch-sizes", type=batch_sizes, default=None,
                   help="comma-separated, empty for none (default 1,32; 1,2 smoke)")
    p.add_argument("--precision", choices=("autocast", "bf16", "fp32"), default=None,
                   help="training precision: bf16 autocast over fp32 weights, bf16 weights, or fp32 (default: "
                   "autocast on CUDA, fp32 on CPU)")
    p.add_argument("--compile", choices=("off", "on", "both"), default="off",
                   help="train eager, under torch.compile, or both (two rows per model; decode in the eager one)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: tests the path)")
    p.add_argument("--compile-mode", choices=MODES, default=None,
                   help="torch.compile mode for every compiled model (reduce-overhead: CUDA graphs, the fastest on the "
                   "GPU for every model here: RESULTS.md; max-autotune: CUDA graphs, and each matrix product's kernel "
                   "chosen by timing: minutes more of compilation)")
    p.add_argument("--compile-scope", choices=SCOPES, default="model",
                   help="what a compiled row compiles in place: the whole model with its loss (default), or each "
                   "decoder layer, the rest eager (flowhn-train's --compile-scope; its default too, except under "
                   "FSDP)")
    p.add_argument("--inductor-config", default=None, metavar="KEY=VALUE,...",
                   help="torch._inductor.config settings for every compiled row, each VALUE a Python literal, e.g. "
                   "combo_kernels=True,aggressive_fusion=True (the reports name them)")
    p.add_argument("--split-period", type=int, default=None, help="every FlowHN model's split_period, the routing "
                   "pattern's period in tokens (default: the preset's)")
    p.add_argument("--no-calibrate", action="store_true", help="skip flowhn_hf.calibrate_split")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="start no row that would end past this many minutes, by the mean time of the finished rows "
                   "(the rows left out say so); reports are written anyway")
    p.add_argument("--trees", default=None, help="NAME=PATH,...: every row once from each of these source trees "
                   "(checkouts or `git archive`s of this repository), in turn")
    p.add_argument("--device", default=None, help="default cuda if available (cpu with --smoke)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where RESULTS.md, results.json, throughput.png go (default: beside this script; "
                   "runs/benchmarks-smoke with --smoke)")
    p.add_argument("--child-json", type=Path, default=None, help=argparse.SUPPRESS)  # set by run_row
    args = p.parse_args(argv)
    smoke = args.smoke
    defaults = dict(preset="tiny" if smoke else "135m", batch_size=2 if smoke else 16, seq_len=64 if smoke else 2048,
                    warmup=1 if smoke else 3, steps=2 if smoke else 10, prompt_len=8 if smoke else 2048,
                    new_tokens=3 if smoke else 256, decode_batch_sizes=[1, 2] if smoke else [1, 32])  # fmt: skip
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    for name in args.models:
        if name not in DEFAULT_MODELS:
            p.error(f"unknown model {name!r}: choose from {', '.join(DEFAULT_MODELS)}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    if args.precision is None:
        args.precision = "autocast" if args.device.startswith("cuda") else "fp32"
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2")
    if args.split_period is not None:
        try:  # FlowHNConfig's own check, before any work
            flowhn_config(args, "flop_aware_circulating")
        except ValueError as e:
            p.error(f"--split-period {args.split_period}: {e}")
    if args.trees is not None:
        args.trees = parse_trees(p, args.trees)
    args.inductor_config = parse_inductor_config(p, args.inductor_config)
    if args.out_dir is None:
        args.out_dir = (ROOT / "runs" / "benchmarks-smoke") if smoke else HERE
    return args


def parse_trees(p, text):
    """{name: resolved path} from "NAME=PATH,...", each path a source tree of this repository."""
    trees = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, sep, path = item.partition("=")
        tree = Path(path).resolve()
        if not sep or not name or name in trees:
            p.error(f"--trees: expected distinct NAME=PATH items separated by commas, got {item!r}")
        if not all((tree / part).exists() for part in ("flowhn_hf", "kernels", "training/benchmarks/throughput.py")):
            p.error(f"--trees: {path!r} ({name}) is not a source tree of this repository (flowhn_hf/, kernels/, "
                    "training/benchmarks/throughput.py)")  # fmt: skip
        trees[name] = tree
    if not trees:
        p.error("--trees: no NAME=PATH given")
    return trees


def main(argv=None):
    """The parent process: measures the matmul rate, runs each row in a child process (`run_row`), writes the
    reports after every row."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and args.smoke:
        torch.set_num_threads(1)  # tiny models: one thread, no spinning against other jobs on a shared CI box
    if args.child_json:
        return run_child(args, device)
    out_dirs = [args.out_dir] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
    out_dirs = list(dict.fromkeys(path.resolve() for path in out_dirs))  # --out-dir $OUT: once
    state = {"start": time.perf_counter()}
    state["peak_flops"], state["peak_how"] = matmul_rate(device, args.smoke)
    print(f"matmul rate: {state['peak_flops'] / 1e12:.4g} TFLOP/s ({state['peak_how']})", flush=True)
    env = environment(device, state)

    compiled_modes = {"off": (False,), "on": (True,), "both": (False, True)}[args.compile]
    rows = []
    for name, compiled, tree in itertools.product(args.models, compiled_modes, args.trees or [None]):
        start = time.perf_counter()
        walls = [r["wall_s"] for r in rows if "wall_s" in r]
        expected_end = start - state["start"] + (sum(walls) / len(walls) if walls else 0)
        if args.max_minutes is not None and expected_end > 60 * args.max_minutes:
            rows.append({"model": name, "compiled": compiled, **({"tree": tree} if tree else {}),
                         "skipped": f"not run: would end past --max-minutes {args.max_minutes:g}"})  # fmt: skip
            continue
        rows.append(run_row(name, compiled, argv, args, tree))
        add_mfu(rows[-1], state["peak_flops"])
        rows[-1]["wall_s"] = time.perf_counter() - start
        report_row(rows, args, env, out_dirs)
    text = write_reports(rows, args, env, out_dirs)
    print(text, flush=True)
    return rows


def parse_inductor_config(p, text):
    """{key: value} from "KEY=VALUE,...", each key one of torch._inductor.config's and each value a Python literal."""
    from torch._inductor import config

    settings, known = {}, config.get_config_copy()
    for item in filter(None, (x.strip() for x in (text or "").split(","))):
        key, sep, value = (part.strip() for part in item.partition("="))
        try:
            if not sep or key not in known:
                raise ValueError(key)
            settings[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            p.error(f"--inductor-config: expected KEY=VALUE items, each KEY a torch._inductor.config setting and "
                    f"each VALUE a Python literal, got {item!r}")  # fmt: skip
    return settings


def run_child(args, device):
    """A child process: the one row of `args.models`, written as JSON to --child-json."""
    from torch._inductor import config

    for key, value in args.inductor_config.items():
        setattr(config, key, value)
    state = {"target": target_parameters(args)}
    if args.no_calibrate:
        state["calibration_note"] = "--no-calibrate"
    batch = torch.randint(0, flowhn_config(args, "none").vocab_size, (args.batch_size, args.seq_len),
                          generator=torch.Generator().manual_seed(0)).to(device)  # fmt: skip
    (name,) = args.models
    row = run_model(name, args, device, batch, state, compiled=args.compile == "on")
    row["code"] = str(Path(flowhn_hf.__file__).resolve().parents[1])  # the tree it ran from
    args.child_json.write_text(json.dumps(row, default=str))


def report_row(rows, args, env, out_dirs):
    """Print the newest row and rewrite the reports: a run cut short keeps what it measured."""
    row = rows[-1]
    summary = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "flops_by_term"}
    print(json.dumps(summary), flush=True)
    write_reports(rows, args, env, out_dirs)


if __name__ == "__main__":
    main()
