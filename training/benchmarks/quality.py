"""Quality at equal tokens (issue 6): FlowHN flop_aware_circulating, FlowHN none and a Llama of the same size, each
trained from the same seed on the same tokens in the same order, on two tasks:

- text: next-token loss on a held-out slice of a real-text corpus (`--dataset`, default the built-in corpus);
- mqar: multi-query associative recall. A sequence lists `--pairs` key-value pairs, then asks for the values of the
  keys in a shuffled order; the loss counts the answers only, and accuracy is the share of answers predicted exactly.
  It probes what a recurrent state can store, where attention and DeltaNet differ most.

    python -m training.benchmarks.quality --tokens 20e6 --dataset DIR_OR_HUB_NAME --tokenizer HUB_OR_PATH
    python -m training.benchmarks.quality --smoke        # CPU, tiny models, under a minute

Prints a markdown table and writes QUALITY.md and quality.json to --out-dir (and to $OUT when set).
"""

import argparse
import json
import math
import os
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from training.benchmarks.throughput import build_model
from training.corpus import train_bpe_tokenizer
from training.data import load_text_dataset, pack_documents

HERE = Path(__file__).resolve().parent
MODELS = ("flowhn-FAC", "flowhn-none", "llama")


def text_blocks(args) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, eval) blocks of `--seq-len` tokens of the corpus; the first `--eval-blocks` are held out."""
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
    return blocks[args.eval_blocks:], blocks[: args.eval_blocks]


def mqar_batch(count: int, args, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` recall sequences (input ids, labels with -100 everywhere but the answers)."""
    pairs, vocab = args.pairs, args.mqar_vocab
    keys = torch.rand(count, vocab, generator=generator).argsort(1)[:, :pairs] + 1
    values = torch.randint(vocab + 1, 2 * vocab + 1, (count, pairs), generator=generator)
    order = torch.rand(count, pairs, generator=generator).argsort(1)
    context = torch.stack([keys, values], 2).flatten(1)
    queries = torch.stack([keys.gather(1, order), values.gather(1, order)], 2).flatten(1)
    ids = torch.cat([context, queries], 1)
    labels = torch.full_like(ids, -100)
    labels[:, 2 * pairs + 1 :: 2] = ids[:, 2 * pairs + 1 :: 2]  # the answers: the values after the query keys
    return ids, labels


def train(model, batches, args, device) -> list[float]:
    """AdamW + cosine over `batches` (a list of (ids, labels)); the training losses."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, fused=device.type == "cuda")
    schedule = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, max(1, len(batches) // 20), len(batches), min_lr_rate=0.1
    )
    model.train()
    losses = []
    for ids, labels in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=ids.to(device), labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@torch.no_grad()
def evaluate(model, ids, labels, device, batch_size) -> tuple[float, float]:
    """(mean loss over the labelled tokens, share of them predicted exactly) in eval mode."""
    model.eval()
    total, correct, count = 0.0, 0, 0
    for start in range(0, len(ids), batch_size):
        x, y = ids[start : start + batch_size].to(device), labels[start : start + batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=x).logits[:, :-1].float()
        target = y[:, 1:]
        keep = target != -100
        total += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
        correct += (logits.argmax(-1)[keep] == target[keep]).sum().item()
        count += keep.sum().item()
    return total / count, correct / count


def run_task(task, name, args, device, data) -> dict:
    model_args = SimpleNamespace(preset=args.preset, seq_len=args.seq_len, smoke=args.smoke, prompt_len=args.seq_len,
                                 new_tokens=2)  # fmt: skip
    torch.manual_seed(args.seed)
    model, _ = build_model(name, model_args, {})
    model.to(device)
    started = time.perf_counter()
    losses = train(model, data["train"], args, device)
    eval_loss, accuracy = evaluate(model, *data["eval"], device, args.batch_size)
    row = {"task": task, "model": name, "params": sum(p.numel() for p in model.parameters()),
           "train_tokens": sum(ids.numel() for ids, _ in data["train"]), "final_train_loss": losses[-1],
           "eval_loss": eval_loss, "eval_accuracy": accuracy, "seconds": time.perf_counter() - started}  # fmt: skip
    del model
    return row


def task_data(task, args) -> dict:
    """The same batches for every model: {"train": [(ids, labels), ...], "eval": (ids, labels)}."""
    length = args.seq_len if task == "text" else 4 * args.pairs
    steps = max(1, math.ceil(args.tokens / (args.batch_size * length)))
    if task == "text":
        train_blocks, eval_blocks = text_blocks(args)
        order = torch.randint(0, len(train_blocks), (steps, args.batch_size),
                              generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
        return {"train": [(train_blocks[i], train_blocks[i]) for i in order], "eval": (eval_blocks, eval_blocks)}
    generator = torch.Generator().manual_seed(args.seed)
    batches = [mqar_batch(args.batch_size, args, generator) for _ in range(steps)]
    return {"train": batches, "eval": mqar_batch(args.eval_blocks * 4, args, generator)}


def markdown(rows, args, device) -> str:
    lines = [
        "# Quality at equal tokens", "",
        f"`python -m training.benchmarks.quality` on {device}; {args.tokens:.3g} training tokens per model and task, "
        f"batch {args.batch_size} x {args.seq_len}, lr {args.lr}, seed {args.seed}. text: eval loss on "
        f"{args.eval_blocks} held-out blocks; mqar: {args.pairs} key-value pairs, loss and exact-answer accuracy over "
        "the answers of held-out sequences.", "",
        "| task | model | params (M) | final train loss | eval loss | eval accuracy |", "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['task']} | {r['model']} | {r['params'] / 1e6:.1f} | {r['final_train_loss']:.3f} | "
                     f"{r['eval_loss']:.3f} | {r['eval_accuracy']:.1%} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny models on the CPU: tests the script")
    p.add_argument("--tasks", default="text,mqar", help="comma-separated: text, mqar")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    p.add_argument("--tokens", type=float, help="training tokens per model and task (default 20e6; smoke 8192)")
    p.add_argument("--preset", help="FlowHN preset the others are sized to (default 135m; smoke tiny)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default 2048; smoke 64)")
    p.add_argument("--batch-size", type=int, help="sequences per step (default 16; smoke 4)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", help="local text/jsonl/parquet files or a Hub dataset (default: the built-in corpus)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--tokenizer", help="Hub name or path (default: a BPE trained on the corpus)")
    p.add_argument("--vocab-size", type=int, help="vocabulary of that BPE (default 16384; smoke 512)")
    p.add_argument("--eval-blocks", type=int, help="held-out text blocks / a quarter of the eval MQAR sequences")
    p.add_argument("--pairs", type=int, help="key-value pairs per MQAR sequence (default 64; smoke 8)")
    p.add_argument("--out-dir", type=Path, help="default: beside this script (runs/quality-smoke with --smoke)")
    args = p.parse_args(argv)
    smoke = args.smoke
    defaults = dict(tokens=8192 if smoke else 20e6, preset="tiny" if smoke else "135m", seq_len=64 if smoke else 2048,
                    batch_size=4 if smoke else 16, vocab_size=512 if smoke else 16384, eval_blocks=4 if smoke else 32,
                    pairs=8 if smoke else 64,
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
    if 4 * args.pairs > args.seq_len:
        p.error(f"--pairs {args.pairs}: an MQAR sequence of 4 x pairs tokens must fit in --seq-len {args.seq_len}")
    args.mqar_vocab = 4 * args.pairs  # keys and values each come from their own range of this many tokens
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    rows = []
    for task in args.tasks:
        data = task_data(task, args)
        for name in args.models:
            rows.append(run_task(task, name, args, device, data))
            print(json.dumps(rows[-1]), flush=True)
    report = markdown(rows, args, torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    print(report)
    for out in [args.out_dir] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else []):
        out.mkdir(parents=True, exist_ok=True)
        (out / "QUALITY.md").write_text(report)
        (out / "quality.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
