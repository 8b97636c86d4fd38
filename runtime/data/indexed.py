"""Megatron's indexed dataset format: `PREFIX.bin` (the token ids, back to back) and `PREFIX.idx`.

`.idx`, little-endian: the 9-byte magic `MMIDIDX\\0\\0`, version (u64 = 1), the token dtype's
code (u8: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16), the
sequence count n (u64), the document-index length d (u64), then n int32 sequence lengths, n
int64 byte offsets of the sequences in `.bin`, and d int64 sequence indices where documents
begin (starting at 0, ending at n). megatron-core's `IndexedDataset` reads what `IndexedWriter`
writes and `IndexedTokens` reads what its `IndexedDatasetBuilder` writes (tests/unit/test_indexed.py).

Sequences are stored contiguously, so the `.bin` file is one memory-mapped token array and a
document is a range of it. Both files are written under temporary names and renamed when
complete, `.idx` last: a prefix with an `.idx` is whole.
"""
from __future__ import annotations

import os
import struct
from array import array
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}
CODES = {np.dtype(t): c for c, t in DTYPES.items()}
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8


class IndexedFormatError(ValueError):
    pass


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype that holds every id below `vocab_size`: uint16 up to 65,536 ids, else int32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)


class IndexedTokens:
    """A memory-mapped indexed dataset: `tokens` (1-D, the whole `.bin`) and `doc_starts` (the
    token offset where each document begins, then the total). Every inconsistency between the
    two files is an IndexedFormatError naming the file."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        idx, bin_ = Path(self.prefix + ".idx"), Path(self.prefix + ".bin")
        for f in (idx, bin_):
            if not f.is_file():
                raise IndexedFormatError(f"{f} does not exist: an indexed dataset is PREFIX.bin + PREFIX.idx "
                                         "(python -m launch.tokenize --out PREFIX writes both)")
        with open(idx, "rb") as f:
            head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES or head[:len(MAGIC)] != MAGIC:
            raise IndexedFormatError(f"{idx} is not a Megatron index file (no MMIDIDX header)")
        version, code, n, d = struct.unpack("<QBQQ", head[len(MAGIC):])
        if version != 1 or code not in DTYPES:
            raise IndexedFormatError(f"{idx}: version {version}, dtype code {code}; readable: version 1, "
                                     f"codes {sorted(DTYPES)}")
        self.dtype = np.dtype(DTYPES[code])
        expected = HEADER_BYTES + 4 * n + 8 * n + 8 * d
        size = idx.stat().st_size
        if size not in (expected, expected + n):  # + n: the per-sequence modes of a multimodal set
            raise IndexedFormatError(f"{idx} is {size} bytes but its header ({n} sequences, {d} document "
                                     f"entries) needs {expected}: the file is truncated or not this format")
        raw = np.memmap(idx, dtype=np.uint8, mode="r")
        lengths = np.frombuffer(raw, np.int32, n, HEADER_BYTES)
        pointers = np.frombuffer(raw, np.int64, n, HEADER_BYTES + 4 * n)
        documents = np.frombuffer(raw, np.int64, d, HEADER_BYTES + 12 * n)
        item = self.dtype.itemsize
        ends = pointers + lengths.astype(np.int64) * item
        if n and (pointers[0] != 0 or np.any(pointers[1:] != ends[:-1]) or np.any(lengths < 0)):
            raise IndexedFormatError(f"{idx}: sequence offsets are not contiguous lengths × {item} bytes")
        if d == 0 or documents[0] != 0 or documents[-1] != n or np.any(np.diff(documents) < 0):
            raise IndexedFormatError(f"{idx}: the document index must rise from 0 to the sequence count {n}")
        total = int(ends[-1]) if n else 0
        if bin_.stat().st_size != total:
            raise IndexedFormatError(f"{bin_} is {bin_.stat().st_size} bytes but {idx} describes {total} "
                                     f"({n} sequences of {self.dtype.name}): truncated, or the two files do not "
                                     "belong together")
        self.tokens = np.memmap(bin_, dtype=self.dtype, mode="r") if total else np.zeros(0, self.dtype)
        starts = np.append(pointers, total)[documents] // item
        self.doc_starts = starts  # [documents + 1] token offsets
        self.sequence_lengths = lengths

    @property
    def num_documents(self) -> int:
        return len(self.doc_starts) - 1

    def document(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[self.doc_starts[i]:self.doc_starts[i + 1]])


class IndexedWriter:
    """Writes PREFIX.bin / PREFIX.idx, one sequence per document (as Megatron's preprocessing
    does), streaming: only the per-document lengths stay in memory.

        with IndexedWriter(prefix, np.uint16) as w:
            w.add_document(ids)
    Leaving the block with an exception removes the partial files; a clean exit renames them."""

    def __init__(self, prefix: str | os.PathLike, dtype):
        self.prefix, self.dtype = str(prefix), np.dtype(dtype)
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self.tmp_bin, self.tmp_idx = self.prefix + ".bin.tmp", self.prefix + ".idx.tmp"
        self.out = open(self.tmp_bin, "wb")
        self.lengths = array("i")
        self.tokens = 0

    def add_document(self, ids) -> None:
        a = np.asarray(ids, dtype=self.dtype)
        self.out.write(a.tobytes())
        self.lengths.append(a.size)
        self.tokens += a.size

    def finalize(self) -> None:
        self.out.close()
        n = len(self.lengths)
        lengths = np.frombuffer(self.lengths, dtype=np.int32) if n else np.zeros(0, np.int32)
        pointers = np.zeros(n, np.int64)
        if n:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        with open(self.tmp_idx, "wb") as f:
            f.write(MAGIC + struct.pack("<QBQQ", 1, CODES[self.dtype], n, n + 1))
            f.write(lengths.tobytes())
            f.write(pointers.tobytes())
            f.write(np.arange(n + 1, dtype=np.int64).tobytes())
        # An .idx names a whole dataset: drop an older one before its .bin is replaced.
        Path(self.prefix + ".idx").unlink(missing_ok=True)
        os.replace(self.tmp_bin, self.prefix + ".bin")
        os.replace(self.tmp_idx, self.prefix + ".idx")

    def abort(self) -> None:
        self.out.close()
        for f in (self.tmp_bin, self.tmp_idx):
            Path(f).unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        self.finalize() if kind is None else self.abort()
