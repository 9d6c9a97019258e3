"""`flowhn-train`: pretrain a FlowHN preset with Accelerate.

    flowhn-train --preset tiny                                   # CPU, built-in corpus, a few minutes
    accelerate launch --config_file training/configs/ddp.yaml -m training.pretrain --preset 135m ...

Documents are joined with EOS and packed into fixed blocks, each block one sequence unless
--document-masking keeps its documents apart. bf16 autocast on GPU, AdamW (fused on CUDA), cosine
schedule with warmup, gradient clipping and accumulation; eval loss on a held-out slice; atomic
checkpoints with exact resume; SIGTERM / SIGINT save a checkpoint and exit.
"""

import argparse
import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_with_min_lr_schedule_with_warmup

import flowhn_hf
from training.checkpoint import latest_checkpoint, read_state, save_checkpoint
from training.compilation import MODES, SCOPES, compile_in_place
from training.corpus import train_bpe_tokenizer
from training.data import BlockSource, load_text_dataset, model_inputs, pack_documents, unigram_entropy
from training.export import export

# Launch defaults of each preset; every one can be overridden on the command line.
PRESET_DEFAULTS = {
    "tiny": dict(seq_len=128, micro_batch_size=16, grad_accum=1, lr=3e-3, warmup=20, max_steps=300,
                 eval_every=50, save_every=100, vocab_size=2048),
    "135m": dict(seq_len=2048, micro_batch_size=8, grad_accum=4, lr=1e-3, warmup=1000, max_steps=20000,
                 eval_every=500, save_every=1000, vocab_size=32768),
    "350m": dict(seq_len=2048, micro_batch_size=8, grad_accum=8, lr=6e-4, warmup=2000, max_steps=40000,
                 eval_every=1000, save_every=2000, vocab_size=32768),
    "1b": dict(seq_len=2048, micro_batch_size=4, grad_accum=16, lr=4e-4, warmup=2000, max_steps=60000,
               eval_every=1000, save_every=2000, vocab_size=32768),
}
# Dense bf16 peak FLOP/s by GPU name, for MFU (`--peak-tflops` overrides).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}
# Fields that identify a run: resuming with any of them changed is refused.
RUN_IDENTITY = ("preset", "override", "seq_len", "micro_batch_size", "grad_accum", "dataset", "dataset_config",
                "split", "text_column", "tokenizer", "vocab_size", "eval_blocks", "seed", "document_masking")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowhn-train", description=__doc__.split("\n\n")[0],
                                epilog="Options without a default here take the preset's (PRESET_DEFAULTS in "
                                       "training/pretrain.py).")
    p.add_argument("--preset", default="tiny", help="model preset: tiny (default), 135m, 350m, 1b")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="model config field, e.g. split_mode=alternating (value parsed as JSON if it can be)")
    p.add_argument("--output-dir", help="run directory (default runs/flowhn-PRESET)")
    stop = p.add_mutually_exclusive_group()
    stop.add_argument("--max-steps", type=int, help="optimizer steps")
    stop.add_argument("--max-tokens", type=float, help="train on this many tokens instead of --max-steps")
    p.add_argument("--seq-len", type=int, help="tokens per block")
    p.add_argument("--micro-batch-size", type=int, help="blocks per process per forward")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of --lr (0.1)")
    p.add_argument("--warmup", type=int, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay of matrices (0.1)")
    p.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2 (0.95)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 for none (1.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model init, data order and sample (0)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept (2)")
    p.add_argument("--eval-every", type=int, help="eval loss every N steps")
    p.add_argument("--eval-blocks", type=int, default=32, help="blocks held out for eval loss (32)")
    p.add_argument("--report-to", default="auto", choices=["auto", "none", "tensorboard", "wandb", "all"],
                   help="Accelerate trackers; auto (default): TensorBoard when installed")
    p.add_argument("--dataset", help="Hub dataset name or local .txt/.jsonl/.parquet file or directory "
                                     "(default: the built-in corpus)")
    p.add_argument("--dataset-config", help="Hub dataset configuration")
    p.add_argument("--split", default="train", help="Hub dataset split (train)")
    p.add_argument("--streaming", action="store_true", help="stream the dataset instead of downloading it")
    p.add_argument("--text-column", default="text", help="column holding the documents (text)")
    p.add_argument("--tokenizer", help="Hub name or local path (default: train a byte-level BPE on the data)")
    p.add_argument("--vocab-size", type=int, help="vocabulary of the trained BPE tokenizer")
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16", "fp16"],
                   help="auto (default): the launch config's, else bf16 on GPU and none on CPU")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model in place (checkpoint keys are unchanged; the DeltaNet kernels are "
                        "custom ops inside the graph, except with --document-masking)")
    p.add_argument("--compile-scope", choices=SCOPES,
                   help="with --compile: the whole model with its loss in one graph (model, the default), or each "
                        "decoder layer with the embedding and the loss eager (layers, the default under FSDP, which "
                        "shards per layer)")
    p.add_argument("--compile-mode", choices=MODES,
                   help="with --compile: torch.compile's mode (default; reduce-overhead replays CUDA graphs)")
    p.add_argument("--document-masking", action="store_true",
                   help="keep packed documents apart: position ids restart after each EOS, so attention and the "
                        "DeltaNet state stop at document boundaries")
    p.add_argument("--peak-tflops", type=float, help="peak FLOP/s per device for MFU (default: by GPU name)")
    p.add_argument("--prompt", default="To be, or not to be",
                   help="prompt of the sample printed at the end ('To be, or not to be')")
    p.add_argument("--sample-tokens", type=int, default=64, help="tokens of that sample, 0 for none (64)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse, fill the preset's defaults and check every value that needs no data."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset not in PRESET_DEFAULTS:
        parser.error(f"--preset: unknown preset {args.preset!r}; choose one of {', '.join(PRESET_DEFAULTS)}")
    for key, value in PRESET_DEFAULTS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("seq_len", "micro_batch_size", "grad_accum", "max_steps", "save_every", "eval_every",
                 "eval_blocks", "keep_checkpoints"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.output_dir is None:
        args.output_dir = f"runs/flowhn-{args.preset}"
    for name in ("compile_scope", "compile_mode"):
        if getattr(args, name) is not None and not args.compile:
            parser.error(f"--{name.replace('_', '-')} applies only with --compile")
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    args.compile_scope = args.compile_scope or ("layers" if fsdp else "model")
    if args.compile_scope == "model" and fsdp:
        parser.error("--compile-scope model: FSDP shards the model per decoder layer, so it compiles per layer "
                     "(--compile-scope layers)")
    for tracker in {"tensorboard": ["tensorboard"], "wandb": ["wandb"]}.get(args.report_to, []):
        if importlib.util.find_spec(tracker) is None:
            parser.error(f"--report-to {tracker}: the {tracker} package is not installed (pip install {tracker})")
    try:
        args.config_overrides = parse_overrides(args.override)
        config = flowhn_hf.preset_config(args.preset, **args.config_overrides)
    except (ValueError, TypeError) as e:
        parser.error(f"--preset {args.preset} / --override: {e}")
    if args.seq_len > config.max_position_embeddings:
        parser.error(f"--seq-len {args.seq_len} exceeds max_position_embeddings={config.max_position_embeddings} "
                     f"of preset {args.preset}; lower it or pass --override max_position_embeddings=N")
    return args


def parse_overrides(items: list[str]) -> dict:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def run_identity(args) -> dict:
    return {key: getattr(args, key) for key in RUN_IDENTITY}


def check_output_dir(args, num_processes: int):
    """Refuse an output dir with checkpoints unless resuming the same run; return the checkpoint to resume."""
    latest = latest_checkpoint(args.output_dir)
    if latest is None:
        return None
    if not args.resume:
        raise ValueError(f"--output-dir {args.output_dir} already holds checkpoints (latest {latest.name}); "
                         "pass --resume to continue that run, or choose another --output-dir")
    saved = read_state(latest)
    here = {**run_identity(args), "num_processes": num_processes}
    there = {**saved["run"], "num_processes": saved["hardware"]["num_processes"]}
    diff = {k: (there.get(k), v) for k, v in here.items() if there.get(k) != v}
    if diff:
        details = "; ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in diff.items())
        raise ValueError(f"--output-dir {args.output_dir} holds a checkpoint of an incompatible run ({details}); "
                         "resume with the same settings or choose another --output-dir")
    return latest


def load_tokenizer(args, accelerator, texts_ds, resume_from):
    """The checkpoint's tokenizer on resume, else --tokenizer, else a BPE trained on the data."""
    if resume_from is not None:
        return AutoTokenizer.from_pretrained(resume_from)
    if args.tokenizer is not None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        except Exception as e:
            raise ValueError(f"--tokenizer {args.tokenizer!r} cannot be loaded: {e}") from e
        if tokenizer.eos_token_id is None:
            raise ValueError(f"--tokenizer {args.tokenizer!r} has no eos_token to join documents with")
        return tokenizer
    path = Path(args.output_dir) / "tokenizer"
    with accelerator.main_process_first():
        if accelerator.is_main_process:
            texts = (row[args.text_column] for row in texts_ds)
            tokenizer = train_bpe_tokenizer(_first_chars(texts, 200_000_000), args.vocab_size)
            tokenizer.save_pretrained(path)
        else:
            tokenizer = AutoTokenizer.from_pretrained(path)
    return tokenizer


def _first_chars(texts, limit):
    total = 0
    for text in texts:
        yield text
        total += len(text)
        if total >= limit:
            return


def flops_per_token(config, num_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 N for the weight matmuls plus the attention scores over the whole block.

    PaLM's estimate; it counts attention as if every token attended (the split modes route fewer) and
    leaves out the DeltaNet chunk work, so MFU is an estimate.
    """
    layers, width = config.num_hidden_layers, config.hidden_size
    return 6 * num_params + 12 * layers * width * seq_len


def peak_flops(args, device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_BF16_TFLOPS.items() if key in name), None)


def make_accelerator(args) -> Accelerator:
    if args.mixed_precision != "auto":
        precision = args.mixed_precision
    elif "ACCELERATE_MIXED_PRECISION" in os.environ:
        precision = None
    else:
        precision = "bf16" if torch.cuda.is_available() else "no"
    trackers = {"none": [], "tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": "all"}.get(args.report_to)
    if args.report_to == "auto":
        trackers = ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
    return Accelerator(gradient_accumulation_steps=args.grad_accum, mixed_precision=precision,
                       log_with=trackers or None, project_dir=args.output_dir)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class StopFlag:
    """Set by SIGTERM / SIGINT; the loop saves and exits at the end of the step. A second SIGINT aborts."""

    def __init__(self):
        self.signum = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step", file=sys.stderr)


@torch.no_grad()
def evaluate(model, source: BlockSource, accelerator, batch_size: int, eos_token_id: int | None) -> float:
    """Mean loss over the held-out blocks, split over the processes. Without autograd: a graph through the running
    total would keep every batch's activations alive until the last one."""
    model.eval()
    world = accelerator.num_processes
    usable = len(source.eval) // world * world  # the same number of batches on every process (FSDP needs it)
    mine = source.eval[:usable][accelerator.process_index::world]
    total = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    for i in range(0, len(mine), batch_size):
        batch = mine[i:i + batch_size].to(accelerator.device)
        torch.compiler.cudagraph_mark_step_begin()
        total += model(**model_inputs(batch, eos_token_id)).loss.double() * len(batch)
    total = accelerator.reduce(total, "sum")
    model.train()
    return float(total) / usable


def train(args) -> dict:
    """Run (or resume) the training described by `args`; return the final trainer state."""
    accelerator = make_accelerator(args)
    world, rank = accelerator.num_processes, accelerator.process_index
    launched = int(os.environ.get("WORLD_SIZE", 1))
    if launched != world:  # every process would train alone and write the same output dir
        raise ValueError(f"launched as {launched} processes (WORLD_SIZE) but Accelerate set up {world}; "
                         "for several processes on CPU: ACCELERATE_USE_CPU=true torchrun --nproc_per_node N ...")
    fsdp_asked = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    if fsdp_asked and accelerator.distributed_type != DistributedType.FSDP:  # Accelerate would fall back silently
        raise ValueError(f"the launch config asks for FSDP but Accelerate set up {accelerator.distributed_type.value}: "
                         "it enables FSDP only on GPUs (or other accelerators), never on CPU")
    resume_from = check_output_dir(args, world)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    set_seed(args.seed)

    raw = load_text_dataset(args.dataset, args.dataset_config, args.split, args.streaming, args.text_column)
    tokenizer = load_tokenizer(args, accelerator, raw, resume_from)
    with accelerator.main_process_first():
        blocks = pack_documents(raw, tokenizer, args.text_column, args.seq_len)
    source = BlockSource(blocks, args.eval_blocks, args.seq_len, args.seed)
    if args.eval_blocks < world:
        raise ValueError(f"--eval-blocks {args.eval_blocks} is below the {world} processes: each needs one")

    if resume_from is not None:  # the run's own config: defaults of a later release do not change a run under way
        config = flowhn_hf.FlowHNConfig.from_pretrained(resume_from)
    else:
        config = flowhn_hf.preset_config(args.preset, **{
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            "vocab_size": math.ceil(len(tokenizer) / 64) * 64, **args.config_overrides})
        if config.vocab_size < len(tokenizer):
            raise ValueError(f"--override vocab_size={config.vocab_size} is smaller than the tokenizer's "
                             f"{len(tokenizer)} tokens")
    model = AutoModelForCausalLM.from_config(config)
    if args.gradient_checkpointing:  # the newer transformers name, or the older one
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    if args.compile:
        compile_in_place(model, args.compile_scope, args.grad_accum > 1, mode=args.compile_mode)
    num_params = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    non_embedding = num_params - embedding.numel()
    tied = getattr(model.get_output_embeddings(), "weight", None) is embedding
    matmul_params = non_embedding + (embedding.numel() if tied else 0)  # the LM head multiplies, tied or not

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, args.beta2), fused=accelerator.device.type == "cuda")
    global_blocks = args.micro_batch_size * args.grad_accum * world
    if args.max_tokens is not None:
        args.max_steps = max(1, math.ceil(args.max_tokens / (global_blocks * args.seq_len)))
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, min(args.warmup, args.max_steps), args.max_steps, min_lr_rate=args.min_lr_ratio)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    step, elapsed = 0, 0.0
    tokens_per_step = global_blocks * args.seq_len
    state = {"step": step, "train_loss": None, "eval_loss": None}
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        saved = read_state(resume_from)
        step, elapsed = saved["step"], saved["elapsed_s"]
        state = {key: saved[key] for key in state}
        accelerator.print(f"resuming from {resume_from} (step {step})")
    accelerator.init_trackers("flowhn", config={k: str(v) for k, v in vars(args).items()})

    device = accelerator.device
    peak = peak_flops(args, device)
    fpt = flops_per_token(config, matmul_params, args.seq_len)
    hardware = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "num_processes": world, "mixed_precision": accelerator.mixed_precision}
    if accelerator.is_main_process:
        sample = source.sample_train_tokens(1 << 20)
        entropy = unigram_entropy(sample, len(tokenizer))
        data = "streamed" if source.streaming else (
            f"{source.num_train} training blocks, {args.max_steps * global_blocks / source.num_train:.1f} epochs")
        accelerator.print(
            f"FlowHN {args.preset}: {num_params / 1e6:.2f}M parameters ({non_embedding / 1e6:.2f}M non-embedding), "
            f"vocab {len(tokenizer)}, {world} process(es) on {hardware['device']}, "
            f"{global_blocks} x {args.seq_len} tokens per step, {args.max_steps} steps\n"
            f"data: {data}; unigram entropy of the training tokens: {entropy:.3f} nats/token "
            "(the loss of a model that ignores context)")
    log_file = Path(args.output_dir) / "metrics.jsonl"
    document_eos = tokenizer.eos_token_id if args.document_masking else None
    stop = StopFlag()

    def checkpoint_state():
        return {**state, "tokens_seen": step * tokens_per_step, "elapsed_s": elapsed, "preset": args.preset,
                "run": run_identity(args), "hardware": hardware, "num_parameters": num_params,
                "optimization": {"lr": args.lr, "min_lr_ratio": args.min_lr_ratio, "warmup": args.warmup,
                                 "weight_decay": args.weight_decay, "beta2": args.beta2, "grad_clip": args.grad_clip,
                                 "global_batch_blocks": global_blocks, "max_steps": args.max_steps},
                "split_mode": getattr(config, "split_mode", None)}

    say = tqdm.write if accelerator.is_main_process else (lambda text: None)
    bar = tqdm(total=args.max_steps, initial=step, disable=not accelerator.is_local_main_process,
               desc="train", dynamic_ncols=True)
    model.train()
    stopping = False  # agreed by all processes: a signal reached at least one of them
    while step < args.max_steps:
        t0 = time.perf_counter()
        losses = []
        for micro in range(args.grad_accum):
            start = step * global_blocks + (micro * world + rank) * args.micro_batch_size
            batch = source.train_batch(start, args.micro_batch_size).to(device)
            with accelerator.accumulate(model):
                torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs: the last forward's outputs are done
                loss = model(**model_inputs(batch, document_eos)).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach().float().clone())  # a CUDA graph's output: its next replay overwrites it
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        state["step"] = step
        # One all-reduce and one host sync per step: the summed mean losses, and how many processes were signalled.
        flag = torch.tensor(float(stop.signum is not None), device=device)
        loss_sum, signalled = accelerator.reduce(torch.stack([torch.stack(losses).mean(), flag]), "sum").tolist()
        state["train_loss"] = loss_sum / world
        stopping = signalled > 0
        if not math.isfinite(state["train_loss"]):
            raise TrainingDiverged(f"the train loss is {state['train_loss']} at step {step}; stopped without saving, "
                               f"the last checkpoint (if any) is the latest in {args.output_dir}/checkpoints")
        dt = time.perf_counter() - t0
        elapsed += dt
        tps = tokens_per_step / dt
        metrics = {"train/loss": state["train_loss"], "train/lr": lr, "train/tokens": step * tokens_per_step,
                   "perf/tokens_per_s": tps}
        postfix = {"loss": f"{state['train_loss']:.3f}", "tok/s": f"{tps:,.0f}"}
        if peak is not None:
            metrics["perf/mfu"] = fpt * tps / (peak * world)
            postfix["mfu"] = f"{metrics['perf/mfu']:.1%}"
        if step % args.eval_every == 0 or step == args.max_steps:
            state["eval_loss"] = evaluate(model, source, accelerator, args.micro_batch_size, document_eos)
            metrics["eval/loss"] = state["eval_loss"]
            say(f"step {step}: train loss {state['train_loss']:.4f}, eval loss {state['eval_loss']:.4f}")
        if state["eval_loss"] is not None:
            postfix["eval"] = f"{state['eval_loss']:.3f}"
        bar.set_postfix(postfix, refresh=False)
        bar.update()
        accelerator.log(metrics, step=step)
        if accelerator.is_main_process:
            with log_file.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        if step % args.save_every == 0 or step == args.max_steps or stopping:
            path = save_checkpoint(accelerator, args.output_dir, step, checkpoint_state(), config, tokenizer,
                                   args.keep_checkpoints)
            say(f"saved {path}")
        if stopping:
            break
    bar.close()
    if not stopping and accelerator.is_main_process:
        export_run(args.output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    final = checkpoint_state()
    if stopping:
        how = "a signal to another process" if stop.signum is None else signal.Signals(stop.signum).name
        accelerator.print(f"stopped by {how} after step {step}; "
                          f"continue with --resume --output-dir {args.output_dir}")
        return final
    if device.type == "cuda":
        final["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    tokens_seen = step * tokens_per_step
    accelerator.print(
        f"done: {step} steps, {tokens_seen:,} tokens, train loss {state['train_loss']:.4f}, "
        f"eval loss {state['eval_loss']:.4f}, {tokens_seen / max(elapsed, 1e-9):,.0f} tokens/s"
        + (f", MFU {fpt * tokens_seen / elapsed / (peak * world):.1%}" if peak else "")
        + (f", peak memory {final['peak_memory_gib']:.2f} GiB" if "peak_memory_gib" in final else ""))
    accelerator.print(f"Hub-ready checkpoint: {Path(args.output_dir) / 'hub'} (load it with "
                      f"AutoModelForCausalLM.from_pretrained; upload it with `flowhn-export {args.output_dir} DIR "
                      "--push-to-hub REPO_ID`)")
    if args.sample_tokens > 0:
        accelerator.print(f"sample:\n{generate_sample(accelerator.unwrap_model(model), tokenizer, args, accelerator)}")
    return final


def export_run(output_dir):
    """Export the run's latest checkpoint to OUTPUT_DIR/hub, replacing an earlier export only once the new one is
    complete. Its card names the model after the run's directory."""
    hub, fresh = Path(output_dir) / "hub", Path(output_dir) / "hub.tmp"
    shutil.rmtree(fresh, ignore_errors=True)
    export(latest_checkpoint(output_dir), fresh, name=Path(output_dir).resolve().name)
    shutil.rmtree(hub, ignore_errors=True)
    fresh.rename(hub)


@torch.no_grad()
def generate_sample(model, tokenizer, args, accelerator) -> str:
    model.eval()
    inputs = tokenizer(args.prompt, return_tensors="pt").to(accelerator.device)
    torch.manual_seed(args.seed)
    with accelerator.autocast(), torch.compiler.set_stance("force_eager"):  # each new length would recompile
        out = model.generate(**inputs, max_new_tokens=args.sample_tokens, do_sample=True, temperature=0.8,
                             top_k=40, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except ValueError as e:  # bad input, found before training
        print(f"flowhn-train: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"flowhn-train: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
