"""Print the rank groups of a layout, by arithmetic alone: no process is started.

    python -m launch.layout world_size=8 parallel.tp=2 parallel.cp=2 parallel.ep=4 parallel.etp=1
    python -m launch.layout world_size=16 parallel.tp=2 parallel.pp=2 --table
    python -m launch.layout world_size=8 cluster=mixed_4x2 parallel.tp=2 parallel.pp=2 --table

Prints one JSON object: the sizes, the order, every group (a list of rank lists per name:
tp, cp, dp, pp, dp_cp, tp_cp, model, ep, etp, edp, tp_ep) and `coords`, each rank's position in
every dimension. With a described cluster (`cluster=<name>`) the ranks are processes placed by
`parallel.placement` (Holmes by default): `placement` maps logical rank i to its process,
`processes` gives each process's node and NIC class, `transports` each group's transport, and
`warnings` names any group that mixes NIC classes or spans nodes. `--table` prints a grid for
humans instead. Bad input exits with code 2.
"""
from __future__ import annotations

import json
import sys

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from launch.config import compose
from launch.validate import ConfigError, validate_layout
from parallel.mesh import COORD_DIMS, GROUP_SPECS, LAYOUT_GROUPS, Topology
from parallel.strategies.holmes.network import place
from parallel.strategies.holmes.placement import RankInfo, described_ranks, placement_warnings
from parallel.strategies.holmes.transport import group_transport

EXIT_BAD_CONFIG = 2
USAGE = "usage: python -m launch.layout world_size=N [parallel.<key>=<value> ...] [--table]"


def layout_json(topo: Topology, procs: list[RankInfo] | None = None, classes=None) -> dict:
    out = {"world_size": topo.world_size, "order": topo.order, "sizes": topo.sizes(),
           **{name: topo.groups(name) for name in GROUP_SPECS}, "coords": topo.coords()}
    if procs is not None:
        nics = [p.nic for p in procs]
        out |= {"placement": list(topo.placement or range(topo.world_size)),
                "processes": [{"node": p.node, "nic": p.nic} for p in procs],
                "transports": {name: [group_transport([nics[r] for r in g], classes, "nccl").describe()
                                      for g in topo.groups(name)] for name in LAYOUT_GROUPS},
                "warnings": placement_warnings(topo, procs)}
    return out


def layout_table(topo: Topology, procs: list[RankInfo] | None = None) -> str:
    s = topo.sizes()
    lines = [f"world {topo.world_size}, order {topo.order}",
             f"  dense view:  tp={s['tp']} cp={s['cp']} dp={s['dp']} pp={s['pp']}",
             f"  expert view: etp={s['etp']} ep={s['ep']} edp={s['edp']} pp={s['pp']}", ""]
    header = "rank " + "".join(f"{d:>5}" for d in COORD_DIMS) + ("   node nic" if procs else "")
    lines += [header, "-" * len(header)]
    for rank, c in enumerate(topo.coords()):
        where = f"   {procs[rank].node:>4} {procs[rank].nic}" if procs else ""
        lines.append(f"{rank:>4} " + "".join(f"{c[d]:>5}" for d in COORD_DIMS) + where)
    lines.append("")
    for name in GROUP_SPECS:
        groups = topo.groups(name)
        if len(groups[0]) > 1:
            lines.append(f"{name:>6}: " + " ".join("[" + ",".join(map(str, g)) + "]" for g in groups))
    if procs:
        lines += ["", f"placement: logical rank i -> process {list(topo.placement or range(topo.world_size))}"]
        lines += [f"warning: {w}" for w in placement_warnings(topo, procs)]
    return "\n".join(lines)


def fail(message: str) -> None:
    print(f"quintet: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_CONFIG)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    table = "--table" in argv
    args = [a for a in argv if a != "--table"]
    sizes = [a for a in args if a.startswith("world_size=")]
    if len(sizes) != 1:
        fail(f"give the world size once as world_size=N\n{USAGE}")
    try:
        world_size = int(sizes[0].split("=", 1)[1])
    except ValueError:
        fail(f"{sizes[0]} is not an integer\n{USAGE}")
    overrides = [a for a in args if not a.startswith("world_size=")]
    try:
        cfg = compose([*overrides, "run_dir=unused"])
        topo = validate_layout(cfg, world_size)
        procs = described_ranks(cfg.cluster.nodes, world_size) if cfg.cluster.nodes else None
        if procs is not None:
            topo = place(topo, procs, cfg.cluster, cfg.parallel.placement)
    except ConfigError as e:
        fail(str(e))
    except (HydraException, OmegaConfBaseException) as e:
        cause = f"\n{e.__cause__}" if e.__cause__ else ""
        fail(f"{e}{cause}")
    print(layout_table(topo, procs) if table else json.dumps(layout_json(topo, procs, cfg.cluster.classes)))


if __name__ == "__main__":
    main()
