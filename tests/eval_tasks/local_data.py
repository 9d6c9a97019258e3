"""Loader for the local test tasks: reads a jsonl file that sits beside the task YAMLs."""

import json
from pathlib import Path

import datasets


def load(data_file: str, **_metadata) -> datasets.DatasetDict:
    """Return {"test": rows of `data_file`}; lm-eval passes the task metadata as extra kwargs."""
    lines = (Path(__file__).parent / data_file).read_text().splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(line) for line in lines])})
