"""The lazy copy-and-write pipeline behind the lazy engine and the DeepSpeed integration
(DataStates-LLM, HPDC 2024).

Parameters and optimizer state do not change between the end of one optimizer step and the
start of the next, so a checkpoint is copied out while the next forward and backward run:

    begin()      opens a checkpoint (on every rank; it commits on all of them or on none)
    add_file()   queues one file's tensors and returns at once: the copier thread copies them,
                 coalesced into regions of at most `chunk_bytes`, into a reused host pool
                 (runtime/checkpoint/pool.py; pinned with GPU state, copies on a side stream),
                 waiting for space when the pool is full (back-pressure)
    seal()       no more files for this checkpoint
    writer       streams each region to its file as soon as it lands, with a running CRC32 per
                 tensor, frees the region, lets the file's `finish` write the index, fsyncs; at the
                 seal comes the two-phase commit: every rank votes over a gloo group of its own,
                 and only when all files of all ranks are durable does rank 0 run `on_commit`
                 (which names the checkpoint: `latest`); when any rank failed, rank 0 runs
                 `on_abort` (which removes the partial files) and every rank records the error
    wait()       (right before the next optimizer step) blocks only while the copy of the last
                 sealed checkpoint is unfinished; it raises nothing, since ranks learn of a
                 failed vote at different moments: `failed` says whether this rank knows of one,
                 for the caller to agree on with the other ranks, and `drain`/`close` raise it

Several checkpoints may be in flight (the writer lags the copier); they commit in order.
`drain()` waits for all of them; `close()` also stops the threads.
"""
from __future__ import annotations

import os
import queue
import threading
import zlib
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from runtime.checkpoint.direct_file import ALIGN, DirectFile
from runtime.checkpoint.format import fsync_dir, write_failure
from runtime.checkpoint.pool import HostPool

MB = 1 << 20


@dataclass
class FileJob:
    """One file: the tensors' bytes back to back, then whatever `finish(file, entries)` writes.
    Each entry (the caller's metadata per tensor) gains dtype, offset, nbytes and crc32."""
    path: Path
    tensors: list[torch.Tensor]
    entries: list[dict]
    finish: Callable


@dataclass
class Checkpoint:
    name: str
    on_commit: Callable[[], None] | None  # run by rank 0 once every rank's files are durable
    on_abort: Callable[[], None] | None = None  # run by rank 0 when any rank failed (remove partial files)
    where: str = ""  # the checkpoint's directory, for the error message
    copied: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class LazyWriter:
    def __init__(self, rank: int, *, pool_bytes: int = 256 * MB, chunk_bytes: int = 64 * MB,
                 timeout_s: float = 600.0, pin: bool = False):
        """`pin`: the state lives on a GPU (the pool is page-locked for asynchronous copies)."""
        self.rank = rank
        # Allocated and made resident before training starts: the paper's pre-allocated pool.
        self.pool = HostPool(pool_bytes, pin=pin, align=ALIGN)
        self.chunk_bytes = max(ALIGN, min(chunk_bytes, self.pool.capacity) // ALIGN * ALIGN)
        # The commit votes travel on a gloo group of their own: they run in a background thread,
        # while the training thread owns every other group.
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        self._copy_q: queue.Queue = queue.Queue()
        self._write_q: queue.Queue = queue.Queue()
        self._copying: Checkpoint | None = None
        self._in_flight: list[Checkpoint] = []
        self._settled = threading.Condition()  # notified when a checkpoint commits or fails
        self._error: BaseException | None = None
        self._threads = [threading.Thread(target=self._copier, name="ckpt-copy", daemon=True),
                         threading.Thread(target=self._writer, name="ckpt-write", daemon=True)]
        for t in self._threads:
            t.start()

    # --- the training thread -------------------------------------------------------------------

    def begin(self, name: str, on_commit: Callable[[], None] | None, on_abort: Callable[[], None] | None = None,
              where: str = "") -> Checkpoint:
        if not self._threads:
            raise RuntimeError("the checkpoint engine is closed")
        ckpt = Checkpoint(name, on_commit, on_abort, where)
        with self._settled:
            self._in_flight.append(ckpt)
        return ckpt

    def add_file(self, ckpt: Checkpoint, path: Path, tensors: list[torch.Tensor], entries: list[dict],
                 finish: Callable) -> None:
        """Queue a file of `ckpt`; the tensors must not change before the next `wait()`."""
        event = None
        if any(t.is_cuda for t in tensors):
            event = torch.cuda.Event()
            event.record()  # the copies start after the optimizer step's kernels
        self._copy_q.put(("file", ckpt, FileJob(Path(path), tensors, entries, finish), event))

    def seal(self, ckpt: Checkpoint) -> None:
        """`ckpt` has all its files; the next `wait()` waits for their copies."""
        self._copying = ckpt
        self._copy_q.put(("seal", ckpt))

    def wait(self) -> None:
        """Block until the last sealed checkpoint is copied: the state may change after this returns."""
        if self._copying is not None:
            self._copying.copied.wait()
            self._copying = None

    @property
    def failed(self) -> bool:
        """Whether a checkpoint failed to commit, as far as this rank knows yet."""
        return self._error is not None

    def drain(self) -> None:
        """Block until every sealed checkpoint is committed (or has failed)."""
        self.wait()
        with self._settled:
            self._settled.wait_for(lambda: not self._in_flight)
        self.raise_if_failed()

    def close(self) -> None:
        """Drain, then stop the background threads; nothing may follow."""
        if not self._threads:
            return
        try:
            self.drain()
        finally:
            self._copy_q.put(None)
            for t in self._threads:
                t.join()
            self._threads = []

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    # --- background threads --------------------------------------------------------------------

    def _copier(self) -> None:
        stream = None
        while (item := self._copy_q.get()) is not None:
            kind, ckpt = item[0], item[1]
            if kind == "seal":
                self._write_q.put(("seal", ckpt))
                ckpt.copied.set()
                continue
            if ckpt.error is not None:
                continue  # an earlier file of this checkpoint failed: it will not commit
            try:
                job, event = item[2], item[3]
                if event is not None and stream is None:
                    stream = torch.cuda.Stream()
                self._copy(ckpt, job, event, stream)
            except BaseException as e:  # noqa: BLE001 - the seal's vote reports it
                ckpt.error = e
        self._write_q.put(None)

    def _copy(self, ckpt: Checkpoint, job: FileJob, event, stream) -> None:
        """Pack the tensors' bytes into regions of exactly chunk_bytes (the file's last one
        shorter), copy each into the pool and hand it to the writer; a tensor may span regions.
        Whole regions keep every write but the last block-aligned (direct_file.py)."""
        offset = 0
        for t, entry in zip(job.tensors, job.entries):
            nbytes = t.numel() * t.element_size()
            entry.update(dtype=str(t.dtype).removeprefix("torch."), offset=offset, nbytes=nbytes, crc32=0)
            offset += nbytes
        self._write_q.put(("open", ckpt, job))
        region: list[tuple[int, torch.Tensor]] = []  # (entry index, bytes to copy)
        size = 0

        def flush():
            nonlocal region, size
            if not region:
                return
            at = self.pool.alloc(size)
            dst, pos = self.pool.view(at, size), 0
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                if event is not None:
                    stream.wait_event(event)
                for _, src in region:
                    if stream is None:  # a plain memcpy: torch's copy would start an OpenMP team here
                        np.copyto(dst[pos:pos + src.numel()].numpy(), src.numpy())
                    else:
                        dst[pos:pos + src.numel()].copy_(src, non_blocking=True)
                    pos += src.numel()
            if stream is not None:
                stream.synchronize()
            self._write_q.put(("region", ckpt, job, at, size, [(i, src.numel()) for i, src in region]))
            region, size = [], 0

        for i, t in enumerate(job.tensors):
            data = t.detach().contiguous().reshape(-1).view(torch.uint8)
            start = 0
            while start < data.numel():
                piece = data[start:start + self.chunk_bytes - size]
                region.append((i, piece))
                size += piece.numel()
                start += piece.numel()
                if size == self.chunk_bytes:
                    flush()
        flush()
        self._write_q.put(("done", ckpt, job))

    def _writer(self) -> None:
        """Stream regions to their files; always give regions back to the pool; vote once per
        checkpoint, at its seal."""
        f = None
        while (item := self._write_q.get()) is not None:
            kind, ckpt = item[0], item[1]
            try:
                if kind == "region":
                    job, at, size, pieces = item[2:]
                    try:
                        if ckpt.error is None:
                            self._append(f, job, at, size, pieces)
                    finally:
                        self.pool.free(at)
                elif kind == "seal":
                    if f is not None:  # a file whose copy failed half-way
                        f.close()
                        f = None
                    self._vote(ckpt)
                elif ckpt.error is not None:
                    continue
                elif kind == "open":
                    item[2].path.parent.mkdir(parents=True, exist_ok=True)
                    f = DirectFile(item[2].path)
                elif kind == "done":
                    self._finish(f, item[2])
                    f = None
            except BaseException as e:  # noqa: BLE001 - this rank votes no at the seal
                ckpt.error = ckpt.error or e
                if f is not None:
                    f.close()
                    f = None

    def _append(self, f: DirectFile, job: FileJob, at: int, size: int, pieces) -> None:
        region = self.pool.view(at, size + -size % ALIGN).numpy()
        self._write_region(f, region, size)
        data, pos = region[:size], 0
        for i, n in pieces:
            entry = job.entries[i]
            entry["crc32"] = zlib.crc32(data[pos:pos + n], entry["crc32"])
            pos += n

    def _finish(self, f: DirectFile, job: FileJob) -> None:
        """The index (`job.finish`, appended or beside), then make the file and its directory
        entry durable."""
        f.close()
        with open(job.path, "ab") as tail:
            job.finish(tail, job.entries)
            tail.flush()
            os.fsync(tail.fileno())
        fsync_dir(job.path.parent)

    def _write_region(self, f: DirectFile, region, n: int) -> None:
        """Append a region's first `n` bytes to the file (tests slow it down to emulate storage)."""
        f.write(memoryview(region), n)

    def _vote(self, ckpt: Checkpoint) -> None:
        """Phase two: commit only if every rank's files are durable; otherwise every rank learns
        every rank's error, and rank 0 removes what was written."""
        mine = None if ckpt.error is None else f"rank {self.rank}: {ckpt.error}"
        try:
            errors = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(errors, mine, group=self.group)
            failures = [e for e in errors if e is not None]
            try:
                if self.rank == 0 and not failures and ckpt.on_commit is not None:
                    ckpt.on_commit()
                elif self.rank == 0 and failures and ckpt.on_abort is not None:
                    ckpt.on_abort()
            finally:
                dist.barrier(group=self.group)  # named (or removed) before any rank reports it
            if failures:
                raise write_failure(ckpt.name, ckpt.where or "its directory", failures)
        except BaseException as e:  # noqa: BLE001 - raised in the training thread by drain/close
            self._error = self._error or e
        finally:
            with self._settled:
                self._in_flight.remove(ckpt)
                self._settled.notify_all()
