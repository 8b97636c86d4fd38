"""How long a collective takes on a cluster: bytes over the links each group actually uses.

Every group of one kind (all TP groups, all DP groups, ...) runs its collective at the same time,
so the groups share the nodes' links. A collective is turned into the bytes it puts on each
directed edge between two processes (ring algorithms for all-reduce, all-gather and
reduce-scatter over the group's members in order; one share per pair for all-to-all; each member
to the next for ring attention's exchange; one member to another, in every group at once, for a
pipeline's hop, `Links.hop`); the edges' bytes are summed per resource:

    intra     a process's port to the node's internal links (NVLink, shared memory), each
              direction, for edges inside the node
    out / in  a node's NIC, each direction, for edges leaving or entering it
    cross     a node's traffic to nodes of another NIC class (RDMA does not cross NIC types:
              it falls back to sockets, `cluster.cross_gbps`)

and the collective lasts as long as its busiest resource needs (ring steps pipeline, so every
edge is busy at once), plus one latency per algorithm step, plus — for a collective or a ring
exchange, not a pipeline's send — the library's fixed cost of a call (`LinkRates.call_s`: gloo's is near a
millisecond on a CPU, ten times a message's latency, and a layout running thousands of small
collectives pays it thousands of times). Libraries do not all run the ring:
`LinkRates.cost` scales a pattern's bytes by what the probe measured of it against an all-gather
(gloo's reduce-scatter moves an all-reduce's bytes, twice the ring's). Members are process ranks: the
Topology's groups after the NIC-aware placement, so what Holmes keeps inside a class costs what
that class costs.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from parallel.mesh import Topology
from parallel.strategies.holmes.placement import RankInfo


@dataclass(frozen=True)
class LinkRates:
    """Bytes per second of each link class, and the latency of one message."""

    intra_node: float
    nic: dict[str, float] = field(default_factory=dict)  # one node's link, per NIC class
    cross_class: float | None = None  # between classes; None = the slower class's NIC
    latency_s: float = 0.0
    # A pattern's measured time over its ring model's, relative to an all-gather's (probe.py's
    # collective_costs); patterns not named cost what the ring says.
    cost: dict[str, float] = field(default_factory=dict)
    call_s: float = 0.0  # a collective call's fixed cost beyond its messages' latency


# Patterns whose every call waits for the group: the collectives and context parallelism's ring
# exchange (a send and a receive posted together and waited on); a pipeline's sends do not wait.
CALLS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "ring_pass")


def _edges(groups: list[list[int]], pattern: str):
    """(src, dst, bytes per byte of the collective's buffer) of every group of a kind."""
    for g in groups:
        n = len(g)
        if n == 1:
            continue
        if pattern == "all_reduce":
            yield from ((g[i], g[(i + 1) % n], 2 * (n - 1) / n) for i in range(n))
        elif pattern in ("all_gather", "reduce_scatter"):
            yield from ((g[i], g[(i + 1) % n], (n - 1) / n) for i in range(n))
        elif pattern == "all_to_all":
            yield from ((a, b, 1 / n) for a in g for b in g if a != b)
        elif pattern == "ring_pass":  # every member sends its buffer to the next, once
            yield from ((g[i], g[(i + 1) % n], 1.0) for i in range(n))
        else:
            raise ValueError(f"unknown collective pattern {pattern!r}")


def pair_share(pattern: str) -> float:
    """Bytes one process of a pair sends per byte of the collective's buffer, in the ring model."""
    return sum(share for src, _, share in _edges([[0, 1]], pattern) if src == 0)


def _steps(n: int, pattern: str) -> int:
    return {"all_reduce": 2 * (n - 1), "all_gather": n - 1, "reduce_scatter": n - 1, "all_to_all": n - 1,
            "ring_pass": 1}[pattern] if n > 1 else 0


class Links:
    """Collective times for one placed topology on one cluster."""

    def __init__(self, topo: Topology, ranks: list[RankInfo], rates: LinkRates):
        self.topo, self.ranks, self.rates = topo, ranks, rates
        self._load: dict[tuple[str, str], dict] = {}

    def _nic(self, node_class: str) -> float:
        return self.rates.nic.get(node_class, min(self.rates.nic.values()))

    def _busiest(self, edges) -> float:
        """Seconds per byte of buffer on the busiest resource the (src, dst, share) edges load."""
        load: dict[tuple, float] = defaultdict(float)
        for src, dst, share in edges:
            a, b = self.ranks[src], self.ranks[dst]
            if a.node == b.node:  # each process's own port (NVLink/NVSwitch), each direction
                load[("intra-out", src)] += share / self.rates.intra_node
                load[("intra-in", dst)] += share / self.rates.intra_node
                continue
            load[("out", a.node)] += share / self._nic(a.nic)
            load[("in", b.node)] += share / self._nic(b.nic)
            if a.nic != b.nic:
                cross = self.rates.cross_class or min(self._nic(a.nic), self._nic(b.nic))
                load[("cross", a.node)] += share / cross
        return max(load.values(), default=0.0)

    def _resource_time(self, kind: str, pattern: str) -> float:
        """Seconds one byte of buffer costs on the busiest resource (cached per kind, pattern)."""
        key = (kind, pattern)
        if key not in self._load:
            self._load[key] = self._busiest(_edges(self.topo.groups(kind), pattern))
        return self._load[key]

    def hop(self, kind: str, src: int, dst: int, nbytes: float) -> float:
        """Seconds for member `src` of every group of `kind` to send `nbytes` to member `dst`, all
        groups at once: one hop of a pipeline (every data-parallel replica's pipeline crosses the
        same boundary in step), priced by the links that boundary uses — not the slowest hop's."""
        key = (kind, "hop", src, dst)
        if key not in self._load:
            self._load[key] = self._busiest((g[src], g[dst], 1.0) for g in self.topo.groups(kind))
        return nbytes * self._load[key] + self.rates.latency_s if nbytes else 0.0

    def time(self, kind: str, pattern: str, nbytes: float, calls: int = 1) -> float:
        """Seconds for every group of `kind` to run `pattern` on a buffer of `nbytes` per rank
        (the full buffer: an all-gather's output, a reduce-scatter's input), split over `calls`
        calls of the collective."""
        n = len(self.topo.groups(kind)[0])
        if n == 1 or nbytes == 0:
            return 0.0
        fixed = _steps(n, pattern) * self.rates.latency_s + (self.rates.call_s if pattern in CALLS else 0.0)
        return nbytes * self._resource_time(kind, pattern) * self.rates.cost.get(pattern, 1.0) + calls * fixed
