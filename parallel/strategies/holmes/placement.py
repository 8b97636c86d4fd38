"""Place logical 5D ranks on processes by network, after Holmes (ICPP 2024).

RDMA does not cross NIC types, so a group whose members sit behind different kinds of NIC
(InfiniBand and RoCE, or either and plain Ethernet) falls back to TCP sockets. Holmes keeps the
heavy collectives inside one class:

- processes are sorted by NIC class, then node, then local rank, so each node's processes are
  neighbours and each class is one contiguous run;
- pipeline stage s takes the s-th run of world/pp processes: a stage sits inside one class when
  the class sizes allow, and then every DP, CP and EDP group (all within a stage) is homogeneous;
- inside a stage the logical ranks keep Megatron's order, so TP (fastest-varying) stays inside a
  node whenever a node's process count is a multiple of tp;
- pipeline groups then cross classes only at stage boundaries, where only point-to-point
  activations travel.

Which class comes first is chosen among all orders of the classes (there are at most a handful):
the order leaving the fewest mixed DP/EDP groups, then the fastest class first — stage 0 holds
the embedding and finishes its backward last, so its gradient reduction is on the critical path.
With one NIC class and processes numbered node by node (torchrun, Slurm's block distribution)
the placement is the identity, so it is on by default.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from itertools import permutations

from parallel.mesh import Topology

# Groups whose collectives carry gradients or activations every microbatch: they must not mix
# NIC classes. TP-like groups must also stay inside a node.
HOMOGENEOUS_GROUPS = ("dp", "cp", "dp_cp", "edp")
NODE_LOCAL_GROUPS = ("tp", "etp")


@dataclass(frozen=True)
class RankInfo:
    """Where one process runs: its node (node rank), its index on the node, its NIC class."""

    node: int
    local_rank: int
    nic: str


def _mixed_groups(topo: Topology, ranks: list[RankInfo]) -> dict[tuple[int, ...], list[str]]:
    """Groups that must be homogeneous but mix NIC classes -> the names they serve as."""
    out: dict[tuple[int, ...], list[str]] = {}
    for name in HOMOGENEOUS_GROUPS:
        for group in topo.groups(name):
            if len({ranks[r].nic for r in group}) > 1:
                out.setdefault(tuple(group), []).append(name)
    return out


def _place(topo: Topology, ranks: list[RankInfo], class_order: tuple[str, ...]) -> tuple[int, ...]:
    first = {nic: i for i, nic in enumerate(class_order)}
    physical = sorted(range(topo.world_size), key=lambda r: (first[ranks[r].nic], ranks[r].node, ranks[r].local_rank))
    logical = dataclasses.replace(topo, placement=None)
    stage_size = topo.world_size // topo.pp
    where = [0] * topo.world_size
    # Members of a pp group are listed by stage; the s-th member of the j-th group is the j-th
    # logical rank of stage s (groups are ordered by the other coordinates, Megatron's order).
    for j, group in enumerate(logical.groups("pp")):
        for stage, rank in enumerate(group):
            where[rank] = physical[stage * stage_size + j]
    return tuple(where)


def holmes_placement(topo: Topology, ranks: list[RankInfo], speed_rank: dict[str, int]) -> Topology:
    """`topo` with a placement that keeps DP/EDP groups inside one NIC class where possible.

    `ranks[p]` describes process p; `speed_rank[nic]` orders classes (lower = faster)."""
    if len(ranks) != topo.world_size:
        raise ValueError(f"{len(ranks)} processes described for a world of {topo.world_size}")
    classes = sorted({r.nic for r in ranks}, key=lambda c: (speed_rank.get(c, len(speed_rank)), c))
    best = None
    for order in permutations(classes):
        placed = dataclasses.replace(topo, placement=_place(topo, ranks, order))
        score = (len(_mixed_groups(placed, ranks)), [classes.index(c) for c in order])
        if best is None or score < best[0]:
            best = (score, placed)
    return best[1]


def placement_warnings(topo: Topology, ranks: list[RankInfo]) -> list[str]:
    """One line per group that mixes NIC classes or (TP/ETP) spans nodes, naming its processes,
    and what would avoid it."""
    out = []
    mixed = _mixed_groups(topo, ranks)
    for group, names in mixed.items():
        classes = sorted({ranks[r].nic for r in group})
        out.append(f"{'/'.join(names)} group {list(group)} mixes NIC classes {', '.join(classes)}: its "
                   f"collectives fall back to TCP sockets")
    if mixed:
        stage = topo.world_size // topo.pp
        counts = {nic: sum(r.nic == nic for r in ranks) for nic in sorted({r.nic for r in ranks})}
        if all(n % stage == 0 for n in counts.values()):
            out.append("parallel.placement=holmes keeps every pipeline stage, and so these groups, inside one class")
        else:
            out.append(f"a pipeline stage holds world/pp = {stage} processes; to keep each inside one NIC class "
                       f"every class needs a multiple of {stage} processes (here: "
                       f"{', '.join(f'{k} {v}' for k, v in counts.items())})")
    seen = set()
    for name in NODE_LOCAL_GROUPS:
        for group in topo.groups(name):
            nodes = sorted({ranks[r].node for r in group})
            if len(nodes) > 1 and tuple(group) not in seen:
                seen.add(tuple(group))
                out.append(f"{name} group {group} spans nodes {nodes}: tensor parallelism needs a node's "
                           f"process count to be a multiple of its size")
    return out


def described_ranks(nodes, world_size: int) -> list[RankInfo]:
    """Processes of a described cluster (`cluster.nodes`), numbered node by node."""
    ranks = [RankInfo(node=i, local_rank=j, nic=node.nic) for i, node in enumerate(nodes) for j in range(node.ranks)]
    if len(ranks) != world_size:
        counts = "+".join(str(n.ranks) for n in nodes)
        raise ValueError(f"the cluster describes {counts} = {len(ranks)} processes but the world size is "
                         f"{world_size}")
    return ranks
