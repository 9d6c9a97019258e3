"""The built-in English corpus and the byte-level BPE tokenizer trained on a corpus in seconds."""

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

DATA_DIR = Path(__file__).resolve().parent / "data"
# Six public-domain Shakespeare works (about 700 KB); data/NOTICE.txt says where they come from.
BUILTIN_FILES = ("hamlet", "macbeth", "romeo_and_juliet", "tempest", "midsummer_nights_dream", "sonnets")
EOS_TOKEN = "<|endoftext|>"


def builtin_corpus_files() -> list[str]:
    """Paths of the built-in corpus, one document per file."""
    return [str(DATA_DIR / f"{name}.txt") for name in BUILTIN_FILES]


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style, one EOS special token) on `texts`."""
    if vocab_size < 257:
        raise ValueError(f"--vocab-size must be at least 257 (256 bytes + EOS), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
        model_max_length=int(1e30),
    )
