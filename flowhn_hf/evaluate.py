"""flowhn-eval: score a FlowHN checkpoint with lm-evaluation-harness and record the scores.

The checkpoint is loaded with the installed `flowhn_hf` code (no remote code runs), through
lm-eval's `HFLM` backend, so the numbers match `lm_eval --model hf --model_args
pretrained=DIR,trust_remote_code=True`.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path
from typing import Any

EVAL_EXTRA = "pip install 'flowhn[eval]'"
LM_EVAL_URL = "https://github.com/EleutherAI/lm-evaluation-harness"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
CARD_START = "<!-- flowhn-eval results start -->"
CARD_END = "<!-- flowhn-eval results end -->"


def import_lm_eval():
    """Return the `lm_eval` module with its HF backend, or raise ImportError naming the eval extra."""
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401  (the `hf` backend: needs the [hf] extra)
    except ImportError as err:
        raise ImportError(
            f"flowhn-eval needs lm-evaluation-harness with its HF backend, which is not importable ({err}). "
            f"Install the eval extra: {EVAL_EXTRA}"
        ) from err
    return lm_eval


def check_checkpoint(checkpoint: str | Path) -> Path:
    """Return `checkpoint` as a Path if it is a FlowHN checkpoint directory with weights and a tokenizer."""
    path = Path(checkpoint)
    if not path.exists():
        raise ValueError(f"checkpoint {str(checkpoint)!r} does not exist")
    if not path.is_dir():
        raise ValueError(f"checkpoint {str(checkpoint)!r} is a file; pass the directory written by flowhn-export")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"checkpoint {str(checkpoint)!r} is not a FlowHN checkpoint: it has no config.json")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"checkpoint {str(checkpoint)!r} has an unreadable config.json: {err}") from err
    if model_type != "flowhn":
        raise ValueError(
            f"checkpoint {str(checkpoint)!r} is not a FlowHN checkpoint: config.json has model_type "
            f"{model_type!r}, expected 'flowhn' (evaluate other models with `lm_eval --model hf` directly)"
        )
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ValueError(f"checkpoint {str(checkpoint)!r} has no weights (expected one of {', '.join(WEIGHT_FILES)})")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"checkpoint {str(checkpoint)!r} has no tokenizer ({' or '.join(TOKENIZER_FILES)}); "
            "export it with flowhn-export, or save the tokenizer beside the weights with tokenizer.save_pretrained"
        )
    return path


def resolve_tasks(task_manager, tasks: list[str]) -> list[str]:
    """Expand task names, glob patterns and task YAML files; raise ValueError naming any unknown task."""
    resolved, unknown = [], []
    for task in tasks:
        if task.endswith((".yaml", ".yml")) and Path(task).is_file():
            resolved.append(str(Path(task).resolve()))
        elif matches := task_manager.match_tasks([task]):
            resolved.extend(m for m in matches if m not in resolved)
        else:
            unknown.append(task)
    if unknown:
        hints = []
        for task in unknown:
            close = difflib.get_close_matches(task, task_manager.all_tasks, n=3)
            hints.append(f"{task!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise ValueError(
            f"unknown task{'s' if len(unknown) > 1 else ''} in --tasks: {'; '.join(hints)}. "
            "`lm_eval ls tasks` lists the built-in tasks; pass --include-path DIR to add task YAMLs of your own"
        )
    return resolved


def evaluate_checkpoint(
    checkpoint: str | Path,
    tasks: list[str],
    include_path: str | Path | None = None,
    limit: float | None = None,
    batch_size: int | str = 1,
    device: str | None = None,
) -> dict[str, Any]:
    """Run lm-eval on a FlowHN checkpoint directory and return lm-eval's results dict (no samples)."""
    lm_eval = import_lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    import flowhn_hf  # noqa: F401  (registers model_type "flowhn" with the Auto classes)

    path = check_checkpoint(checkpoint)
    if not tasks:
        raise ValueError("--tasks is empty; name at least one lm-eval task")
    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"--include-path {str(include_path)!r} is not a directory")
    if limit is not None and limit <= 0:
        raise ValueError(f"--limit must be positive (a count, or a fraction below 1), got {limit}")
    if batch_size != "auto" and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"--batch-size must be a positive integer or 'auto', got {batch_size!r}")
    device = _check_device(device)

    task_manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    task_names = resolve_tasks(task_manager, tasks)
    lm = HFLM(pretrained=str(path), backend="causal", batch_size=batch_size, device=device)
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=task_names,
        task_manager=task_manager,
        limit=int(limit) if limit is not None and limit >= 1 else limit,
        log_samples=False,
    )


def _check_device(device: str | None) -> str:
    """`device` validated against what torch sees; None picks cuda when available, else cpu."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError as err:
        raise ValueError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from err
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: torch sees no CUDA GPU here; use --device cpu")
    return device


def _scores(metrics: dict[str, Any]):
    """(metric, filter, value) of one task's lm-eval results, without the stderr entries."""
    for key, value in metrics.items():
        metric, _, filter_name = key.partition(",")
        if filter_name and not metric.endswith("_stderr") and isinstance(value, (int, float)):
            yield metric, filter_name, value


def results_table(results: dict[str, Any]) -> str:
    """Markdown table of lm-eval's results: one row per task (or group), metric and filter."""
    rows = ["| Task | Version | Filter | n-shot | Metric | Value | Stderr |", "|---|---|---|---:|---|---:|---:|"]
    for task, metrics in results["results"].items():
        for metric, filter_name, value in _scores(metrics):
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            better = results.get("higher_is_better", {}).get(task, {}).get(metric)
            arrow = {True: " ↑", False: " ↓"}.get(better, "")
            rows.append(
                f"| {metrics.get('alias', task)} | {results['versions'].get(task, 'N/A')} | {filter_name} "
                f"| {results.get('n-shot', {}).get(task, '')} | {metric}{arrow} | {value:.4f} "
                f"| {f'{stderr:.4f}' if isinstance(stderr, (int, float)) else 'N/A'} |"
            )
    return "\n".join(rows) + "\n"


def eval_results(results: dict[str, Any]) -> list:
    """One huggingface_hub EvalResult per (task, metric) of lm-eval's results, for `model-index`."""
    from huggingface_hub import EvalResult

    entries = []
    for task, config in results["configs"].items():
        split = config.get("test_split") or config.get("validation_split")
        for metric, filter_name, value in _scores(results["results"][task]):
            entries.append(
                EvalResult(
                    task_type="text-generation",
                    task_name=task,
                    dataset_type=config.get("dataset_path") or task,
                    dataset_name=task,
                    dataset_config=config.get("dataset_name"),
                    dataset_split=split,
                    dataset_args={"num_few_shot": results.get("n-shot", {}).get(task, 0)},
                    metric_type=metric,
                    metric_name=metric if filter_name == "none" else f"{metric} ({filter_name})",
                    metric_value=round(float(value), 4),
                    source_name="lm-evaluation-harness",
                    source_url=LM_EVAL_URL,
                )
            )
    return entries


def _card_table(entries: list) -> str:
    """Markdown table of the model card's eval results."""
    rows = ["| Task | Metric | n-shot | Value |", "|---|---|---|---:|"]
    for e in entries:
        shots = (e.dataset_args or {}).get("num_few_shot", "")
        task, metric = e.task_name or e.dataset_name, e.metric_name or e.metric_type
        rows.append(f"| {task} | {metric} | {shots} | {e.metric_value} |")
    return "\n".join(rows)


def update_model_card(checkpoint: str | Path, results: dict[str, Any]) -> Path:
    """Merge the scores into CHECKPOINT/README.md as `model-index` metadata plus a results table.

    Scores for the same task, dataset and metric replace the old ones; others are kept. The card
    is created if missing. Results of a `--limit` run are refused: they are not benchmark scores.
    """
    from huggingface_hub import ModelCard

    if results.get("config", {}).get("limit") is not None:
        raise ValueError("these results come from a --limit run (a subset of each task); rerun without --limit")
    path = Path(checkpoint)
    card_path = path / "README.md"
    name = path.resolve().name
    if card_path.is_file():
        card = ModelCard.load(card_path)
    else:
        card = ModelCard(f"---\nlibrary_name: transformers\npipeline_tag: text-generation\n---\n\n# {name}\n")
    new = eval_results(results)

    def key(e):
        return e.unique_identifier, e.metric_type, e.metric_name

    new_keys = {key(e) for e in new}
    kept = [e for e in (card.data.eval_results or []) if key(e) not in new_keys]
    card.data.eval_results = kept + new
    card.data.model_name = card.data.model_name or name

    section = f"{CARD_START}\n{_card_table(card.data.eval_results)}\n{CARD_END}"
    pattern = re.compile(re.escape(CARD_START) + ".*?" + re.escape(CARD_END), re.DOTALL)
    if pattern.search(card.text):
        card.text = pattern.sub(lambda _: section, card.text)
    else:
        card.text = card.text.rstrip("\n") + "\n\n## Evaluation\n\nZero-shot scores from " + (
            f"[lm-evaluation-harness]({LM_EVAL_URL}), written by `flowhn-eval --update-model-card`.\n\n{section}\n"
        )
    card.save(card_path)
    return card_path


def _batch_size(text: str) -> int | str:
    """argparse type for --batch-size: a positive integer or 'auto'."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'auto', got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Console entry point of flowhn-eval."""
    parser = argparse.ArgumentParser(
        prog="flowhn-eval",
        description="Evaluate a FlowHN checkpoint directory with lm-evaluation-harness.",
    )
    parser.add_argument("checkpoint", help="checkpoint directory (flowhn-export or save_pretrained output)")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, globs or task YAML files")
    parser.add_argument("--include-path", help="directory of extra task YAMLs (e.g. local jsonl tasks)")
    parser.add_argument("--limit", type=float, help="documents per task (a fraction if below 1); for smoke tests only")
    parser.add_argument("--batch-size", type=_batch_size, default=1, help="batch size, or 'auto' (default 1)")
    parser.add_argument("--device", help="torch device, e.g. cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--output", type=Path,
                        help="write the results JSON here and the markdown table beside it (.md)")
    parser.add_argument(
        "--update-model-card",
        action="store_true",
        help="write the scores into CHECKPOINT/README.md as model-index metadata (not with --limit)",
    )
    args = parser.parse_args(argv)
    if args.output is not None and args.output.suffix == ".md":
        parser.error("--output names the results JSON; the markdown table goes beside it with the suffix .md")
    if args.update_model_card and args.limit is not None:
        parser.error("--update-model-card records full-benchmark scores; drop --limit to use it")
    try:
        results = evaluate_checkpoint(
            args.checkpoint,
            [t.strip() for t in args.tasks.split(",") if t.strip()],
            include_path=args.include_path,
            limit=args.limit,
            batch_size=args.batch_size,
            device=args.device,
        )
    except (ValueError, ImportError) as err:
        parser.error(str(err))

    from lm_eval.utils import handle_non_serializable

    table = results_table(results)
    print(table)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
        args.output.with_suffix(".md").write_text(table)
        print(f"results written to {args.output} and {args.output.with_suffix('.md')}", file=sys.stderr)
    if args.update_model_card:
        card = update_model_card(args.checkpoint, results)
        print(f"model card updated: {card}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
