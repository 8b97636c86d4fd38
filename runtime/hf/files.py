"""Safetensors folders as Hugging Face writes them: read by slices, written shard by shard.

A folder holds `model.safetensors`, or shards with `model.safetensors.index.json` mapping each
tensor to its file. `Reader.read` takes a rectangle of one tensor through safetensors' lazy
slicing (the file is memory-mapped and only the bytes of those rows are read), so a rank of a
parallel job never holds more than its own part. `Writer` fills one shard at a time up to a size
and writes it before starting the next, so exporting costs one shard of memory, not the model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class HFFilesError(ValueError):
    """A folder whose tensors cannot be used: the message names the file or tensor."""


class Reader:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._handles: dict[Path, object] = {}  # one open (memory-mapped) file each
        if (self.folder / INDEX).exists():
            try:
                weight_map = json.loads((self.folder / INDEX).read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise HFFilesError(f"{self.folder / INDEX} is not a safetensors index ({e})") from None
            self.files = {name: self.folder / file for name, file in weight_map.items()}
        elif (self.folder / SINGLE).exists():
            self.files = {name: self.folder / SINGLE for name in self._open(self.folder / SINGLE).keys()}
        else:
            raise HFFilesError(f"{self.folder} has neither {SINGLE} nor {INDEX}")

    def _open(self, path: Path):
        from safetensors import safe_open

        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except Exception as e:  # noqa: BLE001 - safetensors raises its own types for a missing file or bad header
                raise HFFilesError(f"{path} cannot be read as safetensors ({e})") from None
        return self._handles[path]

    def info(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype name such as "F32" or "BF16") of one tensor, from its header."""
        part = self._slice(name)
        return tuple(part.get_shape()), part.get_dtype()

    def _slice(self, name: str):
        handle = self._open(self.files[name])
        try:
            return handle.get_slice(name)
        except Exception:  # noqa: BLE001 - safetensors' own error type
            raise HFFilesError(f"{self.files[name]} has no tensor {name} (its index says it does)") from None

    def read(self, name: str, block: tuple[slice, ...]) -> torch.Tensor:
        """The rectangle `block` of tensor `name`; only its bytes are read."""
        return self._slice(name)[block]


class Writer:
    """Tensors added in order go to shards of at most `shard_bytes` (a larger tensor alone);
    `close` names them model-0000i-of-0000n.safetensors with their index, or model.safetensors
    when one shard holds everything, as `save_pretrained` does."""

    def __init__(self, folder: Path, shard_bytes: int, metadata: dict | None = None):
        self.folder, self.shard_bytes, self.metadata = Path(folder), shard_bytes, metadata or {}
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.shard_bytes:
            self._flush()
        self.pending[name] = tensor
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.pending, str(self.folder / f"shard-{len(self.shards)}.tmp"), metadata={"format": "pt", **self.metadata})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[Path]:
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            os.replace(self.folder / f"shard-{i}.tmp", self.folder / name)
        if n > 1:
            weight_map = {t: names[i] for i, shard in enumerate(self.shards) for t in shard}
            (self.folder / INDEX).write_text(json.dumps({"metadata": {"total_size": self.total},
                                                         "weight_map": weight_map}, indent=2) + "\n")
        return [self.folder / name for name in names]
