"""The lazy asynchronous checkpoint engine (`checkpoint.engine=lazy`, DataStates-LLM).

`request(k)` at the end of step k returns at once: this rank's blocks of the state become one
file of runtime/checkpoint/lazy_writer.py's pipeline, copied while step k+1's forward and
backward run and written behind the copy; the trainer calls `wait()` right before the next
optimizer step (and before anything else that mutates the state), which blocks only while the
copy is unfinished. Once every rank's shard is durable, rank 0 publishes the checkpoint
(trainer.json, `latest`, retention). The files are runtime/checkpoint/format.py's:
layout-independent blocks, JSON index, no pickle.
"""
from __future__ import annotations

import shutil
from functools import partial

from runtime.checkpoint.format import write_shard_index
from runtime.checkpoint.lazy_writer import LazyWriter
from runtime.checkpoint.sync import BaseCheckpointer, owned_blocks


def _write_index(path, rank: int, data_file, entries: list[dict]) -> None:
    """A FileJob finish: the index goes beside the data file, not into it."""
    write_shard_index(path, rank, entries)


class LazyCheckpointer(LazyWriter, BaseCheckpointer):
    saves = True

    def __init__(self, directory: str, every: int, rank: int, *, keep_last: int = 0, every_s: float = 0.0,
                 model: dict | None = None, **writer):
        """`writer`: LazyWriter's pool_bytes, chunk_bytes, timeout_s, pin."""
        BaseCheckpointer.__init__(self, directory, every, rank, keep_last=keep_last, every_s=every_s, model=model)
        LazyWriter.__init__(self, rank, **writer)

    def request(self, step: int, blocks: list, trainer_state: dict) -> None:
        """Start the checkpoint of the state after `step` steps (this rank's StateBlocks); returns
        before anything is copied."""
        path = self.step_path(step)
        if self.rank == 0 and path.exists():
            shutil.rmtree(path)  # an earlier, uncommitted attempt at this step (maybe another layout)
        # Collective (block metadata): no rank writes before rank 0 has cleared the directory.
        blocks = owned_blocks(blocks, self.rank)
        ckpt = self.begin(f"step {step}", partial(self.publish, step, dict(trainer_state)),
                          on_abort=partial(shutil.rmtree, path, ignore_errors=True), where=str(path))
        entries = [{"key": b.key, "full_shape": list(b.full_shape), "block": b.coords()} for b in blocks]
        self.add_file(ckpt, path / f"shard-{self.rank:05d}.bin", [b.local for b in blocks], entries,
                      partial(_write_index, path, self.rank))
        self.seal(ckpt)
