"""Process groups built in 8 real processes: each proven by a collective, and equal to
megatron-core's own groups when its parallel_state is initialised through the bridge."""
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from parallel.groups import build_groups
from parallel.mesh import GROUP_SPECS, Topology
from launch.spawn import run_ranks

LAYOUTS = {
    "tp2-cp2-dp2": dict(tp=2, cp=2),
    "tp2-pp2-dp2": dict(tp=2, pp=2),
    "tp2-dp4-ep4-etp1": dict(tp=2, ep=4, etp=1),  # EP folded over TP and DP
    "pp2-ep4-etp1": dict(pp=2, ep=4, etp=1),
}


def topology(**sizes):
    cfg = SimpleNamespace(**{"tp": 1, "cp": 1, "pp": 1, "ep": 1, "etp": -1, "dp": -1,
                             "order": "tp-cp-ep-dp-pp", **sizes})
    return Topology.from_config(cfg, 8)


def _prove_groups(rank, world_size, sizes):
    from parallel.megatron_bridge import init_megatron_parallel_state, megatron_group_differences

    topo = topology(**sizes)
    groups = build_groups(topo, "cpu", timeout_s=30)
    proven = {}
    for name in GROUP_SPECS:
        expected = topo.group_of(name, rank)
        assert groups.ranks[name] == expected
        t = torch.tensor([float(rank)])
        if groups[name] is not None:
            dist.all_reduce(t, group=groups[name])
            assert dist.get_process_group_ranks(groups[name]) == expected
            mesh = groups.device_mesh(name)  # the DeviceMesh view wraps the same group
            assert mesh.mesh.tolist() == expected and mesh.get_group() is groups[name]
        assert t.item() == sum(expected), (name, t.item(), expected)
        proven[name] = t.item()
    init_megatron_parallel_state(topo, timeout_minutes=1)  # raises if any group differs
    assert megatron_group_differences(topo, rank) == {}
    return proven


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_groups_proven_by_collectives_and_equal_to_megatron_core(layout):
    sizes = LAYOUTS[layout]
    results = run_ranks(_prove_groups, 8, args=(sizes,), timeout_s=120)
    topo = topology(**sizes)
    for rank, proven in enumerate(results):
        assert proven == {name: float(sum(topo.group_of(name, rank))) for name in GROUP_SPECS}
