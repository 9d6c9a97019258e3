"""Build the real-text corpus for `quality.py` from English documentation shipped in Debian packages, pre-tokenized.

The GPU machine has no network and no `datasets`, and the Hugging Face Hub is out of reach from here; Debian's
package archive is not. The documentation packages below (Debian 12 "bookworm", section main, so under free
licences: each package's /usr/share/doc/PACKAGE/copyright says which) ship about 105 MB of English text: the Linux
kernel's documentation, the Python, Perl, PostgreSQL, Erlang, Django, Git, Node.js, SciPy, Octave, Maxima and Rust
manuals and books, the Debian Administrator's Handbook and Debian Reference, the GNU coding standards and the Jargon
File. It is technical writing (with code examples), not web text; fine for comparing models trained on the same
tokens, not for absolute numbers. None of it is committed: the .debs and the extracted files stay under --raw-dir,
the outputs under --out-dir (git-ignored by default).

Steps: `apt-get download` the packages (skipped for those already there), `dpkg-deb -x` them, read each document
(plain text, reStructuredText, POD, Markdown, or HTML reduced to its text), drop exact duplicates and fragments,
shuffle the documents with a fixed seed, hold out the first ones (--eval-chars) as the eval slice, train a
byte-level BPE on the rest (`training.corpus.train_bpe_tokenizer`), and write, EOS after each document:

    OUT/train.bin   uint16 token ids, at most --max-train-tokens (the file-size limit of the transfer)
    OUT/eval.bin    uint16 token ids of the held-out documents
    OUT/tokenizer/  the tokenizer (save_pretrained)
    OUT/meta.json   vocabulary, EOS id, documents, tokens and characters per source, the package versions

    python -m training.benchmarks.build_corpus    # 230 MB download, then about 3 minutes on 2 cores; apt-get, dpkg-deb
"""

import argparse
import gzip
import hashlib
import html.parser
import json
import random
import re
import subprocess
from pathlib import Path

import numpy as np

from training.corpus import train_bpe_tokenizer

REPO = Path(__file__).resolve().parents[2]
# (package, files under its extracted tree); the format follows from the name (.html: text extracted, else as is).
SOURCES = (
    ("linux-doc-6.1", "usr/share/doc/linux-doc-6.1/Documentation/**/*.{rst,txt}.gz"),
    ("python3.11-doc", "usr/share/doc/python3.11/html/_sources/**/*.rst.txt"),
    ("perl-doc", "usr/share/perl/*/pod/*.pod"),
    ("postgresql-doc-15", "usr/share/doc/postgresql-doc-15/html/*.html"),
    ("erlang-doc", "usr/share/doc/erlang-doc/**/*.html"),
    ("python-django-doc", "usr/share/doc/python-django-doc/html/**/*.html"),
    ("git-doc", "usr/share/doc/git-doc/**/*.txt"),
    ("nodejs-doc", "usr/share/doc/nodejs/api/*.md.gz"),
    ("python-scipy-doc", "usr/share/doc/python-scipy-doc/html/**/*.html"),
    ("octave-doc", "usr/share/doc/octave/octave.html/*.html"),
    ("maxima-doc", "usr/share/doc/maxima-doc/html/*.html"),
    ("rust-doc", "usr/share/doc/rust-doc/html/{book,reference,nomicon,rust-by-example,embedded-book,rustc,"
     "cargo,edition-guide,rustdoc,unstable-book}/**/*.html"),
    ("sphinx-doc", "usr/share/doc/sphinx-doc/html/_sources/**/*.txt"),
    ("debian-handbook", "usr/share/doc/debian-handbook/html/en-US/*.html"),
    ("debian-reference-en", "usr/share/debian-reference/*.en.html"),
    ("abs-guide", "usr/share/doc/abs-guide/html/*.html"),
    ("gnu-standards", "usr/share/doc/gnu-standards/*.text.gz"),
    ("jargon-text", "usr/share/doc/jargon-text/jargon.txt.gz"),
)  # fmt: skip
SKIP_PATHS = ("/translations/",)  # the kernel documentation's Chinese, Italian, Japanese, Korean, Spanish versions
MIN_CHARS = 500  # shorter documents are mostly indexes and stubs


class _HTMLText(html.parser.HTMLParser):
    """The visible text of an HTML page, a line break at each block element, without scripts, styles and navigation."""

    SKIP = {"script", "style", "nav", "head", "header", "footer"}
    BLOCK = {"p", "div", "br", "li", "tr", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "dt", "dd", "table", "section"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.skipping = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.skipping:
            self.skipping -= 1
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)


def read_document(path: Path) -> str:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    if ".htm" in path.name:
        parser = _HTMLText()
        parser.feed(text)
        text = "".join(parser.parts)
    text = re.sub(r"[ \t]+\n", "\n", text.replace("\r\n", "\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def expand(pattern: str) -> list[str]:
    """`{a,b}` alternatives of a glob pattern (pathlib's glob has none)."""
    match = re.search(r"\{([^}]*)\}", pattern)
    if not match:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [p for alt in match.group(1).split(",") for p in expand(head + alt + tail)]


def fetch(packages, raw_dir: Path) -> dict[str, str]:
    """Download and extract the packages that are not there yet; {package: version}."""
    debs = raw_dir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if not list(debs.glob(f"{p}_*.deb"))]
    if missing:
        subprocess.run(["apt-get", "download", *missing], cwd=debs, check=True)
    versions = {}
    for package in packages:
        deb = sorted(debs.glob(f"{package}_*.deb"))[-1]
        versions[package] = deb.name.split("_")[1].replace("%3a", ":")
        root = raw_dir / "root" / package
        if not root.exists():
            root.mkdir(parents=True)
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return versions


def documents(raw_dir: Path) -> list[tuple[str, str]]:
    """(package, text) of every document, exact duplicates and fragments dropped, in a fixed order."""
    seen, docs = set(), []
    for package, pattern in SOURCES:
        root = raw_dir / "root" / package
        paths = sorted({p for pat in expand(pattern) for p in root.glob(pat)
                        if p.is_file() and not any(skip in str(p) for skip in SKIP_PATHS)})  # fmt: skip
        if not paths:
            raise FileNotFoundError(f"{package}: nothing matches {pattern} under {root}")
        for path in paths:
            text = read_document(path)
            digest = hashlib.sha1(text.encode()).digest()
            if len(text) >= MIN_CHARS and digest not in seen:
                seen.add(digest)
                docs.append((package, text))
    return docs


def tokenize(docs, tokenizer, sources: dict, limit: int) -> np.ndarray:
    """The documents' token ids, EOS after each, as one uint16 array cut at `limit` tokens; counts documents, tokens
    and characters per source into `sources`."""
    arrays, total = [], 0
    for start in range(0, len(docs), 1000):
        batch = docs[start : start + 1000]
        for (package, text), ids in zip(batch, tokenizer([text for _, text in batch])["input_ids"]):
            ids = np.asarray(ids + [tokenizer.eos_token_id], dtype=np.uint16)
            count = sources.setdefault(package, {"documents": 0, "tokens": 0, "characters": 0})
            count["documents"] += 1
            count["tokens"] += len(ids)
            count["characters"] += len(text)
            arrays.append(ids)
            total += len(ids)
        if total >= limit:
            break
    return np.concatenate(arrays)[:limit]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--raw-dir", type=Path, default=Path("/tmp/corpus_raw"), help=".debs and extracted files")
    p.add_argument("--out-dir", type=Path, default=REPO / ".carry" / "corpus")
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--max-train-tokens", type=float, default=21.5e6, help="uint16: 2 bytes a token (43 MB)")
    p.add_argument("--eval-chars", type=float, default=2e6, help="held out, whole documents (about 0.5M tokens)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.vocab_size > 2**16:
        p.error("--vocab-size must fit uint16")

    versions = fetch([package for package, _ in SOURCES], args.raw_dir)
    docs = documents(args.raw_dir)
    random.Random(args.seed).shuffle(docs)
    held_out = np.searchsorted(np.cumsum([len(text) for _, text in docs]), args.eval_chars) + 1
    splits = {"eval": docs[:held_out], "train": docs[held_out:]}
    print(f"{len(docs)} documents, {sum(len(t) for _, t in docs) / 1e6:.1f} M characters", flush=True)
    tokenizer = train_bpe_tokenizer((text for _, text in splits["train"]), args.vocab_size)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    tokens, sources = {}, {}
    for name, split_docs in splits.items():
        ids = tokenize(split_docs, tokenizer, sources.setdefault(name, {}), limit=int(args.max_train_tokens))
        ids.tofile(args.out_dir / f"{name}.bin")
        tokens[name] = len(ids)
        print(f"{name}: {len(ids) / 1e6:.2f} M tokens", flush=True)
    tokenizer.save_pretrained(args.out_dir / "tokenizer")
    meta = {
        "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id, "dtype": "uint16", "tokens": tokens,
        "documents": {name: len(d) for name, d in splits.items()}, "characters": sum(len(t) for _, t in docs),
        "seed": args.seed, "sources": sources,
        "packages": {package: {"version": versions[package], "files": pattern} for package, pattern in SOURCES},
        "origin": "Debian 12 bookworm main, apt-get download; see training/benchmarks/build_corpus.py",
    }  # fmt: skip
    (args.out_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps({"tokens": tokens, "vocab_size": meta["vocab_size"]}), flush=True)


if __name__ == "__main__":
    main()
