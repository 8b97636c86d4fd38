"""Documents from the files people keep, streamed in blocks: `.txt` (a file is a document),
`.jsonl` (also `.jsonl.gz` and `.jsonl.zst`; a line is a document, its text in a field), Parquet
(a row is a document, its text in a column) and a Hugging Face dataset saved with
`save_to_disk` (a folder; a row is a document).

Reading and decoding are split so that the costly part runs in worker processes: `blocks(path,
field)` yields `Block`s of raw records (bytes of JSONL lines, texts of Parquet rows) with their
line or row numbers, and `documents(block)` turns one into texts, naming every bad record by
file and line: text that is not UTF-8, a line that is not JSON or lacks the field, an empty
document.
"""
from __future__ import annotations

import gzip
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

BLOCK_BYTES = 1 << 20  # raw bytes per block: enough work to amortise a hand-off to a worker


class BadRecord(ValueError):
    pass


@dataclass
class Block:
    path: str
    kind: str  # text | jsonl | rows
    field: str
    first: int  # line (jsonl, 1-based), row (rows, 0-based) or 0 (text) of the first record
    records: list = field(default_factory=list)  # bytes (text, jsonl) or values (rows)
    consumed: int = 0  # bytes of the input read for this block (for progress); rows for datasets


def kind_of(path: str | os.PathLike) -> str:
    p = Path(path)
    name = p.name.lower()
    if p.is_dir():
        return "dataset"
    if name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".txt", ".md", ".text")):
        return "text"
    raise BadRecord(f"{path}: unknown input kind; readable: .txt, .jsonl (.gz, .zst), .parquet, or a folder written "
                    "by a Hugging Face dataset's save_to_disk")


def input_size(path: str | os.PathLike) -> int:
    """The amount of work an input is, in the unit its blocks report (`consumed`)."""
    if kind_of(path) == "dataset":
        return len(_load_dataset(path))
    return os.path.getsize(path)


class _Counting(io.RawIOBase):
    """A raw file that counts the bytes read from disk (compressed inputs report progress by them)."""

    def __init__(self, f):
        self.f, self.count = f, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.f.readinto(b)
        self.count += n
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


def _open_lines(path: str):
    raw = _Counting(open(path, "rb"))
    name = path.lower()
    if name.endswith(".gz"):
        stream = gzip.GzipFile(fileobj=io.BufferedReader(raw))
    elif name.endswith(".zst"):
        import zstandard

        stream = zstandard.ZstdDecompressor().stream_reader(io.BufferedReader(raw))
    else:
        stream = raw
    return raw, io.BufferedReader(stream, buffer_size=BLOCK_BYTES)


def _load_dataset(path):
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise BadRecord(f"{path} is a folder but not a dataset written by save_to_disk: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise BadRecord(f"{path} holds splits {list(ds)}; give one split's folder")
        ds = ds["train"]
    return ds


def blocks(path: str | os.PathLike, text_field: str):
    """The input's raw records in blocks of about BLOCK_BYTES (one block per .txt file)."""
    path, kind = str(path), kind_of(path)
    if kind == "text":
        yield Block(path, "text", text_field, 0, [Path(path).read_bytes()], os.path.getsize(path))
    elif kind == "jsonl":
        raw, lines = _open_lines(path)
        try:
            block, size, number, seen = Block(path, "jsonl", text_field, 1), 0, 0, 0
            for number, line in enumerate(lines, 1):
                block.records.append(line)
                size += len(line)
                if size >= BLOCK_BYTES:
                    block.consumed, seen = raw.count - seen, raw.count
                    yield block
                    block, size = Block(path, "jsonl", text_field, number + 1), 0
            if block.records:
                block.consumed = raw.count - seen
                yield block
        except (OSError, EOFError) as e:  # a corrupt or truncated .gz / .zst
            raise BadRecord(f"{path}: cannot be decompressed past line {number}: {e}") from e
        finally:
            lines.close()
    elif kind == "parquet":
        yield from _parquet_blocks(path, text_field)
    else:
        ds = _load_dataset(path)
        if text_field not in ds.column_names:
            raise BadRecord(f"{path}: the dataset has no column {text_field!r} (its columns: {ds.column_names}); "
                            "choose one with --field")
        step = 1000
        for start in range(0, len(ds), step):
            values = ds[start:start + step][text_field]
            yield Block(path, "rows", text_field, start, values, len(values))


def _parquet_blocks(path: str, text_field: str):
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's own error types
        raise BadRecord(f"{path} is not a readable Parquet file: {e}") from e
    names = f.schema_arrow.names
    if text_field not in names:
        raise BadRecord(f"{path}: no column {text_field!r} (its columns: {names}); choose one with --field")
    row, total, rows = 0, os.path.getsize(path), max(f.metadata.num_rows, 1)
    for batch in f.iter_batches(columns=[text_field], batch_size=2000):
        values = batch.column(0).to_pylist()
        yield Block(path, "rows", text_field, row, values, total * len(values) // rows)
        row += len(values)


def documents(block: Block) -> tuple[list[str], list[str]]:
    """(texts, problems) of a block: each problem names the file and line (or row) of a record
    that is not a document, and the record is left out."""
    texts, problems = [], []
    for i, record in enumerate(block.records):
        where = (f"{block.path}" if block.kind == "text" else
                 f"{block.path}, line {block.first + i}" if block.kind == "jsonl" else f"{block.path}, row {block.first + i}")
        try:
            text = _text(record, block.kind, block.field)
        except BadRecord as e:
            problems.append(f"{where}: {e}")
            continue
        if not text:
            problems.append(f"{where}: an empty document")
            continue
        texts.append(text)
    return texts, problems


def _text(record, kind: str, text_field: str) -> str:
    if kind == "text":
        try:
            return record.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRecord(f"not UTF-8 text (byte {e.start}: {record[e.start:e.start + 4]!r})") from e
    if kind == "jsonl":
        if not record.strip():
            return ""
        try:
            value = json.loads(record)
        except UnicodeDecodeError as e:
            raise BadRecord(f"not UTF-8 text (byte {e.start})") from e
        except ValueError as e:
            raise BadRecord(f"not JSON ({e}): {record[:60]!r}") from e
        if not isinstance(value, dict) or text_field not in value:
            keys = list(value) if isinstance(value, dict) else type(value).__name__
            raise BadRecord(f"no field {text_field!r} (it has {keys}); choose one with --field")
        record = value[text_field]
    if record is None:
        return ""
    if not isinstance(record, str):
        raise BadRecord(f"the field {text_field!r} holds {type(record).__name__}, not text")
    return record
