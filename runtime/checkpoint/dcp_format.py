"""quintet's blocks stored with PyTorch Distributed Checkpoint (the `dcp_async` engine's files).

Each rank's owned blocks are saved under keys `<name>@<start>:<stop>,...`, so a DCP checkpoint is
layout-independent like quintet's own format: loading reads DCP's metadata, loads the stored
blocks that overlap the local ones with `dcp.load` (tensors only, no pickled objects in the
data), and copies the intersections (format.load_blocks).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from runtime.checkpoint.format import CheckpointError, load_blocks, overlaps


def block_key(key: str, coords) -> str:
    return f"{key}@" + ",".join(f"{a}:{b}" for a, b in coords)


def parse_block_key(name: str) -> tuple[str, list[list[int]]]:
    key, _, spec = name.rpartition("@")
    return key, [[int(x) for x in part.split(":")] for part in spec.split(",") if part]


def is_dcp_checkpoint(path: Path) -> bool:
    return (path / ".metadata").exists()


def dcp_index(path: Path) -> dict[str, list[dict]]:
    """key -> stored blocks (name, block, shape, dtype, full_shape) from DCP's metadata. DCP does
    not store full shapes: the union of a key's blocks is its full shape."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    index: dict[str, list[dict]] = {}
    for name, meta in metadata.state_dict_metadata.items():
        key, coords = parse_block_key(name)
        index.setdefault(key, []).append({"key": key, "name": name, "block": coords,
                                          "shape": [b - a for a, b in coords], "dtype": meta.properties.dtype})
    for entries in index.values():
        full = [max(e["block"][d][1] for e in entries) for d in range(len(entries[0]["block"]))]
        for e in entries:
            e["full_shape"] = full
    return index


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
        dcp.load(wanted, checkpoint_id=str(path))
    except Exception as e:  # noqa: BLE001 - DCP raises its own types (CheckpointException) for every failure
        raise CheckpointError(f"{path}: the DCP checkpoint cannot be read ({type(e).__name__}: {e})") from e
    load_blocks(path, blocks, index=index, read=lambda e: wanted[e["name"]])
