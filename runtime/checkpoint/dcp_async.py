"""The `dcp_async` baseline engine: PyTorch Distributed Checkpoint's `async_save`.

`async_save` stages a copy of the state in host memory before it returns (the eager copy the
lazy engine avoids), then writes it from a background thread; DCP's collective finish step
completes a rank's future only after every rank's files are written (and fsynced by the
file-system writer). Completed saves are published in step order by rank 0 (trainer.json,
`latest`, retention) at the next request, wait or close. Files: runtime/checkpoint/dcp_format.py.
"""
from __future__ import annotations

import shutil
from datetime import timedelta

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from runtime.checkpoint.dcp_format import block_key
from runtime.checkpoint.format import CheckpointWriteError, write_failure
from runtime.checkpoint.sync import BaseCheckpointer, owned_blocks


class DcpAsyncCheckpointer(BaseCheckpointer):
    saves = True

    def __init__(self, directory: str, every: int, rank: int, *, timeout_s: float = 600.0, **common):
        super().__init__(directory, every, rank, **common)
        # DCP's asynchronous save runs collectives from a background thread: a gloo group of its
        # own keeps them off the training thread's groups.
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        self._pending: list[tuple] = []  # (future, step, trainer_state), oldest first
        self._error: CheckpointWriteError | None = None

    def request(self, step: int, blocks: list, trainer_state: dict) -> None:
        self._harvest()
        blocks = owned_blocks(blocks, self.rank)
        state = {block_key(b.key, b.coords()): b.local.detach() for b in blocks}
        future = dcp.async_save(state, checkpoint_id=str(self.step_path(step)), process_group=self.group)
        self._pending.append((future, step, dict(trainer_state)))

    def wait(self) -> None:
        """async_save copied the state before it returned: nothing to wait for."""
        self._harvest()

    @property
    def failed(self) -> bool:
        self._harvest()
        return self._error is not None

    def close(self) -> None:
        for future, _, _ in self._pending:
            future.exception()  # wait; a failure is recorded by _harvest
        self._harvest()
        dist.barrier(group=self.group)  # rank 0 has published (or removed) before any rank returns
        if self._error is not None:
            raise self._error

    def _harvest(self) -> None:
        """Publish the finished saves at the head of the queue (rank 0); record a failed one
        (DCP's collective finish fails it on every rank) and remove its files."""
        while self._pending and self._pending[0][0].done():
            future, step, trainer_state = self._pending.pop(0)
            if future.exception() is not None:
                if self.rank == 0:
                    shutil.rmtree(self.step_path(step), ignore_errors=True)
                self._error = self._error or write_failure(f"step {step}", self.step_path(step),
                                                           [f"rank {self.rank}: {future.exception()}"])
            elif self.rank == 0 and self._error is None:
                self.publish(step, trainer_state)
