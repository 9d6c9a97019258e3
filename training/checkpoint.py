"""Atomic checkpoints of a run: `output_dir/checkpoints/step_XXXXXXXX/`.

Each is `accelerator.save_state` (weights, optimizer, scheduler, RNG) plus `trainer_state.json`,
`config.json` and the tokenizer, written into a hidden temporary directory that is renamed into
place once complete; only then are older checkpoints pruned. A crash during a save leaves at worst
a `.tmp-*` directory that is never read and is removed by the next save.
"""

import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

STATE_FILE = "trainer_state.json"
PREFIX = "step_"


def checkpoint_root(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(output_dir) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def resolve_checkpoint(path) -> Path:
    """A checkpoint directory, or the latest checkpoint of a run directory."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise ValueError(f"CHECKPOINT {path}: neither a flowhn-train checkpoint (no {STATE_FILE}) "
                         "nor a run directory holding checkpoints")
    return latest


class _TiedHeadNote(logging.Filter):
    """Drops accelerate's warning that `save_state` left a tied output head out of the safetensors file (it warns at
    every save and asks the reader to check the reload). The model ties the head back to the embedding when it
    loads, and resumed runs repeat the uninterrupted run's losses exactly (tests/test_training.py)."""

    NOTE = re.compile(r"Removed shared tensor \{(.*)\} while saving")

    def filter(self, record):
        found = self.NOTE.search(record.getMessage())
        return not found or not all(n.strip(" '").endswith("lm_head.weight") for n in found.group(1).split(","))


@contextlib.contextmanager
def _quiet_tied_head():
    logger, note = logging.getLogger("accelerate.utils.other"), _TiedHeadNote()
    logger.addFilter(note)
    try:
        yield
    finally:
        logger.removeFilter(note)


def read_state(checkpoint) -> dict:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def save_checkpoint(accelerator, output_dir, step: int, state: dict, config, tokenizer, keep: int) -> Path:
    """Save the run at `step` atomically and keep the newest `keep` checkpoints. Every process calls it."""
    root = checkpoint_root(output_dir)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    with _quiet_tied_head():
        accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        config.to_json_file(tmp / "config.json")
        tokenizer.save_pretrained(tmp)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        if final.exists():  # an older checkpoint of this step: move it aside, the stale sweep removes it
            os.replace(final, root / f".tmp-replaced-{final.name}")
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
