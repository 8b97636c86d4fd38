"""The deterministic, resumable loader that shards each global batch over data-parallel ranks.

The corpus is cut into windows of seq_len+1 tokens at stride seq_len (inputs and shifted
targets). Sequence number i of the run (step·global_batch + position in the step) is window
perm_e[i mod W] of epoch e = i div W, with perm_e a permutation drawn from (seed, e). The batch
of a step is therefore a pure function of (seed, step): resuming needs only the step number,
and every layout sees the same sequences in the same global positions. Data-parallel rank d
takes the d-th contiguous slice of the global batch, cut into microbatches.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Batch:
    """One microbatch: inputs and targets, [micro_batch, seq_len] int64 each."""

    tokens: torch.Tensor
    labels: torch.Tensor


class BatchLoader:
    def __init__(self, tokens, seq_len: int, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0):
        per_rank, rem = divmod(global_batch_size, dp_size)
        if rem or per_rank % micro_batch_size:
            raise ValueError(f"global batch {global_batch_size} does not split into microbatches of "
                             f"{micro_batch_size} over {dp_size} data-parallel ranks")
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.per_rank = dp_rank, per_rank
        self.n_windows = (len(tokens) - 1) // seq_len
        self._perm_epoch, self._perm = -1, None

    @property
    def num_microbatches(self) -> int:
        return self.per_rank // self.micro_batch_size

    def _window(self, i: int) -> int:
        epoch, j = divmod(i, self.n_windows)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n_windows, generator=g).numpy(), epoch
        return int(self._perm[j])

    def sequence_ids(self, step: int) -> range:
        """Global sequence numbers this rank trains on at `step`."""
        first = step * self.global_batch_size + self.dp_rank * self.per_rank
        return range(first, first + self.per_rank)

    def step(self, step: int) -> list[Batch]:
        """The microbatches of this rank for optimizer step `step` (0-based)."""
        rows = []
        for i in self.sequence_ids(step):
            start = self._window(i) * self.seq_len
            rows.append(np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64))
        data = torch.from_numpy(np.stack(rows))  # [per_rank, seq_len + 1]
        mb = self.micro_batch_size
        return [Batch(data[k:k + mb, :-1], data[k:k + mb, 1:]) for k in range(0, self.per_rank, mb)]
