"""The blocking checkpoint engine: PyTorch DCP, sharded and reshardable, with an atomic commit.

Layout of `checkpoint.dir`:
    step_00000010/   DCP shards + .metadata, and trainer.json (step, tokens) written last
    latest           the name of the newest complete checkpoint

Commit protocol: every rank writes its shards (DCP), all ranks meet at a barrier, then rank 0
writes trainer.json and replaces `latest` atomically (write, fsync, rename). A crash at any
point leaves `latest` naming the previous complete checkpoint. The keys are parameter names
of the unwrapped model (DCP's state-dict helpers strip DDP/FSDP/compile wrappers), so a
checkpoint loads into any layout.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict


class CheckpointError(RuntimeError):
    pass


def _atomic_write(path: Path, text: str) -> None:
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


class SyncCheckpointer:
    def __init__(self, directory: str, every: int, rank: int):
        self.dir, self.every, self.rank = Path(directory), every, rank

    def due(self, step: int, last_step: int, stopping: bool = False) -> bool:
        """Whether to save after optimizer step `step` (1-based count of completed steps).

        A launch that stops early always saves: stopping is for resuming later."""
        return stopping or (self.every > 0 and (step % self.every == 0 or step == last_step))

    def request(self, step: int, model, optimizer, trainer_state: dict) -> None:
        """Save the state after `step` completed optimizer steps; returns when it is committed."""
        path = self.dir / f"step_{step:08d}"
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
        dist.barrier()  # every rank's shards are written before anything names them complete
        if self.rank == 0:
            _atomic_write(path / "trainer.json", json.dumps({"step": step, **trainer_state}) + "\n")
            _atomic_write(self.dir / "latest", path.name + "\n")
        dist.barrier()  # nobody starts the next save while `latest` may still name the old one

    def wait(self) -> None:
        """The state may be modified from now on (a blocking save is complete on return)."""

    def latest(self) -> Path | None:
        marker = self.dir / "latest"
        if not marker.exists():
            return None
        path = self.dir / marker.read_text().strip()
        if not (path / "trainer.json").exists():
            raise CheckpointError(f"{marker} names {path}, which has no trainer.json: the checkpoint "
                                  "is incomplete; remove the marker to start over")
        return path

    def load(self, path: Path, model, optimizer) -> dict:
        """Load the checkpoint at `path` into the (parallelised) model and optimizer."""
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        return json.loads((path / "trainer.json").read_text())
