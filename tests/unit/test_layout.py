"""Rank layout by arithmetic: megatron-core's RankGenerator is the oracle (no processes)."""
import itertools
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
from megatron.core.parallel_state import RankGenerator

from launch.layout import layout_json, main as layout_main
from parallel.mesh import GROUP_SPECS, Topology, TopologyError
from launch.spawn import scaled

# quintet group name -> (megatron generator, megatron token)
MEGATRON_TOKENS = {
    "tp": ("dense", "tp"), "cp": ("dense", "cp"), "dp": ("dense", "dp"), "pp": ("dense", "pp"),
    "dp_cp": ("dense", "dp-cp"), "tp_cp": ("dense", "tp-cp"), "model": ("dense", "tp-pp"),
    "ep": ("expert", "ep"), "etp": ("expert", "tp"), "edp": ("expert", "dp"), "tp_ep": ("expert", "tp-ep"),
}
ORDERS = ["tp-cp-ep-dp-pp", "tp-cp-ep-pp-dp", "tp-pp-cp-ep-dp", "cp-tp-ep-dp-pp"]


def topology(world, tp=1, cp=1, pp=1, ep=1, etp=-1, order="tp-cp-ep-dp-pp", dp=-1):
    cfg = SimpleNamespace(tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, dp=dp, order=order)
    return Topology.from_config(cfg, world)


def megatron_groups(t: Topology) -> dict:
    """What megatron-core's initialize_model_parallel builds, from its own RankGenerator."""
    dense = RankGenerator(tp=t.tp, ep=1, dp=t.dp, pp=t.pp, cp=t.cp, order=t.order)
    expert = RankGenerator(tp=t.etp, ep=t.ep, dp=t.edp, pp=t.pp, cp=1, order=t.order)
    gens = {"dense": dense, "expert": expert}
    return {name: gens[g].get_ranks(token) for name, (g, token) in MEGATRON_TOKENS.items()}


def configurations():
    """Every valid layout over a grid of sizes, world sizes 1 to 64, four orders."""
    found = []
    for world in (1, 2, 4, 6, 8, 12, 16, 24, 32, 64):
        for tp, cp, pp, ep, etp, order in itertools.product((1, 2, 4), (1, 2), (1, 2), (1, 2, 4),
                                                            (-1, 1), ORDERS):
            try:
                found.append(topology(world, tp, cp, pp, ep, etp, order))
            except TopologyError:
                pass
    return sorted(set(found), key=lambda t: (t.world_size, t.order, t.tp, t.cp, t.pp, t.ep, t.etp))


CONFIGS = configurations()


def test_the_configurations_cover_the_interesting_cases():
    assert len(CONFIGS) >= 40
    assert {t.world_size for t in CONFIGS} >= {1, 2, 4, 8, 16, 32, 64}
    assert any(t.ep > 1 and t.etp == 1 and t.tp > 1 for t in CONFIGS)  # EP folded over TP
    assert any(t.ep > 1 and t.cp > 1 for t in CONFIGS)  # EP folded over CP
    assert any(t.etp != t.tp for t in CONFIGS) and any(t.ep == 1 for t in CONFIGS)
    assert any(t.pp > 1 and t.ep > 1 for t in CONFIGS)
    assert len({t.order for t in CONFIGS} - {"tp-cp-ep-dp-pp"}) >= 2


def test_groups_equal_megatron_core():
    """Same groups, same order within each, for every configuration."""
    differ = []
    for topo in CONFIGS:
        ours = {name: topo.groups(name) for name in GROUP_SPECS}
        theirs = megatron_groups(topo)
        differ += [f"{topo}: {name}" for name in GROUP_SPECS if ours[name] != theirs[name]]
    assert not differ, differ


def test_rules_megatron_enforces_are_ours_too():
    # Not pp-last with pp > 1 needs edp == dp (megatron asserts the same).
    with pytest.raises(TopologyError, match="does not end with pp, which needs edp = dp"):
        topology(8, tp=2, pp=2, ep=4, etp=1, order="tp-cp-ep-pp-dp")
    with pytest.raises(TopologyError, match=r"leaves out ep=2 \(the expert view\)"):
        topology(4, ep=2, order="tp-cp-dp-pp")
    with pytest.raises(TopologyError, match=r"repeats \['tp'\]"):
        topology(4, order="tp-tp-dp-pp")
    with pytest.raises(TopologyError, match="etp·ep = 1·3 = 3 does not divide the ranks of a pipeline stage, tp·cp·dp = 2·1·2 = 4"):
        topology(8, tp=2, pp=2, ep=3, etp=1)
    with pytest.raises(TopologyError, match="tp·cp·dp·pp = 2·2·3·1 = 12 but the world size is 8"):
        topology(8, tp=2, cp=2, dp=3)


def test_coordinates_are_positions_within_each_group():
    topo = topology(16, tp=2, cp=2, pp=2, ep=4, etp=1)
    coords = topo.coords()
    for rank in range(16):
        for dim in ("tp", "cp", "dp", "pp", "ep", "etp", "edp"):
            assert topo.group_of(dim, rank)[coords[rank][dim]] == rank
    # Megatron's default order: TP neighbours, PP slowest.
    assert [coords[r]["tp"] for r in range(4)] == [0, 1, 0, 1] and coords[8]["pp"] == 1


def test_a_1024_rank_layout_covers_every_rank_once():
    topo = topology(1024, tp=8, cp=2, pp=4, ep=8, etp=1)
    layout_json(topo)
    assert sorted(r for g in topo.groups("edp") for r in g) == list(range(1024))


def test_layout_prints_one_json_object(capsys):
    layout_main(["world_size=8", "parallel.tp=2", "parallel.cp=2", "parallel.ep=4", "parallel.etp=1"])
    out = json.loads(capsys.readouterr().out)
    assert out["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert out["ep"] == [[0, 1, 2, 3], [4, 5, 6, 7]] == out["tp_cp"]  # EP folded over TP×CP
    assert out["dp_cp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert set(out) >= {"tp", "cp", "dp", "pp", "dp_cp", "ep", "etp", "edp", "coords"}
    assert out["coords"][5] == {"tp": 1, "cp": 0, "dp": 1, "pp": 0, "ep": 1, "etp": 0, "edp": 1}


def test_layout_table_is_readable(capsys):
    layout_main(["world_size=4", "parallel.tp=2", "--table"])
    text = capsys.readouterr().out
    assert "dense view:  tp=2 cp=1 dp=2 pp=1" in text and "tp: [0,1] [2,3]" in text


LAYOUT_BAD = [
    (["world_size=8", "parallel.tp=3"], "world size 8 is not divisible by tp·cp·pp = 3·1·1 = 3"),
    (["world_size=8", "parallel.tp=2", "parallel.dp=2"], "tp·cp·dp·pp = 2·1·2·1 = 4 but the world size is 8"),
    (["world_size=8", "parallel.ep=3"], "etp·ep = 1·3 = 3 does not divide"),
    (["world_size=4", "parallel.tp=4", "model.dim=384", "model.n_heads=12", "model.n_kv_heads=6"],
     "model.n_kv_heads=6 and parallel.tp=4: KV heads are split over TP ranks when tp divides them"),
    (["world_size=6", "parallel.tp=3"], "model.n_heads=8 is not divisible by parallel.tp=3"),
    (["world_size=8", "parallel.order=tp-cp-xx-dp-pp"], "unknown dimension(s) ['xx']"),
    (["world_size=8", "parallel.order=tp-cp-ep-dp-dp"], "repeats ['dp']"),
    (["world_size=8", "parallel.pp=2", "parallel.ep=4", "parallel.order=tp-cp-ep-pp-dp"], "does not end with pp"),
    (["world_size=eight"], "world_size=eight is not an integer"),
    (["world_size=8", "parallel.tp=two"], "could not be converted to Integer"),
]


@pytest.mark.parametrize("argv, fragment", LAYOUT_BAD)
def test_layout_rejects_bad_input_with_exit_code_2(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        layout_main(argv)
    assert exit_info.value.code == 2
    assert fragment in capsys.readouterr().err


def test_layout_command_line():
    proc = subprocess.run([sys.executable, "-m", "launch.layout", "world_size=4", "parallel.pp=2"],
                          capture_output=True, text=True, timeout=scaled(60))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["pp"] == [[0, 2], [1, 3]]
    proc = subprocess.run([sys.executable, "-m", "launch.layout", "world_size=4", "parallel.pp=3"],
                          capture_output=True, text=True, timeout=scaled(60))
    assert proc.returncode == 2 and "quintet: invalid configuration" in proc.stderr
