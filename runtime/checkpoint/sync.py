"""The blocking checkpoint engine, with a two-phase commit.

Layout of `checkpoint.dir`:
    step_00000010/   shard-<rank>.bin/.json (runtime/checkpoint/format.py), trainer.json last
    latest           the name of the newest complete checkpoint

Commit protocol: the ranks agree which of them writes each block (a block held by several
ranks — replicated parameters, DDP replicas — is written once, by the lowest such rank); every
rank writes and fsyncs its shard; all meet at a barrier; then rank 0 writes trainer.json and
replaces `latest` atomically (write, fsync, rename). A crash at any point leaves `latest` naming
the previous complete checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from parallel.state import state_blocks
from runtime.checkpoint.dcp_format import is_dcp_checkpoint, load_dcp_blocks
from runtime.checkpoint.format import CheckpointError, load_blocks, write_shard
from runtime.optim import init_optimizer_state


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
    rank's. Costs one all-gather of the block coordinates (metadata, not data)."""
    mine = [(b.key, tuple(map(tuple, b.coords()))) for b in blocks]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    first_holder: dict = {}
    for r, held in enumerate(everyone):
        for item in held:
            first_holder.setdefault(item, r)
    return [b for b, item in zip(blocks, mine) if first_holder[item] == rank]


class BaseCheckpointer:
    """What every engine shares: when to save, the directory layout, publishing a committed
    checkpoint (trainer.json, then `latest`, then retention), finding and loading the latest.
    On its own (`saves` False) it only loads: the engine of a run with checkpoint.enabled=false."""

    saves = False  # whether `request` exists; engines that write set it

    def __init__(self, directory: str, every: int, rank: int, keep_last: int = 0, every_s: float = 0.0):
        self.dir, self.every, self.rank = Path(directory), every, rank
        self.keep_last, self.every_s = keep_last, every_s
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
        atomic_write(path / "trainer.json", json.dumps({"step": step, **trainer_state}) + "\n")
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

    def close(self) -> None:
        """Every requested checkpoint is committed on return."""

    def latest(self) -> Path | None:
        marker = self.dir / "latest"
        if not marker.exists():
            return None
        path = self.dir / marker.read_text().strip()
        if not (path / "trainer.json").exists():
            raise CheckpointError(f"{marker} names {path}, which has no trainer.json: the checkpoint "
                                  "is incomplete; remove the marker to start over")
        return path

    def load(self, path: Path, parallel, optimizer) -> dict:
        """Load the checkpoint at `path` into the parallelised model and optimizer (any layout)."""
        init_optimizer_state(optimizer)
        blocks = state_blocks(parallel, optimizer)
        if is_dcp_checkpoint(path):  # written by the dcp_async engine
            load_dcp_blocks(path, blocks)
        else:
            load_blocks(path, blocks)
        return json.loads((path / "trainer.json").read_text())


class SyncCheckpointer(BaseCheckpointer):
    """Blocking: `request` returns when the checkpoint is committed."""

    saves = True

    def request(self, step: int, parallel, optimizer, trainer_state: dict) -> None:
        path = self.step_path(step)
        if self.rank == 0 and path.exists():
            shutil.rmtree(path)  # an earlier, uncommitted attempt at this step
        dist.barrier()
        write_shard(path, self.rank, owned_blocks(state_blocks(parallel, optimizer), self.rank))
        dist.barrier()  # every rank's shard is durable before anything names the checkpoint
        if self.rank == 0:
            self.publish(step, trainer_state)
        dist.barrier()  # nobody starts the next save while `latest` may still name the old one
