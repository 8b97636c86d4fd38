"""Token sources: the embedded sample corpus, a memory-mapped .npy of token ids, or synthetic.

A source is a 1-D integer array (NumPy, possibly memory-mapped) or a `SyntheticTokens`; the
loader only slices it, so a corpus of any size costs no memory up front.

    python -m launch.tokenize corpus.npy a.txt b.txt    # byte-level ids, uint8
"""
from __future__ import annotations

import contextlib
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


SCAN_CHUNK = 1 << 26  # ids per slice of a scan: memory stays bounded whatever the corpus size


def _fingerprint(path: str | os.PathLike) -> dict:
    """What changes when the token file does: its size and modification time."""
    st = os.stat(path)
    return {"file_bytes": st.st_size, "file_mtime_ns": st.st_mtime_ns}


def write_tokens(out: str | os.PathLike, texts: list[bytes]) -> np.ndarray:
    """Byte-level tokenisation: each byte is one id (vocab 256); documents joined by newlines.

    Beside `out` goes `out.json` with the id range and the file's size and mtime, so validation
    need not scan a file that has not changed since."""
    ids = np.frombuffer(b"\n".join(texts), dtype=np.uint8)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    np.save(out, ids)
    meta = {"tokens": int(ids.size), "min_id": int(ids.min()) if ids.size else 0,
            "max_id": int(ids.max()) if ids.size else -1, "tokenizer": "bytes", **_fingerprint(out)}
    _meta_path(out).write_text(json.dumps(meta) + "\n")
    return ids


def token_id_range(tokens, path: str | os.PathLike) -> tuple[int, int]:
    """(smallest, largest) id of a token file: from its `.json` sidecar when the sidecar
    describes this very file (same size and mtime, as launch.tokenize writes it), else by a
    scan in slices."""
    meta = _meta_path(path)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        recorded = json.loads(meta.read_text())
        if {k: recorded[k] for k in ("file_bytes", "file_mtime_ns")} == _fingerprint(path):
            return int(recorded["min_id"]), int(recorded["max_id"])
    return _scan(tokens)


def _scan(tokens) -> tuple[int, int]:
    low, high = 0, -1
    for start in range(0, len(tokens), SCAN_CHUNK):
        part = np.asarray(tokens[start:start + SCAN_CHUNK])
        low = int(part.min()) if start == 0 else min(low, int(part.min()))
        high = max(high, int(part.max()))
    return low, high


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


TOKENIZE_HINT = "write one with `python -m launch.tokenize OUT.npy FILES...`"


def source_config_problems(name: str, path: str | None, vocab_size: int) -> list[str]:
    """What is wrong with the data config itself, without reading any file."""
    if name == "tokens" and not path:
        return [f"data=tokens needs data.path=<file.npy> ({TOKENIZE_HINT})"]
    if name == "sample" and vocab_size < 256:
        return [f"data=sample is byte-level (ids 0..255) but model.vocab_size={vocab_size}; use ≥ 256"]
    return []


def check_source(name: str, path: str | None, vocab_size: int, seq_len: int) -> list[str]:
    """Problems with the data the run will read, as messages (empty when fine): the file is a
    readable 1-D integer .npy, long enough, with every id in [0, vocab_size) — from a sidecar
    that matches the file, else by a scan, so that no step fails at the first bad id."""
    problems = source_config_problems(name, path, vocab_size)
    if problems or name == "synthetic":
        return problems
    if name == "tokens":
        if os.path.isdir(path):
            return [f"data.path={path} is a directory; expected a .npy file of token ids ({TOKENIZE_HINT})"]
        if not os.path.exists(path):
            return [f"data.path={path} does not exist (cwd {os.getcwd()}); {TOKENIZE_HINT}"]
    try:
        tokens = load_tokens(name, path, vocab_size, 0)
        if len(tokens) < seq_len + 1:
            return [f"the corpus has {len(tokens)} tokens, fewer than train.seq_len+1={seq_len + 1}"]
        if name != "tokens":
            return []
        low, high = token_id_range(tokens, path)
    except DataError as e:
        return [str(e)]
    except (ValueError, OSError) as e:
        return [f"data.path={path} is not a readable .npy file of token ids: {e}"]
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        return [f"data.path={path} holds token id {bad} but ids must be in [0, model.vocab_size={vocab_size}); "
                "retokenize the corpus or set model.vocab_size to the tokenizer's vocabulary"]
    return []
