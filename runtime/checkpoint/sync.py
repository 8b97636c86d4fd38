"""The blocking checkpoint engine, with a two-phase commit.

Layout of `checkpoint.dir`:
    step_00000010/   shard-<rank>.bin/.json (runtime/checkpoint/format.py), trainer.json last
    latest           the name of the newest complete checkpoint

Commit protocol: each block held by several ranks (replicated parameters, DDP replicas) is
written once, by the lowest such rank (`owned_blocks`: the layout says which, or the ranks agree); every
rank writes and fsyncs its shard; all exchange their outcome (an all-gather of error messages);
then rank 0 writes trainer.json and replaces `latest` atomically (write, fsync, rename) — or,
when any rank failed, removes the step folder while every rank raises the same
CheckpointWriteError. A crash at any point leaves `latest` naming the previous complete
checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from runtime.checkpoint.format import index_checksums, write_failure, write_shard


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def owned_blocks(blocks, rank: int) -> list:
    """The blocks this rank writes: of identical (key, block) pairs on several ranks, the lowest
    rank's — its `owner` where the layout decides it (parallel/state.py), otherwise agreed by an
    all-gather of the coordinates (metadata, not data) of the blocks whose owner is open, which
    every rank joins (with an empty list when the layout decides all of its blocks)."""
    open_blocks = [b for b in blocks if b.owner is None]
    mine = [(b.key, tuple(map(tuple, b.coords()))) for b in open_blocks]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    first_holder: dict = {}
    for r, held in enumerate(everyone):
        for item in held:
            first_holder.setdefault(item, r)
    agreed = {id(b) for b, item in zip(open_blocks, mine) if first_holder[item] == rank}
    return [b for b in blocks if (b.owner == rank if b.owner is not None else id(b) in agreed)]


class BaseCheckpointer:
    """What every engine shares: when to save, the directory layout, publishing a committed
    checkpoint (trainer.json with the model's config and the index files' checksums, then
    `latest`, then retention). Finding and loading one is runtime/checkpoint/resume.py's. On its
    own (`saves` False) it writes nothing: the engine of a run with checkpoint.enabled=false."""

    saves = False  # whether `request` exists; engines that write set it

    def __init__(self, directory: str, every: int, rank: int, keep_last: int = 0, every_s: float = 0.0,
                 model: dict | None = None):
        """`model`: the model's config, recorded in every checkpoint's trainer.json so that a
        resume into another model can say what differs (runtime/checkpoint/resume.py)."""
        self.dir, self.every, self.rank = Path(directory), every, rank
        self.keep_last, self.every_s, self.model = keep_last, every_s, model
        self.on_publish = None  # called with the step once its checkpoint is named (the trainer's record)

    def due(self, step: int, last_step: int, stopping: bool = False) -> bool:
        """Whether to save after optimizer step `step` (1-based count of completed steps).

        A launch that stops early always saves: stopping is for resuming later."""
        return stopping or (self.every > 0 and (step % self.every == 0 or step == last_step))

    def step_path(self, step: int) -> Path:
        return self.dir / f"step_{step:08d}"

    def publish(self, step: int, trainer_state: dict) -> None:
        """Rank 0, once every rank's shard of `step` is durable: name it, then drop old ones."""
        path = self.step_path(step)
        record = {"step": step, **trainer_state, **({"model": self.model} if self.model is not None else {}),
                  "index_crc32": index_checksums(path)}
        atomic_write(path / "trainer.json", json.dumps(record) + "\n")
        atomic_write(self.dir / "latest", path.name + "\n")
        if self.on_publish is not None:
            self.on_publish(step)
        if self.keep_last > 0:
            committed = sorted(p for p in self.dir.glob("step_*") if (p / "trainer.json").exists())
            for old in committed[:-self.keep_last]:
                if old != path:
                    shutil.rmtree(old, ignore_errors=True)

    def wait(self) -> None:
        """The state may be modified from now on (a blocking save is complete on return)."""

    @property
    def failed(self) -> bool:
        """Whether a background write has failed on this rank (the trainer stops every rank at
        the same step; `close` raises the error)."""
        return False

    def close(self) -> None:
        """Every requested checkpoint is committed on return."""


class SyncCheckpointer(BaseCheckpointer):
    """Blocking: `request` returns when the checkpoint is committed."""

    saves = True

    def request(self, step: int, blocks: list, trainer_state: dict) -> None:
        """Save `blocks` (this rank's StateBlocks, parallel/state.py) as the checkpoint of `step`."""
        path = self.step_path(step)
        if self.rank == 0 and path.exists():
            shutil.rmtree(path)  # an earlier, uncommitted attempt at this step
        dist.barrier()
        blocks = owned_blocks(blocks, self.rank)
        error = None
        try:
            write_shard(path, self.rank, blocks)
        except OSError as e:  # a full disk, a lost mount: every rank learns of it below
            error = f"rank {self.rank}: {e}"
        # Every rank's shard is durable (or has failed) before anything names the checkpoint.
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        if any(errors):
            if self.rank == 0:
                shutil.rmtree(path, ignore_errors=True)
            dist.barrier()
            raise write_failure(f"step {step}", path, [e for e in errors if e])
        if self.rank == 0:
            self.publish(step, trainer_state)
        dist.barrier()  # nobody starts the next save while `latest` may still name the old one
