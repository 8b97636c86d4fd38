"""Token sources: the embedded sample corpus, a memory-mapped .npy of token ids, or synthetic.

A source is a 1-D integer array (NumPy, possibly memory-mapped) or a `SyntheticTokens`; the
loader only slices it, so a corpus of any size costs no memory up front.

    python -m launch.tokenize corpus.npy a.txt b.txt    # byte-level ids, uint8
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

SAMPLE_PATH = Path(__file__).with_name("sample.txt")


class DataError(ValueError):
    pass


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


def _meta_path(path: str | os.PathLike) -> Path:
    return Path(str(path) + ".json")


def write_tokens(out: str | os.PathLike, texts: list[bytes]) -> np.ndarray:
    """Byte-level tokenisation: each byte is one id (vocab 256); documents joined by newlines.

    Beside `out` goes `out.json` with the largest id, so validation need not scan the file."""
    ids = np.frombuffer(b"\n".join(texts), dtype=np.uint8)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    np.save(out, ids)
    meta = {"tokens": int(ids.size), "max_id": int(ids.max()) if ids.size else -1, "tokenizer": "bytes"}
    _meta_path(out).write_text(json.dumps(meta) + "\n")
    return ids


def max_token_id(tokens, path: str | os.PathLike) -> int:
    """The largest id in a token file: from its `.json` sidecar, else by one scan."""
    meta = _meta_path(path)
    if meta.is_file():
        return int(json.loads(meta.read_text())["max_id"])
    return int(tokens.max()) if len(tokens) else -1


def load_tokens(name: str, path: str | None, vocab_size: int, seed: int):
    """The token source of data config `name` (sample | tokens | synthetic)."""
    if name == "synthetic":
        return SyntheticTokens(vocab_size, seed)
    if name == "sample":
        return np.frombuffer(SAMPLE_PATH.read_bytes(), dtype=np.uint8)
    if name == "tokens":
        tokens = np.load(path, mmap_mode="r")
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise DataError(f"data.path={path} holds a {tokens.ndim}-D {tokens.dtype} array; "
                            "expected a 1-D array of integer token ids")
        return tokens
    raise DataError(f"data.name={name!r} is unknown; valid: sample, tokens, synthetic")


def check_source(name: str, path: str | None, vocab_size: int, seq_len: int) -> list[str]:
    """Problems with the data config, as messages (empty when fine). Cheap: reads headers only."""
    if name == "tokens":
        if path is None:
            return ["data=tokens needs data.path=<file.npy> (write one with `python -m launch.tokenize`)"]
        if not os.path.isfile(path):
            return [f"data.path={path} does not exist (cwd {os.getcwd()}); "
                    "write one with `python -m launch.tokenize OUT.npy FILES...`"]
    if name not in ("sample", "tokens", "synthetic"):
        return [f"data.name={name!r} is unknown; valid: sample, tokens, synthetic"]
    if name == "synthetic":
        return []
    try:
        tokens = load_tokens(name, path, vocab_size, 0)
    except (DataError, ValueError, OSError) as e:
        return [str(e) if isinstance(e, DataError) else f"data.path={path} is not a readable .npy file: {e}"]
    problems = []
    if len(tokens) < seq_len + 1:
        problems.append(f"the corpus has {len(tokens)} tokens, fewer than train.seq_len+1={seq_len + 1}")
    if name == "tokens" and len(tokens):
        top = max_token_id(tokens, path)
        if top >= vocab_size:
            problems.append(f"data.path={path} holds token id {top} but model.vocab_size={vocab_size}; "
                            f"ids must be below the vocabulary size")
    elif name == "sample" and vocab_size < 256:
        problems.append(f"data=sample is byte-level (ids 0..255) but model.vocab_size={vocab_size}; use ≥ 256")
    return problems
