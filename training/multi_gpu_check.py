"""Multi-GPU check: one process, DDP and FSDP2 train the same run to the same losses; the FSDP2 checkpoint exports.

    python3 -m training.multi_gpu_check --out multi_gpu_check.md                # 2 GPUs, bf16
    python3 -m training.multi_gpu_check --cpu --steps 3 --out multi_gpu_check.md  # 2 CPU processes (gloo), fp32

Three runs of the tiny preset with one seed and one global batch: one process accumulating N micro-batches
(configs/single_gpu.yaml), N processes with DDP (configs/ddp.yaml) and N with FSDP2 (configs/fsdp2.yaml, sharded
checkpoints). It compares every step's train loss with the one-process run, loads the Hub-ready folder each run
exported at its end (for FSDP2: merged from the sharded checkpoint) with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`, checks that its held-out loss equals the run's
last eval loss, and compares the FSDP2 export with the one-process export (held-out loss; the largest logit
difference is reported). It writes a markdown report to --out and exits 0 when every check passes, 1 otherwise.

On CPU Accelerate has no FSDP, so the FSDP2 run goes through `training.fsdp_on_cpu`, which turns it on.
"""

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from training.data import BlockSource, load_text_dataset, model_inputs, pack_documents

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"one process": "single_gpu", "DDP": "ddp", "FSDP2": "fsdp2"}
# The training run of each device kind: small enough for well under a minute per run (Triton compile included).
TRAIN = {
    "gpu": dict(seq_len=128, micro_batch_size=16, eval_blocks=16, vocab_size=2048),
    "cpu": dict(seq_len=64, micro_batch_size=4, eval_blocks=4, vocab_size=512),
}
BF16_RTOL = 2**-7  # two bf16 epsilons: bf16 autocast and FSDP2's bf16 reduce_dtype reorder roundings
FP32_RTOL = 1e-5


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.multi_gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="markdown report to write")
    p.add_argument("--work-dir", help="new or empty folder for the three runs (default: a new temporary folder)")
    p.add_argument("--num-processes", type=int, default=2, help="processes of the DDP and FSDP2 runs (2)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps of each run (40)")
    p.add_argument("--seed", type=int, default=0, help="seed of every run (0)")
    p.add_argument("--rtol", type=float,
                   help=f"allowed |loss - one-process loss| / one-process loss (default {BF16_RTOL:g} in bf16 on "
                        f"GPUs, {FP32_RTOL:g} in fp32 on CPU)")
    p.add_argument("--cpu", action="store_true", help="run on CPU processes (gloo) in fp32 instead of GPUs")
    p.add_argument("--compile", action="store_true", help="pass --compile to every run")
    p.add_argument("--timeout", type=float, default=150, help="seconds one run may take before it fails (150)")
    args = p.parse_args(argv)
    if args.num_processes < 2:
        p.error(f"--num-processes must be at least 2, got {args.num_processes}")
    if args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    if args.work_dir is not None and Path(args.work_dir).is_dir() and any(Path(args.work_dir).iterdir()):
        p.error(f"--work-dir {args.work_dir} is not empty: the runs need fresh output folders")
    if args.rtol is None:
        args.rtol = FP32_RTOL if args.cpu else BF16_RTOL
    if not args.cpu and torch.cuda.device_count() < args.num_processes:
        p.error(f"--num-processes {args.num_processes} needs as many GPUs, found {torch.cuda.device_count()} "
                "(--cpu runs on CPU processes)")
    return args


def train(name: str, args, work: Path) -> tuple[Path, float]:
    """Launch one training run with Accelerate; return its output dir and wall time. Raise RuntimeError on failure."""
    kind = "cpu" if args.cpu else "gpu"
    processes = 1 if name == "one process" else args.num_processes
    out = work / CONFIGS[name]
    train_args = [f"--{key.replace('_', '-')}={value}" for key, value in TRAIN[kind].items()]
    train_args += ["--preset=tiny", f"--max-steps={args.steps}", f"--seed={args.seed}",
                   f"--grad-accum={args.num_processes // processes}", f"--eval-every={max(1, args.steps // 2)}",
                   f"--save-every={args.steps}", "--sample-tokens=0", "--report-to=none", f"--output-dir={out}"]
    train_args += ["--mixed-precision=no"] if args.cpu else []
    train_args += ["--compile"] if args.compile else []
    entry = "training.fsdp_on_cpu" if args.cpu and name == "FSDP2" else "training.pretrain"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "training" / "configs" / f"{CONFIGS[name]}.yaml"), "--num_processes", str(processes),
           "-m", entry, *train_args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           **({"ACCELERATE_USE_CPU": "true"} if args.cpu else {})}
    log = work / f"{CONFIGS[name]}.log"
    print(f"{name}: {' '.join(cmd)}\n  log: {log}", flush=True)
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            # SIGTERM to the launcher's group: a one-process launch's worker is in it; torchrun's workers have
            # sessions of their own, and torchrun stops them on SIGTERM.
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            raise RuntimeError(f"{name}: no result after {args.timeout:.0f} s; see {log}") from None
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"{name}: exit status {proc.returncode}; the end of {log}:\n{tail}")
    return out, time.perf_counter() - start


def read_metrics(run_dir: Path) -> tuple[dict[int, float], float]:
    """Train loss of each step and the last eval loss, from the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {row["step"]: row["train/loss"] for row in rows}
    eval_loss = [row["eval/loss"] for row in rows if "eval/loss" in row][-1]
    return losses, eval_loss


@torch.no_grad()
def exported_model_eval(hub: Path, args, device) -> tuple[float, torch.Tensor]:
    """Held-out loss of an exported folder loaded with remote code (as training evaluates: bf16 autocast on GPU),
    and its float32 logits on the first held-out block."""
    model = AutoModelForCausalLM.from_pretrained(hub, trust_remote_code=True).to(device).eval()
    settings = TRAIN["cpu" if args.cpu else "gpu"]
    raw = load_text_dataset(None)
    blocks = pack_documents(raw, AutoTokenizer.from_pretrained(hub, trust_remote_code=True), "text",
                            settings["seq_len"])
    held_out = BlockSource(blocks, settings["eval_blocks"], settings["seq_len"], args.seed).eval.to(device)
    total, batch = 0.0, settings["micro_batch_size"]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.cpu):
        for i in range(0, len(held_out), batch):
            total += model(**model_inputs(held_out[i:i + batch], None)).loss.item() * len(held_out[i:i + batch])
        logits = model(held_out[:1]).logits.float().cpu()
    return total / len(held_out), logits


def loss_table(losses: dict[str, dict[int, float]]) -> str:
    """Markdown table of each step's train loss per run, and each run's difference from the one-process run."""
    others = [name for name in losses if name != "one process"]
    columns = [*losses, *(f"{name} − one" for name in others)]
    rows = ["| step | " + " | ".join(columns) + " |", "|---" * (1 + len(columns)) + "|"]
    for step, one in sorted(losses["one process"].items()):
        values = [f"{losses[name][step]:.5f}" for name in losses]
        gaps = [f"{losses[name][step] - one:+.2e}" for name in others]
        rows.append(f"| {step} | " + " | ".join(values + gaps) + " |")
    return "\n".join(rows)


def check(args, lines: list[str]) -> bool:
    """Run everything, appending the report to `lines` as results come in; return whether every check passed.

    A run that fails is reported and the others are still compared."""
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="flowhn-multi-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.cpu else "cuda")
    where = "CPU (gloo, fp32)" if args.cpu else f"{torch.cuda.get_device_name(0)} (bf16)"
    settings = ", ".join(f"{key} {value}" for key, value in TRAIN["cpu" if args.cpu else "gpu"].items())
    lines += [f"# Multi-GPU check: {args.num_processes} processes on {where}", "",
              f"torch {torch.__version__}; preset tiny, {settings}, {args.steps} steps, seed {args.seed}; the one "
              f"process accumulates {args.num_processes} micro-batches" + (", --compile" if args.compile else "")
              + f". Runs and their logs: `{work}`.", ""]
    runs, results = {}, []
    for name in CONFIGS:
        try:
            runs[name], seconds = train(name, args, work)
            lines.append(f"- {name} run: {seconds:.0f} s (launch, tokenizer, compile, training, export)")
        except RuntimeError as e:
            lines += [f"- {name} run failed:", "", "```", str(e), "```"]
            results.append((f"{name} run", False))
    lines.append("")
    if "one process" not in runs:
        return False
    metrics = {name: read_metrics(run) for name, run in runs.items()}
    losses = {name: m[0] for name, m in metrics.items()}
    one = losses["one process"]
    lines += [loss_table(losses), ""]
    for name in ("DDP", "FSDP2"):
        if name in runs:
            worst = max(abs(losses[name].get(s, math.inf) - one[s]) / abs(one[s]) for s in one)
            results.append((f"{name} train losses within rtol {args.rtol:g} of one process at every step "
                            f"(max relative difference {worst:.2e})", worst <= args.rtol))
    evals, logits = {}, {}
    for name in ("one process", "FSDP2"):
        if name in runs:
            evals[name], logits[name] = exported_model_eval(runs[name] / "hub", args, device)
            run_eval = metrics[name][1]
            results.append((f"{name} export loads with trust_remote_code; its held-out loss {evals[name]:.5f} "
                            f"equals the run's eval loss {run_eval:.5f} within rtol {args.rtol:g}",
                            bool(torch.isfinite(logits[name]).all())
                            and abs(evals[name] - run_eval) <= args.rtol * run_eval))
    if "FSDP2" in runs:
        sharded = (runs["FSDP2"] / "checkpoints" / f"step_{args.steps:08d}" / "pytorch_model_fsdp_0").is_dir()
        results.append(("FSDP2 checkpoint is sharded (`pytorch_model_fsdp_0/`, torch.distributed.checkpoint)",
                        sharded))
        gap = (logits["FSDP2"] - logits["one process"]).abs().max().item()
        results.append((f"FSDP2 and one-process exports: held-out losses within rtol {args.rtol:g} "
                        f"({evals['FSDP2']:.5f} vs {evals['one process']:.5f}; max |logit difference| {gap:.3g})",
                        abs(evals["FSDP2"] - evals["one process"]) <= args.rtol * evals["one process"]))
    lines += [*(f"- {'PASS' if ok else '**FAIL**'}: {text}" for text, ok in results), ""]
    return all(ok for _, ok in results)


def main(argv=None) -> int:
    args = parse_args(argv)
    lines = []
    try:
        passed = check(args, lines)
    except Exception:  # a failed run (RuntimeError) or a bug: the report keeps what came before, and why it stopped
        lines += ["The check stopped:", "", "```", traceback.format_exc().rstrip(), "```", ""]
        passed = False
    lines.append(f"**{'PASS' if passed else 'FAIL'}**")
    report = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    print(report)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
