"""Text datasets to fixed-length token blocks: loading, checks, packing, held-out split, resumable order.

Documents are tokenized, each followed by EOS, concatenated and cut into blocks of `seq_len`
tokens (standard GPT pretraining). The first `eval_blocks` blocks are the held-out slice; the
training blocks are served by a global index, so the data position of a run is a pure function
of its step count and resuming from a checkpoint replays exactly the same batches.
"""

from itertools import islice
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from training.corpus import builtin_corpus_files

EXTENSION_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _local_files(path: Path) -> tuple[str, list[str]]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in EXTENSION_BUILDERS)
    if not files:
        raise ValueError(f"--dataset {path}: no .txt, .jsonl, .json or .parquet files in it")
    builders = {EXTENSION_BUILDERS.get(p.suffix) for p in files}
    if None in builders or len(builders) > 1:
        suffixes = sorted({p.suffix for p in files})
        raise ValueError(f"--dataset {path}: files must all be .txt, .jsonl/.json or .parquet, got {suffixes}")
    if all(p.stat().st_size == 0 for p in files):
        raise ValueError(f"--dataset {path}: the dataset is empty (every file has 0 bytes)")
    return builders.pop(), [str(p) for p in files]


def load_text_dataset(
    dataset: str | None,
    dataset_config: str | None = None,
    split: str = "train",
    streaming: bool = False,
    text_column: str = "text",
) -> datasets.Dataset | datasets.IterableDataset:
    """The raw documents: built-in corpus (`dataset=None`), local files or a Hub dataset.

    Local .txt files give one document per file; .jsonl / .parquet one per row.
    """
    if dataset is None:
        ds = datasets.load_dataset("text", data_files=builtin_corpus_files(), sample_by="document", split="train")
    elif Path(dataset).exists():
        builder, files = _local_files(Path(dataset))
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=streaming, **kwargs)
        except Exception as e:  # malformed json / parquet
            raise ValueError(f"--dataset {dataset}: cannot be read as {builder} files: {type(e).__name__}: {e}") from e
    else:
        try:
            ds = datasets.load_dataset(dataset, dataset_config, split=split, streaming=streaming)
        except Exception as e:  # DatasetNotFoundError, connection errors, bad config or split
            raise ValueError(
                f"--dataset {dataset!r} is neither a local path nor a loadable Hub dataset "
                f"(config={dataset_config!r}, split={split!r}): {type(e).__name__}: {e}"
            ) from e
    columns = ds.column_names
    if columns is None:  # a streaming dataset without declared features: look at the first row
        first = next(iter(ds), None)
        columns = [] if first is None else list(first)
    if text_column not in columns:
        raise ValueError(f"--text-column {text_column!r} is not a column of the dataset; its columns are {columns}")
    return ds


def pack_documents(ds, tokenizer, text_column: str, seq_len: int):
    """Tokenize, append EOS to each document, and cut the concatenation into `seq_len`-token blocks.

    Works on map-style and streaming datasets alike; the tail of each map batch shorter than a
    block is dropped (as in transformers' run_clm).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token: documents cannot be joined")

    def pack(batch):
        ids = [tok + [eos] for tok in tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]]
        flat = np.fromiter((t for doc in ids for t in doc), dtype=np.int64)
        n = len(flat) // seq_len
        return {"input_ids": flat[: n * seq_len].reshape(n, seq_len).tolist()}

    kwargs = {} if isinstance(ds, datasets.IterableDataset) else {"desc": "tokenizing and packing"}
    columns = ds.column_names or list(next(iter(ds)))  # a streaming dataset may not declare its columns
    return ds.map(pack, batched=True, batch_size=1000, remove_columns=columns, **kwargs)


class BlockSource:
    """Held-out blocks and training blocks by global index, for map-style or streaming packs.

    Map-style: training blocks are reshuffled each epoch with a seeded permutation, so block `g`
    is found without reading anything before it. Streaming: blocks come in stream order and a
    resumed run skips forward to its position.
    """

    def __init__(self, blocks, eval_blocks: int, seq_len: int, seed: int):
        self.seq_len, self.seed = seq_len, seed
        self.streaming = isinstance(blocks, datasets.IterableDataset)
        if self.streaming:
            self.blocks = blocks
            head = [row["input_ids"] for row in islice(iter(blocks), eval_blocks + 1)]
            self.num_train = None
        else:
            self.blocks = blocks.with_format("numpy")
            head = [self.blocks[i]["input_ids"] for i in range(min(eval_blocks + 1, len(blocks)))]
            self.num_train = len(blocks) - eval_blocks
        if len(head) <= eval_blocks:
            raise ValueError(
                f"the dataset is too small: it packs into {len(head)} blocks of --seq-len {seq_len} tokens, "
                f"and at least {eval_blocks + 1} are needed (--eval-blocks {eval_blocks} held out + 1 to train on)"
            )
        self.eval = torch.tensor(np.array(head[:eval_blocks]), dtype=torch.long)
        self.eval_blocks = eval_blocks
        self._perm_epoch, self._perm = -1, None
        self._stream, self._stream_pos = None, 0

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_train)
            self._perm_epoch = epoch
        return self._perm

    def _next_streamed(self) -> list[int]:
        if self._stream is None:
            self._stream = islice(iter(self.blocks), self.eval_blocks, None)
        row = next(self._stream, None)
        if row is None:  # end of the stream: start the next epoch
            self._stream = None
            return self._next_streamed()
        self._stream_pos += 1
        return row["input_ids"]

    def sample_train_tokens(self, max_tokens: int) -> torch.Tensor:
        """The first training blocks, up to `max_tokens` tokens, read without moving the stream."""
        count = max(1, max_tokens // self.seq_len)
        if self.streaming:
            rows = [row["input_ids"] for row in islice(iter(self.blocks), self.eval_blocks, self.eval_blocks + count)]
        else:
            end = self.eval_blocks + min(count, self.num_train)
            rows = self.blocks[self.eval_blocks:end]["input_ids"]
        return torch.tensor(np.array(rows), dtype=torch.long)

    def train_batch(self, start: int, count: int) -> torch.Tensor:
        """Training blocks `start .. start + count - 1` (global indices over epochs), as a LongTensor."""
        if self.streaming:
            if start < self._stream_pos:
                raise ValueError(f"streamed blocks are read forward only: block {start} is behind {self._stream_pos}")
            while self._stream_pos < start:
                self._next_streamed()
            rows = np.array([self._next_streamed() for _ in range(count)])
        else:  # one read of the dataset for the whole batch
            index = [self.eval_blocks + int(self._permutation(epoch)[pos])
                     for epoch, pos in (divmod(g, self.num_train) for g in range(start, start + count))]
            rows = self.blocks[index]["input_ids"]
        return torch.as_tensor(rows, dtype=torch.long)


def model_inputs(blocks: torch.Tensor, eos_token_id: int | None) -> dict:
    """The model's inputs for a batch of packed blocks. With `eos_token_id`, position ids restart after every EOS, so
    the model keeps the packed documents apart (attention and the DeltaNet state stop at each boundary)."""
    inputs = {"input_ids": blocks, "labels": blocks}
    if eos_token_id is not None:
        index = torch.arange(blocks.shape[1], device=blocks.device).expand_as(blocks)
        starts = torch.where(F.pad(blocks[:, :-1] == eos_token_id, (1, 0)), index, 0)
        inputs["position_ids"] = index - starts.cummax(1).values
    return inputs


def unigram_entropy(blocks: torch.Tensor, vocab_size: int) -> float:
    """Entropy in nats of the token frequencies in `blocks`: the loss of the best context-free model."""
    counts = torch.bincount(blocks.flatten(), minlength=vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())
