"""Print the rank groups of a layout, by arithmetic alone: no process is started.

    python -m launch.layout world_size=8 parallel.tp=2 parallel.cp=2 parallel.ep=4 parallel.etp=1
    python -m launch.layout world_size=16 parallel.tp=2 parallel.pp=2 --table

Prints one JSON object: the sizes, the order, every group (a list of rank lists per name:
tp, cp, dp, pp, dp_cp, tp_cp, model, ep, etp, edp, tp_ep) and `coords`, each rank's position in
every dimension. `--table` prints a grid for humans instead. Bad input exits with code 2.
"""
from __future__ import annotations

import json
import sys

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from launch.config import compose
from launch.validate import ConfigError, validate_layout
from parallel.mesh import COORD_DIMS, GROUP_SPECS, Topology

EXIT_BAD_CONFIG = 2
USAGE = "usage: python -m launch.layout world_size=N [parallel.<key>=<value> ...] [--table]"


def layout_json(topo: Topology) -> dict:
    return {"world_size": topo.world_size, "order": topo.order, "sizes": topo.sizes(),
            **{name: topo.groups(name) for name in GROUP_SPECS}, "coords": topo.coords()}


def layout_table(topo: Topology) -> str:
    s = topo.sizes()
    lines = [f"world {topo.world_size}, order {topo.order}",
             f"  dense view:  tp={s['tp']} cp={s['cp']} dp={s['dp']} pp={s['pp']}",
             f"  expert view: etp={s['etp']} ep={s['ep']} edp={s['edp']} pp={s['pp']}", ""]
    header = "rank " + "".join(f"{d:>5}" for d in COORD_DIMS)
    lines += [header, "-" * len(header)]
    for rank, c in enumerate(topo.coords()):
        lines.append(f"{rank:>4} " + "".join(f"{c[d]:>5}" for d in COORD_DIMS))
    lines.append("")
    for name in GROUP_SPECS:
        groups = topo.groups(name)
        if len(groups[0]) > 1:
            lines.append(f"{name:>6}: " + " ".join("[" + ",".join(map(str, g)) + "]" for g in groups))
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
    except ConfigError as e:
        fail(str(e))
    except (HydraException, OmegaConfBaseException) as e:
        cause = f"\n{e.__cause__}" if e.__cause__ else ""
        fail(f"{e}{cause}")
    print(layout_table(topo) if table else json.dumps(layout_json(topo)))


if __name__ == "__main__":
    main()
