"""The validated parallel topology: sizes of every dimension and the rank groups they imply.

    python -m launch.layout world_size=8 parallel.dp=8
"""
from __future__ import annotations

from dataclasses import dataclass


class TopologyError(ValueError):
    """A set of sizes that cannot lay out the world; the message names every size involved."""


@dataclass(frozen=True)
class Topology:
    world_size: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1

    @classmethod
    def from_config(cls, parallel, world_size: int) -> "Topology":
        """Resolve dp=-1 and check that the sizes multiply to the world size."""
        sizes = {"tp": parallel.tp, "pp": parallel.pp, "cp": parallel.cp, "dp": parallel.dp}
        bad = [f"parallel.{k}={v}" for k, v in sizes.items() if v < 1 and not (k == "dp" and v == -1)]
        if bad:
            raise TopologyError(f"{', '.join(bad)}: sizes must be ≥ 1 (parallel.dp may be -1 = the rest)")
        if world_size < 1:
            raise TopologyError(f"world size {world_size} must be ≥ 1")
        model = parallel.tp * parallel.pp * parallel.cp
        dp = parallel.dp
        if dp == -1:
            if world_size % model:
                raise TopologyError(
                    f"world size {world_size} is not divisible by tp·pp·cp = {parallel.tp}·{parallel.pp}·"
                    f"{parallel.cp} = {model}, so parallel.dp=-1 has no value; use a world size that is a "
                    f"multiple of {model}")
            dp = world_size // model
        if model * dp != world_size:
            raise TopologyError(
                f"tp·pp·cp·dp = {parallel.tp}·{parallel.pp}·{parallel.cp}·{dp} = {model * dp} but the world "
                f"size is {world_size}; set sizes whose product is {world_size} (parallel.dp=-1 fills in dp)")
        return cls(world_size=world_size, tp=parallel.tp, pp=parallel.pp, cp=parallel.cp, dp=dp)

    def groups(self, name: str) -> list[list[int]]:
        """Every group of dimension `name` as a list of rank lists."""
        if name == "dp":
            return [list(range(self.world_size))]
        raise KeyError(f"no group {name!r} in this topology")
