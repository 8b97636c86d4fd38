"""quintet's blocks stored with PyTorch Distributed Checkpoint (the `dcp_async` engine's files).

Each rank's owned blocks are saved under keys `<name>@<start>:<stop>,...`, so a DCP checkpoint is
layout-independent like quintet's own format: loading reads DCP's metadata, loads the stored
blocks that overlap the local ones with `dcp.load`, and copies the intersections
(format.load_blocks).

Nothing a checkpoint folder holds can run code here. DCP pickles its `.metadata` and its stock
reader unpickles it with `pickle.load`; `SafeReader` unpickles it with an unpickler that builds
only DCP's own metadata classes, torch.Size and dtypes (anything else — os.system, eval — is
refused by name), then checks that every entry is a tensor stored in a plain `.distcp` file of
the folder. Non-tensor entries are refused because DCP's planner loads them with
`torch.load(weights_only=False)`; tensor data goes through `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from runtime.checkpoint.format import CheckpointError, load_blocks, overlaps


_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING",
        "MetadataIndex", "StorageMeta")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib._local", "PosixPath"),
     ("collections", "OrderedDict")}
_DATA_FILE = re.compile(r"__\d+_\d+\.distcp")


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_CLASSES or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                       torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which DCP metadata never holds")


def read_metadata(path: Path) -> Metadata:
    """DCP's metadata of the checkpoint folder `path`, unpickled safely and checked; CheckpointError
    naming the file otherwise."""
    file = path / ".metadata"
    try:
        metadata = _MetadataUnpickler(io.BytesIO(file.read_bytes())).load()
    except OSError as e:
        raise CheckpointError(f"{file} cannot be read: {e.strerror}") from None
    except Exception as e:  # noqa: BLE001 - whatever a hostile or truncated pickle raises
        raise CheckpointError(f"{file} is not DCP metadata quintet can read ({e}); refusing to load it") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise CheckpointError(f"{file} holds a {type(metadata).__name__}, not DCP metadata")
    for name, item in metadata.state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata):
            raise CheckpointError(f"{file}: {name!r} is stored as {type(item).__name__}; this engine stores tensors "
                                  "only, and DCP would unpickle anything else: refusing to load it")
    for info in (metadata.storage_data or {}).values():
        relative = str(getattr(info, "relative_path", ""))
        if not _DATA_FILE.fullmatch(relative) or getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{file} points at data {relative!r} outside the plain .distcp files of {path}")
    return metadata


class SafeReader(FileSystemReader):
    """DCP's file-system reader with `read_metadata` that never runs code from the folder."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if kwargs.get("rank") is not None:
            raise CheckpointError("per-rank DCP metadata is not a format this engine writes")
        metadata = read_metadata(Path(self.path))
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _TensorsOnly(DefaultLoadPlanner):
    """DCP's planner, except that it never unpickles a non-tensor entry (SafeReader refuses those
    first; this holds should one get through)."""

    def load_bytes(self, read_item, value) -> None:
        raise CheckpointError(f"the checkpoint holds non-tensor data for {read_item.dest_index.fqn}; refusing to unpickle it")


def block_key(key: str, coords) -> str:
    return f"{key}@" + ",".join(f"{a}:{b}" for a, b in coords)


def parse_block_key(name: str) -> tuple[str, list[list[int]]]:
    key, _, spec = name.rpartition("@")
    coords = [[int(x) for x in part.split(":")] for part in spec.split(",") if part]
    if not key or any(len(c) != 2 for c in coords):
        raise ValueError(name)
    return key, coords


def is_dcp_checkpoint(path: Path) -> bool:
    return (path / ".metadata").exists()


def dcp_index(path: Path) -> dict[str, list[dict]]:
    """key -> stored blocks (name, block, shape, dtype, full_shape) from DCP's metadata. DCP does
    not store full shapes: the union of a key's blocks is its full shape."""
    metadata = read_metadata(path)
    index: dict[str, list[dict]] = {}
    for name, meta in metadata.state_dict_metadata.items():
        try:
            key, coords = parse_block_key(name)
        except ValueError:
            raise CheckpointError(f"{path / '.metadata'}: {name!r} is not a block key this engine writes") from None
        if not isinstance(meta.properties.dtype, torch.dtype) or any(b < a for a, b in coords):
            raise CheckpointError(f"{path / '.metadata'}: {name!r} has a malformed block or dtype")
        index.setdefault(key, []).append({"key": key, "name": name, "block": coords,
                                          "shape": [b - a for a, b in coords], "dtype": meta.properties.dtype})
    for entries in index.values():
        full = [max(e["block"][d][1] for e in entries) for d in range(len(entries[0]["block"]))]
        for e in entries:
            e["full_shape"] = full
    return index


def _first_failure(e: BaseException) -> str:
    """One line for a DCP error: CheckpointException carries each failed rank's exception."""
    for rank, failure in (getattr(e, "failures", None) or {}).items():
        inner = getattr(failure, "exc", failure)
        return f"rank {rank}: {type(inner).__name__}: {inner}".strip()
    return f"{type(e).__name__}: {e}"


def load_dcp_blocks(path: Path, blocks, index: dict | None = None) -> None:
    """Fill `blocks` from a DCP checkpoint written by the dcp_async engine, in any layout
    (collective when a process group exists)."""
    index = dcp_index(path) if index is None else index
    wanted = {}
    for b in blocks:
        for e in index.get(b.key, []):
            if overlaps(b.coords(), e["block"]):
                wanted[e["name"]] = torch.empty(e["shape"], dtype=e["dtype"])
    try:
        dcp.load(wanted, checkpoint_id=str(path), storage_reader=SafeReader(str(path)), planner=_TensorsOnly())
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's own (a BaseException) wraps any rank's
        raise CheckpointError(f"{path}/__*.distcp: the DCP data cannot be read ({_first_failure(e)})") from None
    load_blocks(path, blocks, index=index, read=lambda e: wanted[e["name"]])
