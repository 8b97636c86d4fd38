"""The validated 5D topology: sizes of every dimension and the rank groups they imply.

Ranks are laid out as in Megatron-Core. The order string lists dimensions fastest-varying
first (default `tp-cp-ep-dp-pp`: neighbouring ranks share a TP group). Two views cover the same
ranks (docs/architecture.md, "The five dimensions"; "MoE parallel folding"):

    dense  (attention, dense MLP):  TP × CP × DP × PP      (ep = 1 in this view)
    expert (MoE layers):            ETP × EP × EDP × PP    (cp = 1; etp in tp's slot, edp in dp's)

with EDP = world / (ETP·EP·PP). Both views must give the same PP groups. In a view, rank r has
coordinate (r // stride_d) % size_d in dimension d, strides growing along the order; the group of
a set of dimensions holds the ranks that share every other coordinate, listed with the earliest
dimension in the order varying fastest. Everything is arithmetic: no process is needed.

    python -m launch.layout world_size=8 parallel.tp=2 parallel.cp=2 parallel.ep=4 parallel.etp=1 --table
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

DIMS = ("tp", "cp", "ep", "dp", "pp")
DEFAULT_ORDER = "tp-cp-ep-dp-pp"

# Every group the runtime uses: name -> (view, dimensions of that view it spans).
GROUP_SPECS: dict[str, tuple[str, tuple[str, ...]]] = {
    "tp": ("dense", ("tp",)),
    "cp": ("dense", ("cp",)),
    "dp": ("dense", ("dp",)),
    "pp": ("dense", ("pp",)),
    "dp_cp": ("dense", ("dp", "cp")),  # dense gradient reduction
    "tp_cp": ("dense", ("tp", "cp")),
    "model": ("dense", ("tp", "pp")),
    "ep": ("expert", ("ep",)),
    "etp": ("expert", ("tp",)),
    "edp": ("expert", ("dp",)),  # expert gradient reduction
    "tp_ep": ("expert", ("tp", "ep")),
}
# Hybrid sharding (HSDP) splits each dp_cp group into `dp_replicate` replicas of a sharded group:
# shards are runs of neighbouring members, replicas are strided.
HSDP_GROUPS = ("dp_shard", "dp_replicate")
# The groups `launch.layout` prints, and the coordinates it reports.
LAYOUT_GROUPS = ("tp", "cp", "dp", "pp", "dp_cp", "ep", "etp", "edp")
COORD_DIMS = ("tp", "cp", "dp", "pp", "ep", "etp", "edp")


class TopologyError(ValueError):
    """Sizes that cannot lay out the world; the message names every size involved."""


def parse_order(order: str) -> tuple[str, ...]:
    tokens = tuple(t.strip() for t in order.lower().split("-"))
    unknown = [t for t in tokens if t not in DIMS]
    if unknown:
        raise TopologyError(f"parallel.order={order!r} has unknown dimension(s) {unknown}; "
                            f"use the names {', '.join(DIMS)} joined by '-', e.g. {DEFAULT_ORDER!r}")
    repeated = sorted({t for t in tokens if tokens.count(t) > 1})
    if repeated:
        raise TopologyError(f"parallel.order={order!r} repeats {repeated}; name each dimension once")
    return tokens


def rank_groups(sizes: dict[str, int], order: tuple[str, ...], dims: tuple[str, ...]) -> list[list[int]]:
    """Groups over `dims` of a world laid out with `sizes` in `order` (fastest first).

    A C-ordered array of shape (size of the slowest dim, ..., size of the fastest) holds rank
    r at its coordinates. Moving the group's axes last, in the same relative order, and
    flattening them gives one group per row: rows ordered by the other coordinates, members by
    theirs, the earliest dimension of the order varying fastest in both — Megatron's ordering.
    """
    axes = list(reversed(order))  # array axis i is dimension axes[i]
    world = int(np.prod([sizes[d] for d in order]))
    grid = np.arange(world).reshape([sizes[d] for d in axes])
    outer = [i for i, d in enumerate(axes) if d not in dims]
    inner = [i for i, d in enumerate(axes) if d in dims]
    group_size = int(np.prod([sizes[axes[i]] for i in inner])) if inner else 1
    return grid.transpose(outer + inner).reshape(-1, group_size).tolist()


@dataclass(frozen=True)
class Topology:
    world_size: int
    tp: int = 1
    cp: int = 1
    ep: int = 1
    dp: int = 1
    pp: int = 1
    etp: int = 1
    order: str = DEFAULT_ORDER
    dp_replicate: int = 1
    # Logical rank i (its 5D coordinates) runs on process placement[i]; None = the identity.
    # Groups are listed in physical ranks, members still in logical order (parallel/strategies/holmes/placement.py).
    placement: tuple[int, ...] | None = None

    @property
    def edp(self) -> int:
        return self.world_size // (self.etp * self.ep * self.pp)

    @classmethod
    def from_config(cls, parallel, world_size: int) -> "Topology":
        """Resolve dp=-1 and etp=-1 and check every rule; TopologyError names the sizes."""
        sizes = {k: getattr(parallel, k) for k in ("tp", "cp", "ep", "etp", "pp", "dp")}
        bad = [f"parallel.{k}={v}" for k, v in sizes.items() if v < 1 and not (k in ("dp", "etp") and v == -1)]
        if bad:
            raise TopologyError(f"{', '.join(bad)}: sizes must be ≥ 1 (parallel.dp and parallel.etp "
                                "may be -1: the rest of the world, and the same as tp)")
        if world_size < 1:
            raise TopologyError(f"world size {world_size} must be ≥ 1")
        tp, cp, ep, pp = sizes["tp"], sizes["cp"], sizes["ep"], sizes["pp"]
        etp = tp if sizes["etp"] == -1 else sizes["etp"]
        model = tp * cp * pp
        dp = sizes["dp"]
        if dp == -1:
            if world_size % model:
                raise TopologyError(
                    f"world size {world_size} is not divisible by tp·cp·pp = {tp}·{cp}·{pp} = {model}, so "
                    f"parallel.dp=-1 has no value; use a world size that is a multiple of {model}")
            dp = world_size // model
        if model * dp != world_size:
            raise TopologyError(
                f"tp·cp·dp·pp = {tp}·{cp}·{dp}·{pp} = {model * dp} but the world size is {world_size}; "
                f"set sizes whose product is {world_size} (parallel.dp=-1 fills in dp)")
        stage = tp * cp * dp
        if stage % (etp * ep):
            raise TopologyError(
                f"etp·ep = {etp}·{ep} = {etp * ep} does not divide the ranks of a pipeline stage, "
                f"tp·cp·dp = {tp}·{cp}·{dp} = {stage}; the expert view ETP×EP×EDP must fill the same "
                f"ranks as TP×CP×DP (choose etp·ep among the divisors of {stage})")
        replicas = getattr(parallel, "dp_replicate", 1)
        if replicas < 1 or (dp * cp) % replicas:
            raise TopologyError(
                f"parallel.dp_replicate={replicas} must divide the data-parallel ranks dp·cp = {dp}·{cp} = "
                f"{dp * cp} (HSDP: dp_replicate replicas of a group sharded over dp·cp/dp_replicate ranks)")
        topo = cls(world_size=world_size, tp=tp, cp=cp, ep=ep, dp=dp, pp=pp, etp=etp,
                   order="-".join(parse_order(parallel.order)), dp_replicate=replicas)
        topo.check()
        return topo

    # --- the two views -----------------------------------------------------------------------

    def _view(self, name: str) -> tuple[dict[str, int], tuple[str, ...]]:
        if name == "dense":
            sizes = {"tp": self.tp, "cp": self.cp, "ep": 1, "dp": self.dp, "pp": self.pp}
        else:
            sizes = {"tp": self.etp, "cp": 1, "ep": self.ep, "dp": self.edp, "pp": self.pp}
        order = parse_order(self.order)
        missing = tuple(d for d in DIMS if d not in order)
        # Dimensions left out of the order are appended (as Megatron does): they must be 1.
        labels = {"tp": "etp", "dp": "edp"} if name == "expert" else {}
        too_big = [f"{labels.get(d, d)}={sizes[d]}" for d in missing if sizes[d] != 1]
        if too_big:
            raise TopologyError(f"parallel.order={self.order!r} leaves out {', '.join(too_big)} (the {name} "
                                f"view); every dimension of size > 1 must appear in the order")
        return sizes, order + missing

    def check(self) -> None:
        """Rules that need both views: the same PP groups (so stages hold the same ranks)."""
        dense, expert = self._view("dense"), self._view("expert")
        order = dense[1]
        if order[-1] != "pp" and self.pp > 1 and self.edp != self.dp:
            raise TopologyError(
                f"parallel.order={self.order!r} does not end with pp, which needs edp = dp so that both "
                f"views keep the same pipeline groups, but edp = world/(etp·ep·pp) = {self.world_size}/"
                f"({self.etp}·{self.ep}·{self.pp}) = {self.edp} and dp = {self.dp}; put pp last or make "
                f"etp·ep = tp·cp")
        if rank_groups(*dense, ("pp",)) != rank_groups(*expert, ("pp",)):
            raise TopologyError(
                f"the dense view (tp={self.tp}, cp={self.cp}, dp={self.dp}, pp={self.pp}) and the expert view "
                f"(etp={self.etp}, ep={self.ep}, edp={self.edp}, pp={self.pp}) give different pipeline groups "
                f"under parallel.order={self.order!r}; pipeline stages must hold the same ranks in both")

    # --- groups and coordinates ----------------------------------------------------------------

    def groups(self, name: str) -> list[list[int]]:
        """Every group of `name` (see GROUP_SPECS) as a list of rank lists."""
        return self._all_groups[name]

    @cached_property
    def _all_groups(self) -> dict[str, list[list[int]]]:
        views = {v: self._view(v) for v in ("dense", "expert")}
        groups = {name: rank_groups(*views[view], dims) for name, (view, dims) in GROUP_SPECS.items()}
        shard = len(groups["dp_cp"][0]) // self.dp_replicate
        groups["dp_shard"] = [g[i:i + shard] for g in groups["dp_cp"] for i in range(0, len(g), shard)]
        groups["dp_replicate"] = [g[j::shard] for g in groups["dp_cp"] for j in range(shard)]
        if self.placement is not None:
            where = self.placement
            groups = {name: [[where[r] for r in g] for g in gs] for name, gs in groups.items()}
        return groups

    def group_of(self, name: str, rank: int) -> list[int]:
        for ranks in self.groups(name):
            if rank in ranks:
                return ranks
        raise ValueError(f"rank {rank} is outside a world of {self.world_size}")

    def coords(self) -> list[dict[str, int]]:
        """For each process rank, its position in every dimension (its index within that group)."""
        out = [dict.fromkeys(COORD_DIMS, 0) for _ in range(self.world_size)]
        for dim in COORD_DIMS:
            for ranks in self.groups(dim):
                for index, rank in enumerate(ranks):
                    out[rank][dim] = index
        return out

    def sizes(self) -> dict[str, int]:
        return {"world": self.world_size, "tp": self.tp, "cp": self.cp, "dp": self.dp, "pp": self.pp,
                "ep": self.ep, "etp": self.etp, "edp": self.edp, "dp_replicate": self.dp_replicate}
