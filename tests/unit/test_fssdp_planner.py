"""FSSDP's placement decisions (pure functions of the loads)."""
import random

from parallel.strategies.fssdp import planner


def test_window_averages_the_last_steps():
    w = planner.LoadWindow(2, size=3)
    assert w.average() == [0.0, 0.0]
    for loads in ([1, 0], [2, 0], [3, 0], [4, 6]):
        w.add(loads)
    assert w.average() == [3.0, 2.0]  # steps 2-4


def test_even_ownership_and_every_expert_owned_once():
    assert planner.even_ownership(8, 4) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert planner.even_ownership(3, 4) == [0, 1, 2]  # a device may own nothing


def test_hot_experts_within_budget_are_replicated_everywhere():
    owners = planner.even_ownership(8, 4)
    loads = [100, 1, 1, 1, 50, 1, 1, 1]
    holders = planner.materialization(loads, owners, 4, hot=2, budget=2)
    assert sorted(holders[0]) == [0, 1, 2, 3] and sorted(holders[4]) == [0, 1, 2, 3]
    assert all(holders[e] == [owners[e]] for e in (1, 2, 3, 5, 6, 7))


def test_more_hot_experts_than_budget_share_slots_by_load():
    owners = planner.even_ownership(16, 4)
    loads = [0.0] * 16
    loads[3], loads[9], loads[12] = 80, 40, 20
    holders = planner.materialization(loads, owners, 4, hot=3, budget=1)
    replicas = {e: len(holders[e]) - 1 for e in (3, 9, 12)}
    assert sum(replicas.values()) <= 4  # D·budget slots
    assert replicas[3] >= replicas[9] >= replicas[12]
    per_device = [sum(d in h and d != owners[e] for e, h in enumerate(holders)) for d in range(4)]
    assert max(per_device) <= 1  # the budget per device
    for e in range(16):
        assert holders[e][0] == owners[e] and len(set(holders[e])) == len(holders[e])


def test_replicas_spread_over_nodes_first():
    """Two nodes of two devices, everything owned by device 0, 2 hot experts over a budget of 1:
    4 slots shared 10:8 gives expert 0 two replicas and expert 1 one. Expert 0's first replica
    goes to node 1 (more free slots), its second back to node 0; expert 1 takes the last slot."""
    holders = planner.materialization([10, 8, 0, 0], [0, 0, 0, 0], 4, hot=2, budget=1, node_of=lambda d: d // 2)
    assert holders[0] == [0, 2, 1] and holders[1] == [0, 3] and holders[2] == [0] == holders[3]


def test_heterogeneous_ownership_balances_load_and_may_leave_a_device_empty():
    loads = [90, 5, 5, 5, 5, 5, 5, 5]
    owners = planner.ownership(loads, 4, hot=1)
    assert len(owners) == 8 and set(owners) <= {0, 1, 2, 3}
    load = [sum(l for e, l in enumerate(loads) if owners[e] == d and e != 0) for d in range(4)]
    assert max(load) - min(load) <= 5  # the cold experts balanced
    assert planner.ownership([100, 0, 0, 0], 4, hot=0) == [0, 1, 2, 3]
    # Everything hot: owned by count alone, one expert per device.
    assert sorted(planner.ownership([5, 4, 3, 2], 4, hot=4)) == [0, 1, 2, 3]


def test_plans_are_deterministic():
    rng = random.Random(0)
    for _ in range(50):
        d = rng.choice([2, 4, 8])
        e = rng.choice([4, 8, 16])
        loads = [rng.random() for _ in range(e)]
        owners = planner.ownership(loads, d, hot=2)
        assert owners == planner.ownership(list(loads), d, hot=2)
        holders = planner.materialization(loads, owners, d, 3, 2)
        assert holders == planner.materialization(list(loads), list(owners), d, 3, 2)
        assert all(h[0] == owners[i] for i, h in enumerate(holders))


def test_dispatch_prefers_the_local_replica_then_the_node():
    assert planner.dispatch_targets([0, 2, 3], 2) == [2]
    assert planner.dispatch_targets([0, 3], 1, node_of=lambda d: d // 2) == [0]
    assert planner.dispatch_targets([2, 3], 0, node_of=lambda d: d // 2) == [2, 3]


def test_even_loads_make_no_replicas():
    """Hecate replicates the top-t outright; quintet only those above hot_min_ratio × mean."""
    owners = planner.even_ownership(8, 4)
    even = [100, 101, 99, 100, 102, 98, 100, 100]
    assert planner.materialization(even, owners, 4, hot=2, budget=2) == [[o] for o in owners]
    assert planner.hot_experts(even, 2, 1.25) == []
    assert planner.hot_experts([300, 10, 10, 10], 2, 1.25) == [0]
