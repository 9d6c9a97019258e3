"""Quality at equal tokens (issue 6): FlowHN flop_aware_circulating, FlowHN none and a Llama of the same size, each
trained from the same seed on the same tokens in the same order, on two tasks:

- text: next-token loss on a held-out slice of a real-text corpus: `--corpus DIR`, pre-tokenized by
  `build_corpus.py` (English documentation from Debian packages; no `datasets` needed), or `--dataset` (text files
  or a Hub dataset, tokenized here), or by default the built-in Shakespeare corpus;
- mqar: multi-query associative recall (after Zoology, Arora et al. 2023). A sequence of `--mqar-len` tokens (256)
  lists `--pairs` key-value pairs (32), then asks for the value of each key, in a shuffled order and at random places
  among blanks; the answers are labels only, never inputs (else the values not yet asked for could be guessed by
  elimination). The loss counts the answers only, and accuracy is the share of answers predicted exactly. It probes
  what a recurrent state can store and which earlier tokens a position can reach, where attention, DeltaNet and
  FAC's routing differ most. Recall is learnt in a phase transition after a plateau, counted in optimizer steps, so
  MQAR has steps of its own (`--mqar-batch-size` 32 sequences = 8,192 tokens: 1,221 steps for `--mqar-tokens` 10M):
  the first version, 64 pairs back to back in 128-sequence steps (244 steps for 8M tokens), left all three models
  at chance on the H200. NOTES.md, "Quality at equal tokens", has the CPU measurements and the GPU prediction.

Model size (`--size`): "small" by default (FlowHN d 384, 8 layers, about 36M parameters with a 16k vocabulary; the
Llama 16 layers of the same width, its SwiGLU width solved to FlowHN FAC's count), so that three models x 20M
text tokens plus the recall task fit in one 9-minute H200 call; "135m" is the throughput benchmark's size (about
3 x slower). `--max-minutes` stops training at the budget: the model being trained is evaluated where it stopped (its
row says so), the ones not started are listed as skipped, and the reports are written after every row.

    python -m training.benchmarks.quality --corpus .carry/corpus --out-dir $OUT --max-minutes 8
    python -m training.benchmarks.quality --tasks mqar --out-dir $OUT --max-minutes 4.5   # ~3.5 min on an H200
    python -m training.benchmarks.quality --smoke        # CPU, tiny models, under a minute

Prints a markdown table and writes QUALITY.md and quality.json to --out-dir (and to $OUT when set).
"""

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, get_cosine_with_min_lr_schedule_with_warmup

from flowhn_hf import FlowHNForCausalLM, count_parameters, preset_config
from training.benchmarks.sequential_hybrid import matched_width
from training.benchmarks.throughput import compile_model

HERE = Path(__file__).resolve().parent
MODELS = ("flowhn-FAC", "flowhn-none", "llama")
SPLIT_MODES = {"flowhn-FAC": "flop_aware_circulating", "flowhn-none": "none"}
# FlowHN shape per size: a preset and the fields that override it (the Llama gets twice the layers: one attention
# layer for each of FlowHN's two branches, as in the throughput table).
SIZES = {
    "tiny": ("tiny", {}),
    "small": ("135m", dict(hidden_size=384, num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=2,
                           delta_num_heads=6, delta_head_dim=64, intermediate_size=1024)),
    "135m": ("135m", {}),
}  # fmt: skip


def flowhn_config(name, args, vocab_size):
    preset, fields = SIZES[args.size]
    if args.split_period is not None:
        fields = {**fields, "split_period": args.split_period}
    return preset_config(preset, **fields, split_mode=SPLIT_MODES[name], vocab_size=vocab_size,
                         max_position_embeddings=max(args.seq_len, 64))  # fmt: skip


def llama_config(args, vocab_size) -> LlamaConfig:
    """FlowHN's width, heads and twice its layers; the SwiGLU width (a multiple of 64) solved to FlowHN FAC's
    parameter count."""
    flowhn = flowhn_config("flowhn-FAC", args, vocab_size)

    def config_with(width):
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=flowhn.hidden_size, intermediate_size=width,
            num_hidden_layers=2 * flowhn.num_hidden_layers, num_attention_heads=flowhn.num_attention_heads,
            num_key_value_heads=flowhn.num_key_value_heads, max_position_embeddings=flowhn.max_position_embeddings,
            tie_word_embeddings=True, rms_norm_eps=1e-5, attn_implementation="sdpa",
            bos_token_id=None, eos_token_id=None, pad_token_id=None,
        )  # fmt: skip

    return matched_width(config_with, LlamaForCausalLM, count_parameters(flowhn))


def build_model(name, args, vocab_size):
    if name == "llama":
        return LlamaForCausalLM(llama_config(args, vocab_size))
    return FlowHNForCausalLM(flowhn_config(name, args, vocab_size))


def text_blocks(args) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(train, eval) blocks of `--seq-len` tokens and the vocabulary size. From --corpus: its train.bin and eval.bin
    (at most `--eval-blocks` eval blocks); else the first `--eval-blocks` blocks of the tokenized documents."""
    if args.corpus:
        meta = json.loads((args.corpus / "meta.json").read_text())

        def blocks(split):
            ids = torch.from_numpy(np.fromfile(args.corpus / f"{split}.bin", dtype=np.uint16).astype(np.int64))
            return ids[: len(ids) // args.seq_len * args.seq_len].view(-1, args.seq_len)

        return blocks("train"), blocks("eval")[: args.eval_blocks], meta["vocab_size"]
    from training.corpus import train_bpe_tokenizer
    from training.data import load_text_dataset, pack_documents  # needs `datasets`; --corpus does not

    raw = load_text_dataset(args.dataset, text_column=args.text_column)
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = train_bpe_tokenizer((row[args.text_column] for row in raw), args.vocab_size)
    blocks = torch.tensor(list(pack_documents(raw, tokenizer, args.text_column, args.seq_len)["input_ids"]))
    if len(blocks) <= args.eval_blocks:
        raise ValueError(f"--dataset gives {len(blocks)} blocks of {args.seq_len} tokens: too few to hold out "
                         f"--eval-blocks {args.eval_blocks}")
    return blocks[args.eval_blocks :], blocks[: args.eval_blocks], len(tokenizer)


def mqar_batch(count: int, args, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` recall sequences of `args.mqar_len` tokens: (input ids, labels with -100 everywhere but the answers).

    Ids: 0 the blank, keys 1..V, values V+1..2V (V = `args.mqar_vocab`). The first 2 x `args.pairs` tokens list the
    pairs k v k v ... (distinct keys); the rest is two-token slots: each key again, in a shuffled order, in a slot
    drawn at random, followed by a blank whose label is the key's value; the other slots are blank. No answer is ever
    an input, so none can be guessed by elimination from those before it (that alone would give 1/n, 1/(n - 1), ...,
    1: 13% at 32 pairs). With mqar_len = 4 x pairs every slot holds a query."""
    pairs, vocab, length = args.pairs, args.mqar_vocab, args.mqar_len
    keys = torch.rand(count, vocab, generator=generator).argsort(1)[:, :pairs] + 1
    values = torch.randint(vocab + 1, 2 * vocab + 1, (count, pairs), generator=generator)
    order = torch.rand(count, pairs, generator=generator).argsort(1)
    slots = torch.rand(count, (length - 2 * pairs) // 2, generator=generator).argsort(1)[:, :pairs].sort(1).values
    at = 2 * pairs + 2 * slots  # where the query keys go, in order
    ids = torch.zeros(count, length, dtype=torch.long)
    ids[:, : 2 * pairs] = torch.stack([keys, values], 2).flatten(1)
    ids.scatter_(1, at, keys.gather(1, order))
    labels = torch.full_like(ids, -100).scatter_(1, at + 1, values.gather(1, order))
    return ids, labels


def train(model, batches, args, device, deadline, lr) -> list[float]:
    """AdamW at peak `lr` + cosine over `batches` (a list of (ids, labels)), stopping early at `deadline`
    (perf_counter seconds); the training losses, one per step taken."""
    if args.compile:
        compile_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, fused=device.type == "cuda")
    schedule = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, max(1, len(batches) // 20), len(batches), min_lr_rate=0.1
    )
    model.train()
    losses = []
    for ids, labels in batches:
        if losses and time.perf_counter() > deadline:  # at least one step: every row has a loss
            break
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=ids.to(device), labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())  # no host sync per step: read them all at the end
    if args.compile:
        torch._dynamo.reset()
    return torch.stack(losses).tolist() if losses else []


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # `train` may have compiled the model in place
def evaluate(model, ids, labels, device, batch_size) -> tuple[float, float]:
    """(mean loss over the labelled tokens, share of them predicted exactly) in eval mode, eagerly."""
    model.eval()
    total, correct, count = 0.0, 0, 0  # summed on the device, read once at the end
    for start in range(0, len(ids), batch_size):
        x, y = ids[start : start + batch_size].to(device), labels[start : start + batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=x).logits[:, :-1].float()
        target = y[:, 1:]
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum")
        correct += ((logits.argmax(-1) == target) & (target != -100)).sum()
        count += (target != -100).sum()
    return float(total / count), float(correct / count)


def run_task(task, name, args, device, data, deadline) -> dict:
    torch.manual_seed(args.seed)
    model = build_model(name, args, data["vocab_size"]).to(device)
    started = time.perf_counter()
    losses = train(model, data["train"], args, device, deadline, data["lr"])
    train_seconds = time.perf_counter() - started
    eval_loss, accuracy = evaluate(model, *data["eval"], device, len(data["train"][0][0]))  # a training step's rows
    steps = len(losses)
    row = {"task": task, "model": name, "params": sum(p.numel() for p in model.parameters()),
           "train_tokens": sum(ids.numel() for ids, _ in data["train"][:steps]), "final_train_loss": losses[-1],
           "eval_loss": eval_loss, "eval_accuracy": accuracy, "train_seconds": train_seconds,
           "seconds": time.perf_counter() - started}  # fmt: skip
    row["train_tokens_per_s"] = row["train_tokens"] / train_seconds
    if steps < len(data["train"]):
        row["note"] = f"stopped at --max-minutes after {steps} of {len(data['train'])} steps"
    del model
    return row


def task_data(task, args) -> dict:
    """The same batches for every model: {"train": [(ids, labels), ...], "eval": (ids, labels), "vocab_size", "lr"}.
    A text step is --batch-size blocks of --seq-len tokens; an MQAR step is --mqar-batch-size sequences of --mqar-len
    tokens (its own, smaller steps: recall is learnt in a phase transition after many steps, not many tokens), and
    its eval set is --eval-blocks x --seq-len tokens' worth of sequences."""
    generator = torch.Generator().manual_seed(args.seed)
    if task == "text":
        train_blocks, eval_blocks, vocab_size = text_blocks(args)
        steps = max(1, math.ceil(args.tokens / (args.batch_size * args.seq_len)))
        # Epochs of a fresh permutation each: every block once before any repeats.
        epochs = math.ceil(steps * args.batch_size / len(train_blocks))
        order = torch.cat([torch.randperm(len(train_blocks), generator=generator) for _ in range(epochs)])
        order = order[: steps * args.batch_size].view(steps, args.batch_size)
        return {"train": [(train_blocks[i], train_blocks[i]) for i in order], "eval": (eval_blocks, eval_blocks),
                "vocab_size": vocab_size, "lr": args.lr,
                "epochs": steps * args.batch_size / len(train_blocks)}  # fmt: skip
    steps = max(1, math.ceil(args.mqar_tokens / (args.mqar_batch_size * args.mqar_len)))
    batches = [mqar_batch(args.mqar_batch_size, args, generator) for _ in range(steps)]
    eval_count = max(1, args.eval_blocks * args.seq_len // args.mqar_len)
    return {"train": batches, "eval": mqar_batch(eval_count, args, generator), "vocab_size": 2 * args.mqar_vocab + 1,
            "lr": args.mqar_lr}  # fmt: skip


def markdown(rows, args, device) -> str:
    lines = [
        "# Quality at equal tokens", "",
        f"`python -m training.benchmarks.quality` on {device}; size {args.size}; {args.tokens:.3g} text and "
        f"{args.mqar_tokens:.3g} MQAR training tokens per model, seed {args.seed}"
        f"{'' if args.split_period is None else f', FlowHN split_period {args.split_period}'}"
        f"{', torch.compile' if args.compile else ''}. text: {args.corpus or args.dataset or 'the built-in corpus'}, "
        f"batch {args.batch_size} x {args.seq_len} tokens, lr {args.lr}, eval loss on up to {args.eval_blocks} "
        f"held-out blocks; mqar: {args.mqar_len}-token sequences of {args.pairs} key-value pairs and their queries "
        f"(keys and values from {args.mqar_vocab} ids each: chance {1 / args.mqar_vocab:.1%}), batch "
        f"{args.mqar_batch_size} sequences ({args.mqar_batch_size * args.mqar_len} tokens), lr {args.mqar_lr}; loss "
        "and exact-answer accuracy over the answers of held-out sequences.", "",
        "| task | model | params (M) | train tokens (M) | train tok/s | final train loss | eval loss | eval accuracy "
        "| notes |", "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['task']} | {r['model']} | | | | | | | {r['skipped']} |")
            continue
        lines.append(f"| {r['task']} | {r['model']} | {r['params'] / 1e6:.1f} | {r['train_tokens'] / 1e6:.2f} | "
                     f"{r['train_tokens_per_s']:,.0f} | {r['final_train_loss']:.3f} | {r['eval_loss']:.3f} | "
                     f"{r['eval_accuracy']:.1%} | {r.get('note', '')} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny models on the CPU: tests the script")
    p.add_argument("--tasks", default="text,mqar", help="comma-separated: text, mqar")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    p.add_argument("--size", choices=tuple(SIZES), help="model size (default small; smoke tiny)")
    p.add_argument("--tokens", type=float, help="text training tokens per model (default 20e6; smoke 8192)")
    p.add_argument("--mqar-tokens", type=float, help="MQAR training tokens per model (default 10e6: 1,221 steps of "
                   "the default batch; smoke 8192)")
    p.add_argument("--mqar-len", type=int, help="tokens per MQAR sequence, at least 4 x pairs, at most --seq-len "
                   "(default 256, FlowHN small's split period; smoke 32, tiny's)")
    p.add_argument("--mqar-batch-size", type=int, help="MQAR sequences per step (default 32: 8,192 tokens; smoke 8)")
    p.add_argument("--mqar-lr", type=float, help="MQAR peak learning rate (default: --lr)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default 2048; smoke 64)")
    p.add_argument("--batch-size", type=int, help="sequences per step (default 16; smoke 4)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-period", type=int, help="FlowHN's split_period, the routing pattern's period in tokens "
                   "(default: the preset's)")
    p.add_argument("--compile", action="store_true", help="train under torch.compile (evaluation stays eager)")
    p.add_argument("--max-minutes", type=float, help="stop training at this many minutes from the start")
    p.add_argument("--corpus", type=Path, help="a build_corpus.py output folder: train.bin, eval.bin, meta.json")
    p.add_argument("--dataset", help="else: local text/jsonl/parquet files or a Hub dataset (default: the built-in "
                   "corpus); needs `datasets`")
    p.add_argument("--text-column", default="text")
    p.add_argument("--tokenizer", help="with --dataset: Hub name or path (default: a BPE trained on the corpus)")
    p.add_argument("--vocab-size", type=int, help="vocabulary of that BPE (default 16384; smoke 512)")
    p.add_argument("--eval-blocks", type=int, help="held-out text blocks (and MQAR eval tokens as many blocks' worth)"
                   " (default 128; smoke 4)")
    p.add_argument("--pairs", type=int, help="key-value pairs per MQAR sequence (default 32; smoke 8)")
    p.add_argument("--out-dir", type=Path, help="default: beside this script (runs/quality-smoke with --smoke)")
    args = p.parse_args(argv)
    smoke = args.smoke
    defaults = dict(tokens=8192 if smoke else 20e6, mqar_tokens=8192 if smoke else 10e6, size="tiny" if smoke else
                    "small", seq_len=64 if smoke else 2048, batch_size=4 if smoke else 16,
                    mqar_len=32 if smoke else 256, mqar_batch_size=8 if smoke else 32, mqar_lr=args.lr,
                    vocab_size=512 if smoke else 16384, eval_blocks=4 if smoke else 128, pairs=8 if smoke else 32,
                    out_dir=HERE.parents[1] / "runs" / "quality-smoke" if smoke else HERE)  # fmt: skip
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    for task in args.tasks:
        if task not in ("text", "mqar"):
            p.error(f"--tasks: unknown task {task!r}: choose text, mqar")
    for name in args.models:
        if name not in MODELS:
            p.error(f"--models: unknown model {name!r}: choose from {', '.join(MODELS)}")
    for flag in ("mqar_tokens", "mqar_batch_size", "mqar_lr", "pairs", "mqar_len"):
        if getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag):g}: must be positive")
    if 4 * args.pairs > args.mqar_len:
        p.error(f"--pairs {args.pairs}: the pairs and their queries take 4 x pairs tokens, more than --mqar-len "
                f"{args.mqar_len}")
    if args.mqar_len > args.seq_len:
        p.error(f"--mqar-len {args.mqar_len}: longer than --seq-len {args.seq_len}, the models' position range")
    if args.corpus and args.dataset:
        p.error("--corpus and --dataset: choose one")
    args.mqar_vocab = 4 * args.pairs  # keys and values each come from their own range of this many tokens
    if args.split_period is not None:
        try:  # FlowHNConfig's own check, before any work
            flowhn_config("flowhn-FAC", args, args.vocab_size)
        except ValueError as e:
            p.error(f"--split-period {args.split_period}: {e}")
    return args


def write_reports(rows, args, device):
    report = markdown(rows, args, torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    for out in [args.out_dir] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else []):
        out.mkdir(parents=True, exist_ok=True)
        (out / "QUALITY.md").write_text(report)
        (out / "quality.json").write_text(json.dumps(rows, indent=1, default=str))
    return report


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    deadline = time.perf_counter() + (math.inf if args.max_minutes is None else 60 * args.max_minutes)
    rows = []
    for task in args.tasks:
        data = task_data(task, args)
        if "epochs" in data:
            print(f"text: {len(data['train'])} steps, {data['epochs']:.2f} epochs of the training blocks", flush=True)
        else:
            print(f"mqar: {len(data['train'])} steps of {args.mqar_batch_size} sequences x {args.mqar_len} tokens, "
                  f"{len(data['eval'][0])} eval sequences", flush=True)
        for name in args.models:
            if time.perf_counter() > deadline:
                skipped = f"not run: past --max-minutes {args.max_minutes:g}"
                rows.append({"task": task, "model": name, "skipped": skipped})
            else:
                rows.append(run_task(task, name, args, device, data, deadline))
            print(json.dumps(rows[-1]), flush=True)
            write_reports(rows, args, device)  # after every row: a run cut short keeps what it measured
        del data
    print(write_reports(rows, args, device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
