"""This rank's training state as blocks of full tensors (runtime/checkpoint/format.py's
StateBlock): what a checkpoint stores and restores, named from the sharding plan.

Every parameter and every optimizer state tensor of the same shape is a rectangle (`block`) of
a full tensor named by its canonical key; scalar optimizer states are whole. A layout is then
only a choice of rectangles, so a checkpoint written by one layout loads into any other.

A block held by several ranks (replicated parameters, DDP replicas, scalar states) is written
once, by the lowest of them (its `owner`). The layout says who holds what: two ranks hold the
same block when both hold the parameter (the same pipeline stage, or either end when the ends
share the embedding) and agree in their position in every group that decides the block (the
plan's TP/EP/ETP splits, FSDP's sharded mesh dimensions). So owners are computed here, without
communication — an exchange of every rank's block list would bring each of 16,384 ranks 0.27 GB
of metadata for Llama 3 405B (docs/scale.md). FSSDP's experts are the exception: each EP group
re-plans which rank owns which expert, so their owners are agreed when saving
(runtime/checkpoint/sync.py owned_blocks).
"""
from __future__ import annotations

import numpy as np
import torch
from torch.distributed.tensor import DTensor, Shard

from parallel.materialize import canonical_name
from parallel.parallelize import SHARED_BY_ENDS
from parallel.sharding import local_blocks
from runtime.checkpoint.format import StateBlock


class _Owners:
    """The lowest rank holding the same block as this one, by the groups that decide the block."""

    def __init__(self, groups):
        self.topology, self.rank = groups.topology, groups.rank
        self.ends_share = groups.ranks.get("embedding") is not None
        self._positions: dict[str, np.ndarray] = {}
        self._owners: dict[tuple, int] = {}

    def _position(self, name: str) -> np.ndarray:
        """Every rank's position in its group `name`."""
        if name not in self._positions:
            self._positions[name] = out = np.empty(self.topology.world_size, dtype=np.int64)
            for ranks in self.topology.groups(name):
                out[ranks] = np.arange(len(ranks))
        return self._positions[name]

    def __call__(self, param: str, deciding: tuple[str, ...]) -> int:
        ends = self.ends_share and param == SHARED_BY_ENDS
        if (deciding, ends) not in self._owners:
            pp = self._position("pp")
            holds = np.isin(pp, [0, self.topology.pp - 1]) if ends else pp == pp[self.rank]
            for name in deciding:
                position = self._position(name)
                holds &= position == position[self.rank]
            self._owners[deciding, ends] = int(np.argmax(holds))  # the first (lowest) rank holding it
        return self._owners[deciding, ends]


def state_blocks(parallel, optimizer, experts_by_plan: bool = False) -> list[StateBlock]:
    """Blocks of the model's parameters, its persistent buffers (whole on every rank, e.g. MoE
    routing biases) and the optimizer's per-parameter state, each with its owner — for FSSDP's
    experts only with `experts_by_plan` (a rehearsal, before any re-planning: then the plan's
    initial owners are every EP group's)."""
    owner = _Owners(parallel.groups)
    out = []
    for chunk in parallel.chunks:
        for name, buf in chunk.named_buffers():
            name = canonical_name(name)
            out.append(StateBlock(f"buffer/{name}", buf, tuple(buf.shape), tuple(slice(0, n) for n in buf.shape),
                                  owner(name, ())))
    plan = parallel.plan
    for name, p in parallel.named_parameters():
        full = plan.full_shape(name, p)
        deciding = plan.split_groups(name)
        if isinstance(p, DTensor):
            deciding += tuple(dim for dim, placement in zip(p.device_mesh.mesh_dim_names, p.placements)
                              if isinstance(placement, Shard))
        by_plan = experts_by_plan or name not in plan.specs or plan.specs[name].rows is None
        block_owner = owner(name, deciding) if by_plan else None
        out += [StateBlock(f"model/{name}", view, full, block, block_owner) for view, block in local_blocks(plan, name, p)]
        for key, value in optimizer.state.get(p, {}).items():
            if not torch.is_tensor(value):
                continue
            if value.dim() == 0:
                out.append(StateBlock(f"optim/{name}/{key}", value, (), (), owner(name, ()) if by_plan else None))
            else:
                out += [StateBlock(f"optim/{name}/{key}", view, full, block, block_owner)
                        for view, block in local_blocks(plan, name, p, like=value)]
    return out
