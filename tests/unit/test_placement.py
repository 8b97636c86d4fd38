"""Holmes placement over many generated clusters and layouts: a permutation of the processes, TP
inside a node, DP/CP/EDP (and so everything but PP) inside one NIC class whenever the class sizes
allow it, warnings naming the groups otherwise; the transport rule per group; NIC detection;
the speed-proportional pipeline partition."""
import os
import random

import pytest
import torch
from omegaconf import OmegaConf

from launch.config import compose
from launch.env import nic_class
from parallel.mesh import Topology
from parallel.strategies.holmes.network import layer_costs
from parallel.strategies.holmes.partition import LayerCosts, balance, rank_times, reduction_factor
from parallel.strategies.holmes.placement import RankInfo, described_ranks, holmes_placement, placement_warnings
from parallel.strategies.holmes.transport import group_transport, transport_env
from runtime.model import ModelArgs, Transformer

SPEED = {"ib": 0, "roce": 1, "ethernet": 2}
CLASSES = compose(["run_dir=/tmp/unused"]).cluster.classes
NON_PP = ("tp", "cp", "dp", "dp_cp", "tp_cp", "ep", "etp", "edp", "tp_ep")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def generated_cases(count: int, seed: int = 0):
    """(topology, processes) pairs: random node counts, ranks per node, NIC classes, process
    numbering (node by node, or round-robin as Slurm's cyclic distribution), and layouts."""
    rng = random.Random(seed)
    cases = []
    while len(cases) < count:
        per_node = rng.choice([1, 2, 4, 8])
        nodes = rng.choice([1, 2, 3, 4, 6, 8])
        world = per_node * nodes
        nics = [rng.choice(["ib", "roce", "ethernet"]) for _ in range(nodes)]
        slots = [(n, j) for n in range(nodes) for j in range(per_node)]
        if rng.random() < 0.3:  # cyclic: process p on node p % nodes
            slots = [(p % nodes, p // nodes) for p in range(world)]
        procs = [RankInfo(node=n, local_rank=j, nic=nics[n]) for n, j in slots]
        tp = rng.choice([d for d in divisors(world) if d <= per_node] or [1])
        pp = rng.choice(divisors(world // tp))
        cp = rng.choice(divisors(world // (tp * pp)))
        dp = world // (tp * pp * cp)
        stage = tp * cp * dp
        etp = rng.choice(divisors(stage))
        ep = rng.choice(divisors(stage // etp))
        topo = Topology(world_size=world, tp=tp, cp=cp, dp=dp, pp=pp, ep=ep, etp=etp)
        topo.check()
        cases.append((topo, procs))
    return cases


@pytest.mark.parametrize("seed", range(4))
def test_generated_clusters(seed):
    for logical, procs in generated_cases(100, seed):
        check_placement(logical, procs)


def check_placement(logical: Topology, procs: list[RankInfo]) -> None:
    topo = holmes_placement(logical, procs, SPEED)
    world = topo.world_size
    assert sorted(topo.placement) == list(range(world)), "the placement is not a permutation"
    # Same groups up to renaming the ranks: the layout is unchanged, only where it runs.
    for name in ("tp", "dp", "pp", "ep", "edp"):
        renamed = [[topo.placement[r] for r in g] for g in logical.groups(name)]
        assert renamed == topo.groups(name)
    per_node = world // len({p.node for p in procs})
    if per_node % topo.tp == 0:
        for g in topo.groups("tp"):
            assert len({procs[r].node for r in g}) == 1, f"tp group {g} crosses nodes"
    stage = world // topo.pp
    counts = [sum(p.nic == nic for p in procs) for nic in {p.nic for p in procs}]
    warnings = placement_warnings(topo, procs)
    if all(c % stage == 0 for c in counts) and per_node % topo.tp == 0 and per_node % topo.etp == 0:
        for name in NON_PP:
            for g in topo.groups(name):
                assert len({procs[r].nic for r in g}) == 1, f"{name} group {g} crosses NIC classes"
        assert warnings == []
    mixed = [g for name in ("dp", "dp_cp", "edp") for g in topo.groups(name) if len({procs[r].nic for r in g}) > 1]
    for g in mixed:  # every group that cannot be kept homogeneous is named
        assert any(str(g) in w for w in warnings), (g, warnings)


def test_holmes_beats_megatron_order_on_an_interleaved_cluster():
    procs = described_ranks(compose(["cluster=mixed_4x2", "run_dir=/tmp/u"]).cluster.nodes, 8)
    logical = Topology(world_size=8, tp=2, dp=2, pp=2)
    assert len(placement_warnings(logical, procs)) > 1  # Megatron's order mixes every DP group
    topo = holmes_placement(logical, procs, SPEED)
    assert placement_warnings(topo, procs) == []
    assert topo.groups("pp") == [[0, 2], [1, 3], [4, 6], [5, 7]]  # ib stage 0, ethernet stage 1
    assert {procs[r].nic for g in topo.groups("pp") for r in g[:1]} == {"ib"}  # fastest class first


def test_homogeneous_node_by_node_is_the_identity():
    for world, per_node in ((8, 2), (16, 8), (4, 4)):
        procs = [RankInfo(p // per_node, p % per_node, "ib") for p in range(world)]
        topo = holmes_placement(Topology(world_size=world, tp=2, pp=2, dp=world // 4), procs, SPEED)
        assert topo.placement == tuple(range(world))


def test_transport_follows_the_class_rule():
    for nic, net in (("ib", "IB"), ("roce", "IB"), ("ethernet", "Socket")):
        t = group_transport([nic, nic], CLASSES, "nccl")
        assert (t.nic, t.nccl_net, t.env["NCCL_NET"]) == (nic, net, net)
        assert ("NCCL_IB_DISABLE" in t.env) == (net == "Socket")
    assert group_transport(["roce"], CLASSES, "nccl").env["NCCL_IB_GID_INDEX"] == "3"
    mixed = group_transport(["ib", "roce"], CLASSES, "nccl")
    assert (mixed.nic, mixed.env) == ("mixed", {"NCCL_NET": "Socket", "NCCL_IB_DISABLE": "1"})
    # gloo: the class's interface when the cluster names one, nothing for mixed groups.
    classes = OmegaConf.merge(CLASSES, {"ib": {"gloo_ifname": "ib0"}})
    assert group_transport(["ib", "ib"], classes, "gloo").env == {"GLOO_SOCKET_IFNAME": "ib0"}
    assert group_transport(["ib", "ethernet"], classes, "gloo").env == {}
    with pytest.raises(ValueError, match="'opa' is not described"):
        group_transport(["opa"], CLASSES, "nccl")


def test_transport_env_is_restored(monkeypatch):
    monkeypatch.setenv("NCCL_NET", "IB")
    monkeypatch.delenv("NCCL_IB_DISABLE", raising=False)
    with transport_env(group_transport(["ib", "ethernet"], CLASSES, "nccl")):
        assert os.environ["NCCL_NET"] == "Socket" and os.environ["NCCL_IB_DISABLE"] == "1"
    assert os.environ["NCCL_NET"] == "IB" and "NCCL_IB_DISABLE" not in os.environ


def test_nic_class_detection(tmp_path):
    assert nic_class({}, str(tmp_path / "none")) == "ethernet"
    for layer, expected in (("InfiniBand", "ib"), ("Ethernet", "roce")):
        port = tmp_path / layer / "mlx5_0/ports/1"
        port.mkdir(parents=True)
        (port / "link_layer").write_text(layer + "\n")
        assert nic_class({}, str(tmp_path / layer)) == expected
    assert nic_class({"QUINTET_NIC_CLASS": "roce"}, str(tmp_path / "InfiniBand")) == "roce"


def test_balance_gives_faster_ranks_more_layers():
    def same(n, rates):  # every layer costs the same on a rank
        return [[r] * n for r in rates]
    assert balance(2, 1, same(8, [1.0, 1.0]), [0.0, 0.0]) == [4, 4]
    assert balance(2, 1, same(8, [1.0, 3.0]), [0.0, 0.0]) == [6, 2]
    assert balance(2, 2, same(12, [1.0, 2.0]), [0.0, 0.0]) == [4, 2, 4, 2]  # rank 0: 8 layers over 2 chunks
    assert balance(2, 1, same(8, [1.0, 1.0]), [0.0, 2.0]) == [5, 3]  # the head's fixed cost on the last stage
    assert sum(balance(4, 1, same(31, [1.0, 1.3, 2.0, 0.7]), [0.5, 0, 0, 1.0])) == 31
    with pytest.raises(ValueError, match="fewer than the pp·vpp = 4"):
        balance(2, 2, same(3, [1.0, 1.0]), [0.0, 0.0])


def test_balance_weighs_each_layer():
    """Three cheap dense layers then expensive ones (DeepSeek-V3's shape): the first stage takes
    the cheap ones and more layers than the others, and the slowest stage is as fast as any
    split of consecutive layers allows (9: no stage of MoE layers can hold fewer than 3 of 3)."""
    layers = [1.0] * 3 + [3.0] * 9
    counts = balance(4, 1, [layers] * 4, [0.0] * 4)
    starts = [sum(counts[:s]) for s in range(4)]
    times = [sum(layers[a:a + n]) for a, n in zip(starts, counts)]
    assert sum(counts) == 12 and min(counts) >= 1 and max(times) == 9.0 and counts[0] > counts[1]
    assert balance(2, 1, [[1.0, 1.0, 1.0, 5.0]] * 2, [0.0, 0.0]) == [3, 1]
    assert balance(2, 1, [[1.0, 1.0, 1.0, 5.0]] * 2, [0.0, 3.0]) == [3, 1]  # the head cannot move


def test_gradient_traffic_makes_the_slow_class_stage_shorter():
    with torch.device("meta"):
        model = Transformer(ModelArgs(n_layers=8, dim=256, n_heads=8, n_kv_heads=4, ffn_dim=688, vocab_size=256))
    costs = layer_costs(model, Topology(world_size=8, tp=2, dp=2, pp=2), 8 * 64, 4)
    assert isinstance(costs, LayerCosts) and costs.layer_grad_bytes[0] == pytest.approx(
        sum(p.numel() for p in model.layers["0"].parameters()) / 2 * 4)
    factor = reduction_factor(2, "fsdp", True)
    assert factor == pytest.approx(1.5) and reduction_factor(1, "fsdp", True) == 0.0
    fast, slow = 200e9 / 8, 0.1e9 / 8
    per_layer, fixed = rank_times(costs, 2, [1e11, 1e11], [fast, slow], factor)
    counts = balance(2, 1, per_layer, fixed)
    assert counts[0] > counts[1] >= 1
