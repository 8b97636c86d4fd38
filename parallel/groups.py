"""Process groups of one rank, created once from the topology and passed down explicitly.

Every rank calls `dist.new_group` for every group of every dimension in the same order (a
requirement of torch.distributed); each keeps the handle of the group it belongs to.
A dimension of size 1 creates no group: its handle is None and collectives over it are skipped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from parallel.mesh import Topology


@dataclass
class Groups:
    """This rank's process group per dimension name (None for a group of one)."""

    rank: int
    topology: Topology
    device_type: str
    handles: dict[str, dist.ProcessGroup | None] = field(default_factory=dict)
    ranks: dict[str, list[int]] = field(default_factory=dict)

    def __getitem__(self, name: str) -> dist.ProcessGroup | None:
        return self.handles[name]

    def size(self, name: str) -> int:
        return len(self.ranks[name])

    def index(self, name: str) -> int:
        """This rank's position within its group of dimension `name`."""
        return self.ranks[name].index(self.rank)

    def device_mesh(self, name: str) -> DeviceMesh:
        """A 1-D DeviceMesh over this rank's group `name`, for FSDP2 and DTensor."""
        return DeviceMesh.from_group(self.handles[name], self.device_type, mesh_dim_names=(name,))


def build_groups(topology: Topology, names: tuple[str, ...], device_type: str,
                 timeout_s: float) -> Groups:
    rank = dist.get_rank()
    groups = Groups(rank=rank, topology=topology, device_type=device_type)
    for name in names:
        for ranks in topology.groups(name):
            if len(ranks) == 1:
                if rank in ranks:
                    groups.handles[name], groups.ranks[name] = None, ranks
                continue
            pg = dist.new_group(ranks, timeout=timedelta(seconds=timeout_s), use_local_synchronization=False)
            if rank in ranks:
                groups.handles[name], groups.ranks[name] = pg, ranks
    return groups
