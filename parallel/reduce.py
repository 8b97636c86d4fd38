"""Sums of per-rank partial results (loss, target-token counts) over the ranks whose data differ."""
from __future__ import annotations

import torch
import torch.distributed as dist


class DataReducer:
    """Sums a tensor over every group in `groups` in turn (None = a group of one, skipped)."""

    def __init__(self, groups):
        self.groups = [g for g in groups if g is not None]

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        for group in self.groups:
            dist.all_reduce(t, group=group)
        return t
