"""Process groups of one rank, created once from the topology and passed down explicitly.

Every rank calls `dist.new_group` for every distinct group in the same order (a requirement of
torch.distributed) and keeps the handles of the groups it belongs to. Groups with the same
ranks (tp and etp when etp = tp, dp and dp_cp when cp = 1, ...) share one process group. A group
of one rank creates nothing (its handle is None and collectives over it are skipped), except
where a DeviceMesh needs one (HSDP with a shard or replica group of one).

Given every process's NIC class, each group is created with the transport of its members' class
(parallel/strategies/holmes/transport.py, Holmes): NCCL's network module per communicator plus the class's
variables while the group is made and warmed up; gloo's interface of the class.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

import numpy as np

from parallel.mesh import GROUP_SPECS, HSDP_GROUPS, Topology
from parallel.strategies.holmes.transport import Transport, group_transport, transport_env


@dataclass
class Groups:
    """This rank's process group per group name (None for a group of one)."""

    rank: int
    topology: Topology
    device_type: str
    handles: dict[str, dist.ProcessGroup | None] = field(default_factory=dict)
    ranks: dict[str, list[int]] = field(default_factory=dict)
    transports: dict[str, Transport] = field(default_factory=dict)  # when NIC classes were given
    node_size: int = 0  # processes per node (FSSDP prefers replicas in the node); 0 = unknown

    def __getitem__(self, name: str) -> dist.ProcessGroup | None:
        return self.handles[name]

    def size(self, name: str) -> int:
        return len(self.ranks[name])

    def index(self, name: str) -> int:
        """This rank's position within its group `name` (its coordinate in that dimension)."""
        return self.ranks[name].index(self.rank)

    def device_mesh(self, name: str) -> DeviceMesh:
        """A 1-D DeviceMesh over this rank's group `name`, for FSDP2 and DTensor."""
        if self.handles[name] is None:
            raise ValueError(f"group {name!r} has one rank; no DeviceMesh is made for it")
        return DeviceMesh.from_group(self.handles[name], self.device_type, mesh_dim_names=(name,))

    def hsdp_mesh(self) -> DeviceMesh:
        """The 2-D (dp_replicate, dp_shard) DeviceMesh over this rank's dp_cp group, for HSDP."""
        rep, shard = self.size("dp_replicate"), self.size("dp_shard")
        mesh = np.array(self.ranks["dp_cp"]).reshape(rep, shard)
        return DeviceMesh.from_group([self.handles["dp_replicate"], self.handles["dp_shard"]], self.device_type,
                                     mesh=mesh, mesh_dim_names=("dp_replicate", "dp_shard"))


def _new_group(ranks: list[int], timeout_s: float, transport: Transport | None, backend: str):
    options = None
    if transport is not None and backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options.config.net_name = transport.nccl_net
    with transport_env(transport):
        handle = dist.new_group(ranks, timeout=timedelta(seconds=timeout_s), pg_options=options)
        if transport is not None and backend == "nccl" and dist.get_rank() in ranks:
            dist.barrier(group=handle)  # NCCL builds the communicator now, under the class's variables
    return handle


def build_groups(topology: Topology, device_type: str, timeout_s: float,
                 names: tuple[str, ...] = (*GROUP_SPECS, *HSDP_GROUPS),
                 nics: list[str] | None = None, classes=None, node_size: int = 0,
                 embedding_group: bool = False) -> Groups:
    """This rank's groups; `nics[p]` (process p's NIC class) and `classes` (cluster.classes)
    choose each group's transport; `node_size`: processes per node. `embedding_group` with
    pp > 1: an "embedding" group of each pipeline's first and last stage, which both hold the
    embedding matrix: as the head (tied) or for multi-token prediction (Megatron-LM's embedding
    group)."""
    rank = dist.get_rank()
    backend = "nccl" if device_type == "cuda" else "gloo"
    groups = Groups(rank=rank, topology=topology, device_type=device_type, node_size=node_size)

    def transport(ranks: list[int]) -> Transport | None:
        return None if nics is None else group_transport([nics[r] for r in ranks], classes, backend)

    made: dict[tuple[int, ...], dist.ProcessGroup] = {}
    # HSDP's DeviceMesh needs a process group for each of its two dimensions, even one of size 1.
    keep_singletons = set(HSDP_GROUPS) if topology.dp_replicate > 1 else set()
    for name in names:
        for ranks in topology.groups(name):
            key = tuple(ranks)
            if len(ranks) == 1 and name not in keep_singletons:
                handle = None
            elif key in made:
                handle = made[key]
            else:
                handle = made[key] = _new_group(ranks, timeout_s, transport(ranks), backend)
            if rank in ranks:
                groups.handles[name], groups.ranks[name] = handle, ranks
                if nics is not None:
                    groups.transports[name] = transport(ranks)
    if topology.pp > 1:
        # A second communicator over each pipeline group for gradients: with interleaving one link
        # carries activations one way and gradients the same way, and point-to-point matching is
        # FIFO per communicator, so the two streams must not share one.
        for ranks in topology.groups("pp"):
            handle = _new_group(ranks, timeout_s, transport(ranks), backend)
            if rank in ranks:
                groups.handles["pp_grad"], groups.ranks["pp_grad"] = handle, ranks
        for ranks in topology.groups("pp") if embedding_group else ():
            ends = [ranks[0], ranks[-1]]
            handle = _new_group(ends, timeout_s, transport(ends), backend)
            if rank in ends:
                groups.handles["embedding"], groups.ranks["embedding"] = handle, ends
    return groups
