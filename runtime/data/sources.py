"""Token sources: the sample corpus, token files on disk, and generated tokens.

A `Corpus` is a 1-D token array (memory-mapped when it comes from a file, so a corpus of any
size costs no memory up front) and, where known, the token offsets at which its documents start.
`open_corpus(path)` reads what people keep:

    PREFIX            a Megatron indexed dataset, PREFIX.bin + PREFIX.idx (python -m launch.tokenize)
    FILE.npy          a 1-D integer NumPy array
    FILE + dtype      a headerless token array (nanoGPT's train.bin: dtype uint16)

Documents of a file without an index are the runs between end-of-document ids.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from runtime.data.indexed import IndexedFormatError, IndexedTokens

SAMPLE_PATH = Path(__file__).with_name("sample.txt")
SCAN_CHUNK = 1 << 24  # ids per slice of a scan: memory stays bounded whatever the corpus size
TOKENIZE_HINT = "write one with `python -m launch.tokenize --out PREFIX FILES...`"


class DataError(ValueError):
    pass


@dataclass
class Corpus:
    name: str  # the file, prefix or "sample", for messages
    tokens: object  # 1-D, sliced as tokens[a:b]
    doc_starts: np.ndarray | None = None  # token offsets where documents start, then the length

    def __len__(self) -> int:
        return len(self.tokens)

    def part(self, begin: int, end: int) -> "Corpus":
        """Tokens [begin, end), with the documents that start inside."""
        starts = None
        if self.doc_starts is not None:
            inside = self.doc_starts[(self.doc_starts > begin) & (self.doc_starts < end)]
            starts = np.concatenate([[0], inside - begin, [end - begin]]).astype(np.int64)
        return Corpus(self.name, TokenRange(self.tokens, begin, end), starts)


class TokenRange:
    """tokens[begin:end] of any sliceable source, without copying."""

    def __init__(self, tokens, begin: int, end: int):
        self.tokens, self.begin, self.end = tokens, begin, end

    def __len__(self) -> int:
        return self.end - self.begin

    def __getitem__(self, s: slice):
        start, stop, _ = s.indices(len(self))
        return self.tokens[self.begin + start:self.begin + stop]


class SyntheticTokens:
    """Learnable generated sequences: sequence i counts up from a random start by a random
    stride modulo the vocabulary. Indexed like an array of `length` tokens made of
    back-to-back sequences of `period` tokens, so the loader treats it like a corpus."""

    period = 4096

    def __init__(self, vocab_size: int, seed: int, length: int = 1 << 24):
        self.vocab_size, self.seed, self.length = vocab_size, seed, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, window: slice) -> np.ndarray:
        idx = np.arange(window.start, window.stop, dtype=np.int64)
        seq, offset = np.divmod(idx, self.period)
        # A per-sequence start and stride from an integer hash of (seed, sequence): no state.
        h = (seq * 0x9E3779B1 + self.seed * 0x85EBCA77) % (1 << 31)
        start, stride = h % self.vocab_size, 1 + (h // self.vocab_size) % 7
        return (start + stride * offset) % self.vocab_size


def sample_documents() -> list[str]:
    """The sample corpus's documents: one per topic of the Python Language Reference (a title
    line underlined with asterisks starts each)."""
    return re.split(r"\n+(?=[^\n]+\n\*{3,}\n)", SAMPLE_PATH.read_text())


@lru_cache(maxsize=4)
def sample_corpus(tokenizer) -> Corpus:
    """The sample corpus in `tokenizer`'s ids, each document followed by its end-of-document id."""
    docs = [ids + [tokenizer.eod_id] for ids in tokenizer.encode_batch(sample_documents())]
    lengths = np.array([len(d) for d in docs], np.int64)
    return Corpus("the sample corpus", np.concatenate([np.array(d, np.int64) for d in docs]),
                  np.concatenate([[0], np.cumsum(lengths)]))


def open_corpus(path: str, dtype: str | None = None, key: str | None = None) -> Corpus:
    """The token file or indexed dataset at `path` (DataError names the config key that gave it,
    as `key=path`, the file and the remedy)."""
    p = Path(os.path.expanduser(path))
    path = f"{key}={path}" if key else path
    if Path(f"{p}.idx").exists() or Path(f"{p}.bin").exists():
        try:
            ds = IndexedTokens(p)
        except IndexedFormatError as e:
            raise DataError(f"{path}: {e}" if key else str(e)) from e
        return Corpus(str(p), ds.tokens, ds.doc_starts)
    if p.is_dir():
        raise DataError(f"{path} is a directory; expected an indexed dataset's PREFIX, a .npy file or a raw token "
                        f"file ({TOKENIZE_HINT})")
    if not p.exists():
        raise DataError(f"{path} does not exist (cwd {os.getcwd()}): give an indexed dataset's PREFIX (PREFIX.bin + "
                        f"PREFIX.idx), a .npy file, or a raw token file with data.dtype; {TOKENIZE_HINT}")
    if dtype is not None and p.suffix == ".npy":
        raise DataError(f"{path} is a .npy file, which records its own dtype; data.dtype={dtype} is for headerless "
                        "token files: drop it")
    if dtype is not None:
        item = np.dtype(dtype).itemsize
        size = p.stat().st_size
        if size % item:
            raise DataError(f"{path} is {size} bytes, not a whole number of {dtype} ids ({item} bytes each): a "
                            "truncated file, or not data.dtype's")
        return Corpus(str(p), np.memmap(p, dtype=dtype, mode="r") if size else np.zeros(0, dtype))
    if p.suffix in (".bin", ".idx") and p.with_suffix(".idx").exists():
        raise DataError(f"{path} is part of the indexed dataset {p.with_suffix('')}: give that prefix, without "
                        f"{p.suffix}")
    if p.suffix != ".npy":
        raise DataError(f"{path} has no .idx beside it and is not a .npy file: for a headerless token array (as "
                        "nanoGPT's train.bin) give its dtype, e.g. data.dtype=uint16")
    try:
        tokens = np.load(p, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"{path} is not a readable .npy file of token ids: {str(e).splitlines()[0]}") from e
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(f"{path} holds a {tokens.ndim}-D {tokens.dtype} array; expected a 1-D array of integer "
                        "token ids")
    return Corpus(str(p), tokens)


def split_corpus(corpus: Corpus, valid_fraction: float, eod_id: int | None) -> tuple[Corpus, Corpus]:
    """(training, validation) parts: the last `valid_fraction` of the documents validate. The
    cut is the first document start at or after (1 − fraction) of the tokens: from the index
    where there is one, else just after the next end-of-document id (else at that token)."""
    n = len(corpus)
    cut = int(n * (1 - valid_fraction))
    if corpus.doc_starts is not None:
        cut = int(corpus.doc_starts[np.searchsorted(corpus.doc_starts, cut)])
    elif eod_id is not None:
        for start in range(cut, n, SCAN_CHUNK):
            hits = np.flatnonzero(np.asarray(corpus.tokens[start:start + SCAN_CHUNK]) == eod_id)
            if hits.size:
                cut = start + int(hits[0]) + 1
                break
        else:
            cut = n
    return corpus.part(0, cut), corpus.part(cut, n)


# --- the id range of a token file, from a sidecar that vouches for it or by a scan -----------

def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(str(path) + ".json")


def fingerprint(path: str | os.PathLike) -> dict:
    """What changes when a file does: its size and modification time."""
    st = os.stat(path)
    return {"file_bytes": st.st_size, "file_mtime_ns": st.st_mtime_ns}


def write_sidecar(path: str | os.PathLike, tokens: int, low: int, high: int, tokenizer: str) -> None:
    """Beside the token file `path`: its id range and size and mtime, so that validation need not
    scan a file that has not changed since it was written."""
    meta = {"tokens": tokens, "min_id": low, "max_id": high, "tokenizer": tokenizer, **fingerprint(path)}
    sidecar_path(path).write_text(json.dumps(meta) + "\n")


def data_file(corpus: Corpus) -> str | None:
    """The file holding a corpus's ids (an indexed dataset's .bin), None for one in memory. A
    part of a file answers for the whole file (an id range that holds for it holds for the part)."""
    tokens = corpus.tokens
    while isinstance(tokens, TokenRange):
        tokens = tokens.tokens
    return tokens.filename if isinstance(tokens, np.memmap) else None


def token_id_range(corpus: Corpus) -> tuple[int, int]:
    """(smallest, largest) id of a corpus: from its file's sidecar when the sidecar describes that
    very file (same size and mtime), else by a scan in slices."""
    path = data_file(corpus)
    if path is not None:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            recorded = json.loads(sidecar_path(path).read_text())
            if {k: recorded[k] for k in ("file_bytes", "file_mtime_ns")} == fingerprint(path):
                return int(recorded["min_id"]), int(recorded["max_id"])
    low, high = 0, -1
    for start in range(0, len(corpus), SCAN_CHUNK):
        part = np.asarray(corpus.tokens[start:start + SCAN_CHUNK])
        if part.size:
            low = int(part.min()) if start == 0 else min(low, int(part.min()))
            high = max(high, int(part.max()))
    return low, high


def id_range_problem(corpus: Corpus, vocab_size: int) -> str | None:
    low, high = token_id_range(corpus)
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        return (f"{corpus.name} holds token id {bad} but ids must be in [0, model.vocab_size={vocab_size}): "
                "retokenize the corpus, or set model.vocab_size to its tokenizer's vocabulary")
    return None
