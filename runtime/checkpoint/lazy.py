"""The lazy asynchronous checkpoint engine (DataStates-LLM, HPDC 2024).

Parameters and optimizer state do not change between the end of optimizer step k and the
optimizer step of k+1, so the checkpoint of step k is copied out while step k+1's forward and
backward run:

    request(k)   returns at once: the copier thread takes the state's blocks
    copier       copies them, coalesced into regions of at most `chunk_bytes`, into a reused host
                 pool (runtime/checkpoint/pool.py; pinned with GPU state, copies on a side
                 stream), waiting for space when the pool is full (back-pressure)
    writer       streams each region to this rank's shard file as soon as it lands, with a running
                 CRC32 per block, frees the region, fsyncs, writes the index; then the two-phase
                 commit: every rank's writer reports success over a gloo group of its own, and
                 only when all succeeded does rank 0 write trainer.json and move `latest`
    wait()       (the trainer calls it right before the optimizer step and before anything else
                 that mutates the state) blocks only while the copy is unfinished

Several checkpoints may be in flight (the writer lags the copier); they commit in order.
`close()` drains everything — the end of a run and a preemption call it before exiting. The
format is runtime/checkpoint/format.py's: layout-independent blocks, JSON index, no pickle.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import threading
import zlib
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from parallel.state import state_blocks
from runtime.checkpoint.format import FORMAT, fsync_dir
from runtime.checkpoint.pool import HostPool
from runtime.checkpoint.sync import BaseCheckpointer, owned_blocks

MB = 1 << 20


@dataclass
class _Pending:
    step: int
    path: Path
    trainer_state: dict
    entries: list[dict]
    copied: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    voted: bool = False  # this rank's commit vote is cast (once per checkpoint)


class LazyCheckpointer(BaseCheckpointer):
    def __init__(self, directory: str, every: int, rank: int, *, pool_mb: int = 1024, chunk_mb: int = 64,
                 keep_last: int = 0, timeout_s: float = 600.0, every_s: float = 0.0):
        super().__init__(directory, every, rank, keep_last=keep_last, every_s=every_s)
        self.pool_bytes, self.chunk_bytes = pool_mb * MB, chunk_mb * MB
        self.pool: HostPool | None = None
        # The writers' commit votes travel on a gloo group of their own: they run in background
        # threads, while the training thread owns every other group.
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        self._copy_q: queue.Queue = queue.Queue()
        self._write_q: queue.Queue = queue.Queue()
        self._copying: _Pending | None = None
        self._in_flight: list[_Pending] = []
        self._settled = threading.Condition()  # notified when a checkpoint commits or fails
        self._error: BaseException | None = None
        self._threads = [threading.Thread(target=self._copier, name="ckpt-copy", daemon=True),
                         threading.Thread(target=self._writer, name="ckpt-write", daemon=True)]
        for t in self._threads:
            t.start()

    # --- the training thread -------------------------------------------------------------------

    def request(self, step: int, parallel, optimizer, trainer_state: dict) -> None:
        """Start the checkpoint of the state after `step` steps; returns before anything is copied."""
        if not self._threads:
            raise RuntimeError("the checkpoint engine is closed")
        self.raise_if_failed()
        path = self.step_path(step)
        if self.rank == 0 and path.exists():
            shutil.rmtree(path)  # an earlier, uncommitted attempt at this step (maybe another layout)
        # Collective (block metadata): no rank writes before rank 0 has cleared the directory.
        blocks = owned_blocks(state_blocks(parallel, optimizer), self.rank)
        if self.pool is None:
            pin = any(b.local.is_cuda for b in blocks) and torch.cuda.is_available()
            self.pool = HostPool(self.pool_bytes, pin=pin)
            self.chunk_bytes = min(self.chunk_bytes, self.pool_bytes)
        event = None
        if any(b.local.is_cuda for b in blocks):
            event = torch.cuda.Event()
            event.record()  # the copies start after the optimizer step's kernels
        pending = _Pending(step, path, dict(trainer_state), [])
        self._copying = pending
        with self._settled:
            self._in_flight.append(pending)
        self._copy_q.put((pending, blocks, event))

    def wait(self) -> None:
        """Block until the pending copy is complete: the state may change after this returns."""
        if self._copying is not None:
            self._copying.copied.wait()
            self._copying = None
        self.raise_if_failed()

    def drain(self) -> None:
        """Block until every requested checkpoint is committed (or has failed)."""
        self.wait()
        with self._settled:
            self._settled.wait_for(lambda: not self._in_flight)
        self.raise_if_failed()

    def close(self) -> None:
        """Drain, then stop the background threads; no request may follow."""
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
            raise RuntimeError(f"checkpoint engine failed on rank {self.rank}: {self._error}") from self._error

    # --- background threads --------------------------------------------------------------------

    def _copier(self) -> None:
        stream = None
        while (item := self._copy_q.get()) is not None:
            pending, blocks, event = item
            try:
                if event is not None and stream is None:
                    stream = torch.cuda.Stream()
                self._copy(pending, blocks, event, stream)
            except BaseException as e:  # noqa: BLE001 - reported to the training thread
                pending.error = e
                self._write_q.put(("abort", pending))
            finally:
                pending.copied.set()
        self._write_q.put(None)

    def _copy(self, pending: _Pending, blocks, event, stream) -> None:
        """Coalesce the blocks' bytes into regions of ≤ chunk_bytes, copy each into the pool and
        hand it to the writer; a block larger than a region spans several."""
        offset = 0
        for b in blocks:
            pending.entries.append({"key": b.key, "dtype": str(b.local.dtype).removeprefix("torch."),
                                    "full_shape": list(b.full_shape), "block": b.coords(), "offset": offset,
                                    "nbytes": b.local.numel() * b.local.element_size(), "crc32": 0})
            offset += pending.entries[-1]["nbytes"]
        self._write_q.put(("open", pending))
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
                    dst[pos:pos + src.numel()].copy_(src, non_blocking=stream is not None)
                    pos += src.numel()
            if stream is not None:
                stream.synchronize()
            self._write_q.put(("region", pending, at, size, [(i, src.numel()) for i, src in region]))
            region, size = [], 0

        for i, b in enumerate(blocks):
            data = b.local.detach().contiguous().reshape(-1).view(torch.uint8)
            for start in range(0, max(data.numel(), 1), self.chunk_bytes):
                piece = data[start:start + self.chunk_bytes]
                if piece.numel() == 0:
                    continue  # an empty tensor: an index entry, no bytes
                if size + piece.numel() > self.chunk_bytes:
                    flush()
                region.append((i, piece))
                size += piece.numel()
        flush()
        self._write_q.put(("done", pending))

    def _writer(self) -> None:
        """Stream regions to the shard file; vote exactly once per checkpoint (yes after the
        index is durable, no at its first error); always give regions back to the pool."""
        f = None
        while (item := self._write_q.get()) is not None:
            kind, pending = item[0], item[1]
            try:
                if kind == "region":
                    at = item[2]
                    try:
                        if not pending.voted:
                            self._append(f, pending, *item[2:])
                    finally:
                        self.pool.free(at)
                elif pending.voted:
                    continue
                elif kind == "open":
                    pending.path.mkdir(parents=True, exist_ok=True)
                    f = open(pending.path / f"shard-{self.rank:05d}.bin", "wb")
                elif kind == "done":
                    self._finish(f, pending)
                    f = None
                    self._commit(pending, ok=True)
                elif kind == "abort":
                    self._commit(pending, ok=False)
            except BaseException as e:  # noqa: BLE001 - vote no, so that nobody commits
                pending.error = pending.error or e
                if f is not None:
                    f.close()
                    f = None
                if not pending.voted:
                    self._commit(pending, ok=False)

    def _append(self, f, pending: _Pending, at: int, size: int, pieces) -> None:
        data = self.pool.view(at, size).numpy()
        self._write_region(f, data)
        pos = 0
        for i, n in pieces:
            entry = pending.entries[i]
            entry["crc32"] = zlib.crc32(data[pos:pos + n], entry["crc32"])
            pos += n

    def _finish(self, f, pending: _Pending) -> None:
        """Make the shard durable: data, then its index, then the directory entry."""
        f.flush()
        os.fsync(f.fileno())
        f.close()
        index = pending.path / f"shard-{self.rank:05d}.json"
        with open(index, "w") as out:
            json.dump({"format": FORMAT, "rank": self.rank, "entries": pending.entries}, out)
            out.flush()
            os.fsync(out.fileno())
        fsync_dir(pending.path)

    def _write_region(self, f, data) -> None:
        """Append one region to the open shard file (tests slow it down to emulate storage)."""
        f.write(memoryview(data))

    def _commit(self, pending: _Pending, ok: bool) -> None:
        """Phase two: commit only if every rank's shard is durable."""
        pending.voted = True
        vote = torch.tensor([1 if ok else 0], dtype=torch.int32)
        try:
            dist.all_reduce(vote, op=dist.ReduceOp.MIN, group=self.group)
            if ok and int(vote) == 1:
                if self.rank == 0:
                    self.publish(pending.step, pending.trainer_state)
                dist.barrier(group=self.group)  # `latest` is moved before any rank reports it committed
            else:
                self._error = self._error or pending.error or RuntimeError(
                    f"another rank failed to write the checkpoint of step {pending.step}; `latest` is unchanged")
        finally:
            with self._settled:
                self._in_flight.remove(pending)
                self._settled.notify_all()

