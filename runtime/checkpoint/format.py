"""quintet's checkpoint format: blocks of full tensors, raw bytes, JSON index, CRC32.

A checkpoint directory holds, for every rank that owned data, `shard-<rank>.bin` (the raw bytes
of its blocks, back to back) and `shard-<rank>.json` (per block: key, dtype, full shape, block
coordinates, byte offset, length, CRC32). A block is a rectangle of a full tensor; several
ranks' blocks of one key tile the full tensor. Loading into any layout reads, for each local
block, the stored blocks that overlap it and copies the intersections — so tensor, data,
pipeline and expert sizes may all differ between save and load. Nothing is unpickled: the
index is JSON and tensor data is raw bytes.
"""
from __future__ import annotations

import functools
import json
import math
import mmap
import os
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

FORMAT = "quintet-blocks-1"


@dataclass
class StateBlock:
    """A rectangle of a full tensor that this rank holds: what a checkpoint stores and restores.
    The parallel code names them (parallel/state.py); a layout is only a choice of rectangles."""

    key: str  # "model/<param name>", "buffer/<name>" or "optim/<param name>/<state name>"
    local: torch.Tensor  # this rank's piece, a view of the live tensor
    full_shape: tuple[int, ...]
    block: tuple[slice, ...]  # where `local` sits in the full tensor
    # The rank that writes it: of the ranks holding an identical block, the lowest, when the layout
    # decides which those are (parallel/state.py); None: agreed among the ranks when saving.
    owner: int | None = None

    def coords(self) -> list[list[int]]:
        return [[s.start, s.stop] for s in self.block]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: the message names the file and the problem."""


class CheckpointMismatch(CheckpointError):
    """A sound checkpoint of another model: resuming from it, or an older one, would be wrong."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (on any rank); `latest` still names the previous one."""


def write_failure(name: str, directory, errors: list[str]) -> CheckpointWriteError:
    """The error every rank raises when any rank could not write its part of a checkpoint."""
    return CheckpointWriteError(
        f"could not write the checkpoint of {name} into {directory}: {'; '.join(errors)}. The partial checkpoint "
        "was removed and `latest` still names the previous one; free space or fix the directory, then launch "
        "again to resume from it")


def read_json(path: Path) -> dict:
    """A JSON object from a checkpoint file, or CheckpointError naming the file."""
    try:
        value = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read: {e.strerror}") from None
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON (truncated or corrupt: {e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


INDEX_FILES = ("shard-*.json", ".metadata")  # what describes the data: this format's and DCP's


def index_checksums(directory: Path) -> dict[str, int]:
    """CRC32 of every index file of a written checkpoint (recorded in its trainer.json, so that a
    deleted, truncated or altered index is found before it is read)."""
    return {p.name: zlib.crc32(p.read_bytes()) for pattern in INDEX_FILES for p in sorted(directory.glob(pattern))}


def verify_index_files(directory: Path, recorded: dict | None) -> None:
    """CheckpointError naming the first index file that is missing, extra or altered."""
    if recorded is None:  # written before checksums were recorded
        return
    found = index_checksums(directory)
    for name in sorted(set(recorded) | set(found)):
        if name not in found:
            raise CheckpointError(f"{directory / name} is missing (trainer.json lists it)")
        if name not in recorded:
            raise CheckpointError(f"{directory / name} was not written with this checkpoint (trainer.json does not list it)")
        if found[name] != recorded[name]:
            raise CheckpointError(f"{directory / name} does not match the checksum in trainer.json: it is corrupt")


def _entry_problem(e) -> str | None:
    """What is wrong with one index entry (None when it is well formed)."""
    if not isinstance(e, dict) or not isinstance(e.get("key"), str):
        return "an entry without a key"
    shape, block = e.get("full_shape"), e.get("block")
    if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
        return f"{e['key']}: full_shape {shape!r} is not a list of sizes"
    if not (isinstance(block, list) and len(block) == len(shape) and all(
            isinstance(b, list) and len(b) == 2 and all(isinstance(x, int) for x in b) and 0 <= b[0] <= b[1] <= n
            for b, n in zip(block, shape))):
        return f"{e['key']}: block {block!r} does not lie in full_shape {shape}"
    for field in ("offset", "nbytes", "crc32"):
        if not isinstance(e.get(field), int) or e[field] < 0:
            return f"{e['key']}: {field} {e.get(field)!r} is not a non-negative integer"
    try:
        itemsize = dtype_named(str(e.get("dtype"))).itemsize
    except CheckpointError as err:
        return f"{e['key']}: {err}"
    elements = 1
    for a, b in block:
        elements *= b - a
    if elements * itemsize != e["nbytes"]:
        return f"{e['key']}: {e['nbytes']} bytes do not hold a {e['dtype']} block of {elements} elements"
    return None


def dtype_named(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"unknown dtype {name!r} in checkpoint index")
    return dtype


def from_bytes(raw: bytes, dtype: str, shape) -> torch.Tensor:
    """A tensor of `shape` over a copy of `raw` (torch.frombuffer refuses an empty buffer)."""
    if not raw:
        return torch.empty(shape, dtype=dtype_named(dtype))
    return torch.frombuffer(bytearray(raw), dtype=dtype_named(dtype)).reshape(shape)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_shard(directory: Path, rank: int, blocks) -> None:
    """Write this rank's `blocks` (StateBlock-like: key, local, full_shape, coords()) durably."""
    directory.mkdir(parents=True, exist_ok=True)
    entries, offset = [], 0
    with open(directory / f"shard-{rank:05d}.bin", "wb") as f:
        for b in blocks:
            data = b.local.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
            f.write(memoryview(data))
            entries.append({"key": b.key, "dtype": str(b.local.dtype).removeprefix("torch."),
                            "full_shape": list(b.full_shape), "block": b.coords(),
                            "offset": offset, "nbytes": int(data.nbytes), "crc32": zlib.crc32(data)})
            offset += data.nbytes
        f.flush()
        os.fsync(f.fileno())
    write_shard_index(directory, rank, entries)
    fsync_dir(directory)


def write_shard_index(directory: Path, rank: int, entries: list[dict]) -> None:
    """The shard's JSON index beside its data file, durable (the directory entry is the caller's)."""
    with open(directory / f"shard-{rank:05d}.json", "w") as f:
        json.dump({"format": FORMAT, "rank": rank, "entries": entries}, f)
        f.flush()
        os.fsync(f.fileno())


def read_index(directory: Path) -> dict[str, list[dict]]:
    """key -> stored blocks (each with the file holding it)."""
    index: dict[str, list[dict]] = {}
    files = sorted(directory.glob("shard-*.json"))
    if not files:
        raise CheckpointError(f"{directory} holds no shard index (shard-*.json)")
    for path in files:
        meta = read_json(path)
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a {FORMAT} index (format {meta.get('format')!r})")
        entries = meta.get("entries")
        if not isinstance(entries, list):
            raise CheckpointError(f"{path} has no list of entries")
        for e in entries:
            problem = _entry_problem(e)
            if problem:
                raise CheckpointError(f"{path}: {problem}; the index is corrupt")
            index.setdefault(e["key"], []).append({**e, "file": path.with_suffix(".bin")})
    return index


def _corrupt(entry: dict, why: str) -> CheckpointError:
    return CheckpointError(f"{entry['file']}: block of {entry['key']} at byte {entry['offset']} is corrupt ({why}); "
                           "the checkpoint cannot be used")


def _read_into(entry: dict, out: torch.Tensor) -> None:
    """Read the stored block into `out` (contiguous, of its shape and dtype) and check its CRC32."""
    raw = out.detach().view(-1).view(torch.uint8).numpy() if out.numel() else bytearray()
    try:
        with open(entry["file"], "rb") as f:
            f.seek(entry["offset"])
            got = f.readinto(memoryview(raw)) if len(raw) == entry["nbytes"] and len(raw) else 0
    except OSError as e:
        raise CheckpointError(f"{entry['file']} cannot be read ({e.strerror}); the checkpoint cannot be used") from None
    if len(raw) != entry["nbytes"] or got != len(raw) or zlib.crc32(raw) != entry["crc32"]:
        raise _corrupt(entry, "checksum mismatch or short read")


class MappedBlocks:
    """Stored blocks as read-only views of the memory-mapped shard files, each checked against its
    CRC32 when first asked for: a reader that only streams them on (an export) copies nothing."""

    def __init__(self):
        self.maps: dict = {}

    def views(self, entries: list[dict]) -> list[torch.Tensor]:
        """`view` of each entry, their checksums computed on every core at once."""
        for path in {e["file"] for e in entries}:
            self._map(path)
        return list(_readers().map(self.view, entries))

    def _map(self, path):
        if path not in self.maps:
            try:
                with open(path, "rb") as f:
                    self.maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{path} cannot be read ({e}); the checkpoint cannot be used") from None
        return self.maps[path]

    def view(self, entry: dict) -> torch.Tensor:
        path = entry["file"]
        data, dtype = self._map(path), dtype_named(entry["dtype"])
        shape = [stop - start for start, stop in entry["block"]]
        if entry["offset"] + entry["nbytes"] > len(data) or entry["nbytes"] != math.prod(shape) * dtype.itemsize:
            raise _corrupt(entry, "outside the file or of the wrong size")
        with memoryview(data)[entry["offset"]:entry["offset"] + entry["nbytes"]] as raw:
            if zlib.crc32(raw) != entry["crc32"]:
                raise _corrupt(entry, "checksum mismatch")
        with warnings.catch_warnings():  # a read-only mapping: nothing writes through the view
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=entry["offset"]).view(shape)


def row_slabs(entries: list[dict]) -> list[dict] | None:
    """The stored blocks of one tensor in row order, when they are whole rows (full in every other
    dimension) tiling the first dimension: the tensor's bytes are then theirs, back to back.
    None for any other split."""
    full = entries[0]["full_shape"]
    if not full or any(e["block"][1:] != [[0, n] for n in full[1:]] for e in entries):
        return None
    slabs = sorted(entries, key=lambda e: e["block"][0][0])
    bounds = [0] + [b for e in slabs for b in e["block"][0]] + [full[0]]
    # consecutive: each slab starts where the previous ended, from 0 to the last row
    return slabs if all(bounds[i] == bounds[i + 1] for i in range(0, len(bounds), 2)) else None


def _read_entry(entry: dict, cache: dict) -> torch.Tensor:
    """The stored block as a new tensor (read once per load)."""
    key = (entry["file"], entry["offset"])
    if key not in cache:
        cache[key] = torch.empty([stop - start for start, stop in entry["block"]], dtype=dtype_named(entry["dtype"]))
        _read_into(entry, cache[key])
    return cache[key]


@functools.cache
def _readers() -> ThreadPoolExecutor:
    """Threads reading stored blocks (file reads, CRC32 and copies all release the GIL)."""
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="quintet-read")


def _volume(lo, hi) -> int:
    return math.prod(h - l for l, h in zip(lo, hi))


def _covers(want, entries) -> bool:
    """Whether the parts of `entries` inside `want` tile it, decided without a mask where the
    entries are few and pairwise disjoint (as every layout writes them): their volumes add up."""
    if len(entries) > 64 or any(overlaps(a["block"], b["block"]) for i, a in enumerate(entries)
                                for b in entries[i + 1:]):
        return False
    inside = sum(_volume([max(a, c) for (a, _), (c, _) in zip(want, e["block"])],
                         [min(b, d) for (_, b), (_, d) in zip(want, e["block"])]) for e in entries)
    return inside == _volume([a for a, _ in want], [b for _, b in want])


def overlaps(want, stored) -> bool:
    """Whether two blocks ([start, stop) per dimension) intersect (scalars always do)."""
    return all(max(a, c) < min(b, d) for (a, b), (c, d) in zip(want, stored))


def load_blocks(directory: Path, blocks, index: dict | None = None, read=None) -> None:
    """Fill every local block from the stored blocks overlapping it; raises CheckpointError when a
    key is missing, its full shape differs, or the stored blocks do not cover a local block.
    `index` and `read(entry) -> tensor` default to this format's files; other storage (DCP)
    passes its own."""
    index = read_index(directory) if index is None else index
    cache: dict = {}
    direct = read is None  # this format's files: a stored block can be read straight into place
    read = read or (lambda entry: _read_entry(entry, cache))
    for b in blocks:
        stored = index.get(b.key)
        if not stored:
            raise CheckpointError(f"{directory} has no {b.key}")
        if list(stored[0]["full_shape"]) != list(b.full_shape):
            raise CheckpointError(f"{b.key} has shape {tuple(stored[0]['full_shape'])} in {directory}, "
                                  f"but {tuple(b.full_shape)} in this model")
        want = b.coords()
        hits = [e for e in stored if overlaps(want, e["block"])]
        whole = [e for e in hits if all(c <= a and d >= z for (a, z), (c, d) in zip(want, e["block"]))]
        hits = whole[:1] or hits  # one stored block covering this one is all it needs
        covered = None if whole or _covers(want, hits) else torch.zeros(b.local.shape, dtype=torch.bool)

        def fill(entry, b=b, want=want, covered=covered):
            lo = [max(a, c) for (a, _), (c, _) in zip(want, entry["block"])]
            hi = [min(a, c) for (_, a), (_, c) in zip(want, entry["block"])]
            src_idx = tuple(slice(low - c, high - c) for low, high, (c, _) in zip(lo, hi, entry["block"]))
            dst_idx = tuple(slice(low - a, high - a) for low, high, (a, _) in zip(lo, hi, want))
            with torch.no_grad():
                dst = b.local[dst_idx]
                if (direct and dst.is_contiguous() and str(dst.dtype).removeprefix("torch.") == entry["dtype"]
                        and [h - l for l, h in zip(lo, hi)] == [d - c for c, d in entry["block"]]):
                    _read_into(entry, dst)  # the whole stored block, into contiguous memory: no copy
                else:
                    dst.copy_(read(entry)[src_idx])
            if covered is not None:
                covered[dst_idx] = True

        if direct and len(hits) > 1:  # disjoint parts: read and checked on every core at once
            list(_readers().map(fill, hits))
        else:
            for entry in hits:
                fill(entry)
        if covered is not None and not bool(covered.all()):
            raise CheckpointError(f"{directory}: the stored blocks of {b.key} cover "
                                  f"{int(covered.sum())} of the {b.local.numel()} elements this rank needs")
