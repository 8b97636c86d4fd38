"""Safetensors folders as Hugging Face writes them: read by slices, written shard by shard.

A folder holds `model.safetensors`, or shards with `model.safetensors.index.json` mapping each
tensor to its file. A safetensors file is 8 bytes of header length, a JSON header (each tensor's
dtype, shape and byte range) and the raw bytes. `Reader` memory-maps each file and gives a
tensor as a view of the mapping, so a rectangle of it costs only the pages of those rows,
copied once, straight into the parameter: a rank of a parallel job never holds more than its
part, and nothing but JSON and raw numbers is ever decoded. `Writer` streams: it fills one shard
up to a size, writes each tensor's bytes as they are, and only then starts the next, so an export
costs one shard of memory, not the model.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 2**20  # as the safetensors library: a larger header is not a model's


class HFFilesError(ValueError):
    """A folder whose tensors cannot be used: the message names the file or tensor."""


class _File:
    """One memory-mapped safetensors file and its checked header."""

    def __init__(self, path: Path):
        try:
            with open(path, "rb") as f:
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
            raise HFFilesError(f"{path} cannot be read ({e})") from None
        size = len(self.map)
        if size < 8 or (n := struct.unpack("<Q", self.map[:8])[0]) > min(MAX_HEADER, size - 8):
            raise HFFilesError(f"{path} is not a safetensors file (its header length does not fit the file)")
        try:
            header = json.loads(self.map[8:8 + n])
        except ValueError:
            raise HFFilesError(f"{path}: the safetensors header is not JSON") from None
        if not isinstance(header, dict):
            raise HFFilesError(f"{path}: the safetensors header is not a JSON object")
        self.start, data = 8 + n, size - 8 - n
        self.entries: dict[str, tuple[str, tuple[int, ...], int]] = {}
        for name, e in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape, (begin, end) = e["dtype"], tuple(int(d) for d in e["shape"]), e["data_offsets"]
                ok = dtype in DTYPES and 0 <= begin <= end <= data and all(d >= 0 for d in shape) and \
                    end - begin == math.prod(shape) * DTYPES[dtype].itemsize
            except (TypeError, KeyError, ValueError):
                ok = False
            if not ok:
                raise HFFilesError(f"{path}: the header entry of {name!r} is malformed or outside the file")
            self.entries[name] = (dtype, shape, begin)

    def tensor(self, name: str) -> torch.Tensor:
        """A read-only view of the mapped bytes: no copy, no read until its pages are touched."""
        dtype, shape, begin = self.entries[name]
        count = math.prod(shape)
        with warnings.catch_warnings():  # the mapping is read-only; nothing writes through the view
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(self.map, dtype=DTYPES[dtype], count=count, offset=self.start + begin) \
                if count else torch.empty(0, dtype=DTYPES[dtype])
        return flat.view(shape)


class Reader:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._files: dict[Path, _File] = {}
        if (self.folder / INDEX).exists():
            try:
                weight_map = json.loads((self.folder / INDEX).read_text())["weight_map"]
                self.files = {str(name): self.folder / Path(file).name for name, file in weight_map.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise HFFilesError(f"{self.folder / INDEX} is not a safetensors index ({e})") from None
        elif (self.folder / SINGLE).exists():
            self.files = {name: self.folder / SINGLE for name in self._open(self.folder / SINGLE).entries}
        else:
            raise HFFilesError(f"{self.folder} has neither {SINGLE} nor {INDEX}")

    def _open(self, path: Path) -> _File:
        if path not in self._files:
            self._files[path] = _File(path)
        return self._files[path]

    def _file_of(self, name: str) -> _File:
        file = self._open(self.files[name])
        if name not in file.entries:
            raise HFFilesError(f"{self.files[name]} has no tensor {name} (its index says it does)")
        return file

    def info(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype name such as "F32" or "BF16") of one tensor, from its header."""
        dtype, shape, _ = self._file_of(name).entries[name]
        return shape, dtype

    def read(self, name: str, block: tuple[slice, ...]) -> torch.Tensor:
        """The rectangle `block` of tensor `name`, a read-only view of the file: only the pages of
        its rows are read, when it is copied."""
        return self._file_of(name).tensor(name)[block]


class Writer:
    """Tensors added in order go to shards of at most `shard_bytes` (a larger tensor alone);
    `close` names them model-0000i-of-0000n.safetensors with their index, or model.safetensors
    when one shard holds everything, as `save_pretrained` does. A full shard is written by a
    background thread while the next one fills (at most two shards in memory; a shard of views
    of mapped files holds none); every shard is fsynced before it is named."""

    def __init__(self, folder: Path, shard_bytes: int, metadata: dict | None = None):
        self.folder, self.shard_bytes, self.metadata = Path(folder), shard_bytes, metadata or {}
        self.pending: dict[str, list[torch.Tensor]] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total = 0
        self.io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quintet-export")
        self.writing: Future | None = None

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, *exc) -> None:
        """Never leave the writing thread behind (an export that failed removes the folder)."""
        self.io.shutdown(wait=True)

    def add(self, name: str, parts: list[torch.Tensor]) -> None:
        """Tensor `name`, given as row slabs whose concatenation it is (views are written as they
        are: nothing is copied to assemble it)."""
        size = sum(p.numel() * p.element_size() for p in parts)
        if self.pending and self.pending_bytes + size > self.shard_bytes:
            self._flush()
        self.pending[name] = [p.contiguous() for p in parts]
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        if self.writing is not None:
            self.writing.result()  # the previous shard is on disk (or its error is raised here)
        self.writing = self.io.submit(self._write, self.pending, self.folder / f"shard-{len(self.shards)}.tmp")
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def _write(self, tensors: dict[str, list[torch.Tensor]], path: Path) -> None:
        header, offset = {"__metadata__": {"format": "pt", **self.metadata}}, 0
        for name, parts in tensors.items():
            n = sum(p.numel() * p.element_size() for p in parts)
            shape = [sum(p.shape[0] for p in parts), *parts[0].shape[1:]]
            header[name] = {"dtype": NAMES[parts[0].dtype], "shape": shape, "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the library writes it
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for t in (p for parts in tensors.values() for p in parts):
                if t.numel():
                    f.write(memoryview(t.view(torch.uint8).reshape(-1).numpy()))

    def close(self) -> list[Path]:
        """Write what is left, wait for every shard, and give them their final names."""
        if self.pending or not self.shards:
            self._flush()
        try:
            self.writing.result()
        finally:
            self.io.shutdown()
        n = len(self.shards)
        names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            # Durable before named: one fsync per shard at the end, so the kernel writes the
            # earlier shards back while the later ones are produced.
            with open(self.folder / f"shard-{i}.tmp", "rb+") as f:
                os.fsync(f.fileno())
            os.replace(self.folder / f"shard-{i}.tmp", self.folder / name)
        if n > 1:
            weight_map = {t: names[i] for i, shard in enumerate(self.shards) for t in shard}
            (self.folder / INDEX).write_text(json.dumps({"metadata": {"total_size": self.total},
                                                         "weight_map": weight_map}, indent=2) + "\n")
        return [self.folder / name for name in names]
