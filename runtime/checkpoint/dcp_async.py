"""The `dcp_async` baseline engine: PyTorch Distributed Checkpoint's `async_save`.

`async_save` stages a copy of the state in host memory before it returns (the eager copy the
lazy engine avoids), then writes it from a background thread; DCP's collective finish step
completes a rank's future only after every rank's files are written (and fsynced by the
file-system writer). Completed saves are published in step order by rank 0 (trainer.json,
`latest`, retention) at the next request, wait or close. Files: runtime/checkpoint/dcp_format.py.
"""
from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from parallel.state import state_blocks
from runtime.checkpoint.dcp_format import block_key
from runtime.checkpoint.format import CheckpointError
from runtime.checkpoint.sync import BaseCheckpointer, owned_blocks


class DcpAsyncCheckpointer(BaseCheckpointer):
    saves = True

    def __init__(self, directory: str, every: int, rank: int, *, timeout_s: float = 600.0, **common):
        super().__init__(directory, every, rank, **common)
        # DCP's asynchronous save runs collectives from a background thread: a gloo group of its
        # own keeps them off the training thread's groups.
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        self._pending: list[tuple] = []  # (future, step, trainer_state), oldest first

    def request(self, step: int, parallel, optimizer, trainer_state: dict) -> None:
        self._harvest()
        blocks = owned_blocks(state_blocks(parallel, optimizer), self.rank)
        state = {block_key(b.key, b.coords()): b.local.detach() for b in blocks}
        future = dcp.async_save(state, checkpoint_id=str(self.step_path(step)), process_group=self.group)
        self._pending.append((future, step, dict(trainer_state)))

    def wait(self) -> None:
        """async_save copied the state before it returned: nothing to wait for."""
        self._harvest()

    def close(self) -> None:
        for future, _, _ in self._pending:
            future.exception()  # wait; the error, if any, is raised by _harvest
        self._harvest()
        dist.barrier(group=self.group)  # rank 0 has published before any rank returns

    def _harvest(self) -> None:
        """Publish the finished saves at the head of the queue (rank 0), raise a failed one."""
        while self._pending and self._pending[0][0].done():
            future, step, trainer_state = self._pending.pop(0)
            if future.exception() is not None:
                raise CheckpointError(f"DCP async_save of step {step} failed on rank {self.rank}: "
                                      f"{future.exception()}") from future.exception()
            if self.rank == 0:
                self.publish(step, trainer_state)
