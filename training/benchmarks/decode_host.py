"""Host time of one decoding step: FlowHN in each split mode against a Llama of the 135M models' depth.

On a GPU, decoding a ~135M model one token at a time is bound by the host (Python, op dispatch, kernel launches),
not by the card: throughput.py's decode rows run at 16-26 tokens/s on an H200. This measures that host side on the
CPU, where it can be timed without a GPU: the models keep the 135M presets' depth (FlowHN 15 layers, the Llama 30)
at tiny widths, so arithmetic is negligible, and FlowHN's decoding steps take delta_rule's own path to the recurrent
kernel, as on the GPU, with the kernel's launch replaced by one operation (on the CPU the PyTorch reference would run
instead and dominate; the prompt runs it). Prints a markdown table: ms per decoding step, and the number of tensor
operations that are not views or allocations per step (on a GPU each is a kernel launch; unlike the times, it does not
move between runs), at each batch size.

    python -m training.benchmarks.decode_host [--batch-sizes 1,8] [--threads 1] [--rounds 7]
"""

import argparse
import contextlib
import os
import time
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import flowhn_hf.modeling_flowhn as modeling
from flowhn_kernels import ops as kernel_ops
from flowhn_hf.presets import preset_config
from training.benchmarks.throughput import batch_sizes

MODES = ["flop_aware_circulating", "flop_aware", "alternating", "none"]
# STEPS: one split period of the tiny preset, so every round decodes the same mix of routes
PROMPT, STEPS = 64, 32


def recurrent_launch(q, k, v, beta, scale, initial_state, plan, output_final_state, normalize_qk):
    """recurrent.recurrent_fwd's stand-in: one operation where the GPU launches the kernel (filling the output), the
    state passed through."""
    H, K, V = k.shape[1], k.shape[-1], v.shape[-1]
    state = initial_state if initial_state is not None else q.new_zeros(plan.n, H, K, V)
    return q.new_zeros(q.shape[0], H, V), state


@contextlib.contextmanager
def kernel_launch_stubbed():
    """delta_rule on CPU tensors takes the kernels' host path (TRITON_INTERPRET=1 routes it there, as CUDA tensors go),
    with the recurrent kernel's launch replaced by recurrent_launch; both put back afterwards."""
    with mock.patch.dict(os.environ, TRITON_INTERPRET="1"):
        with mock.patch.object(kernel_ops, "recurrent_fwd", recurrent_launch):
            yield


class CountOps(TorchDispatchMode):
    """Counts the tensor operations that would launch work on a device: not views, not allocations."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and not func.__name__.startswith(("empty", "new_empty", "_unsafe_view")):
            self.count += 1
        return func(*args, **(kwargs or {}))


class Decoder:
    """A model with its cache after a prompt, stepping one new token per row."""

    def __init__(self, model, batch):
        self.model = model.eval()
        prompt = torch.randint(0, model.config.vocab_size, (batch, PROMPT), generator=torch.Generator().manual_seed(0))
        self.mask = torch.ones_like(prompt)
        self.cache = DynamicCache(config=model.config)
        with torch.no_grad():
            logits = model(input_ids=prompt, attention_mask=self.mask, **{modeling.CACHE_NAME: self.cache}).logits
        self.token = logits[:, -1:].argmax(-1)

    def seconds(self, steps) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(steps):
                self.mask = torch.cat([self.mask, self.mask[:, :1]], dim=1)
                self.model(input_ids=self.token, attention_mask=self.mask, **{modeling.CACHE_NAME: self.cache})
        return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=batch_sizes, default=[1, 8])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: host cost, not arithmetic)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds of each model, taking turns")
    args = parser.parse_args(argv)
    sizes = args.batch_sizes
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        best, ops = measure(sizes, args.rounds)
    finally:  # the caller's process gets its threads back
        torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, {args.threads} CPU thread(s); ms of host time per decoding step (best of "
          f"{args.rounds} rounds of {STEPS} steps after a {PROMPT}-token prompt)\n")
    print("| model | " + " | ".join(f"ms, batch {b}" for b in sizes) + " | "
          + " | ".join(f"operations per step, batch {b}" for b in sizes) + " |")
    print("|---|" + "---|" * 2 * len(sizes))
    for name in dict.fromkeys(name for name, _ in ops):
        times = " | ".join(f"{best[name, b] * 1e3:.2f}" for b in sizes)
        print(f"| {name} | {times} | " + " | ".join(f"{ops[name, b]:.0f}" for b in sizes) + " |")


def measure(sizes, rounds):
    """Best seconds per step and operations per step for every (model, batch size)."""
    torch.manual_seed(0)
    models = {f"FlowHN {mode} (15 layers)": modeling.FlowHNForCausalLM(
        preset_config("tiny", num_hidden_layers=15, split_mode=mode)) for mode in MODES}
    models["Llama, transformers (30 layers)"] = LlamaForCausalLM(LlamaConfig(
        vocab_size=1024, hidden_size=64, intermediate_size=160, num_hidden_layers=30, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=None, eos_token_id=None, pad_token_id=None))
    decoders = {(name, b): Decoder(model, b) for name, model in models.items() for b in sizes}
    ops, best = {}, dict.fromkeys(decoders, float("inf"))
    with kernel_launch_stubbed():
        for key, decoder in decoders.items():
            with CountOps() as counter:
                decoder.seconds(STEPS)
            ops[key] = counter.count / STEPS
        for round_ in range(rounds + 1):  # the models take turns, so a busy spell of the machine hits them all
            for key, decoder in decoders.items():
                seconds = decoder.seconds(STEPS)
                if round_:  # round 0 warms up
                    best[key] = min(best[key], seconds / STEPS)
    return best, ops


if __name__ == "__main__":
    main()
