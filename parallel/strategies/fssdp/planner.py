"""FSSDP placement decisions, as pure functions of expert loads (Hecate, 2025).

Two placements per MoE layer over the D devices of its group:
- P0, ownership: every expert on exactly one device (parameters and optimizer state, one copy);
- P1 ⊇ P0, materialisation for one iteration: hot experts get replicas where the tokens are.

Every device computes the same plans from the same global loads, so no plan is communicated.

    pytest tests/unit/test_fssdp_planner.py
"""
from __future__ import annotations

from collections import deque


class LoadWindow:
    """Sliding-window average of an MoE layer's global expert loads (default: last 5 steps)."""

    def __init__(self, num_experts: int, size: int):
        self.num_experts, self.window = num_experts, deque(maxlen=size)

    def add(self, loads) -> None:
        self.window.append([float(x) for x in loads])

    def average(self) -> list[float]:
        if not self.window:
            return [0.0] * self.num_experts
        return [sum(col) / len(self.window) for col in zip(*self.window)]


def even_ownership(num_experts: int, devices: int) -> list[int]:
    """The initial P0: contiguous, as equal as possible (device j owns a run of experts)."""
    return [e * devices // num_experts for e in range(num_experts)]


def _ranked(loads: list[float]) -> list[int]:
    """Experts by descending load, ties by id."""
    return sorted(range(len(loads)), key=lambda e: (-loads[e], e))


def hot_experts(loads: list[float], hot: int, min_ratio: float) -> list[int]:
    """The top-`hot` experts by load, keeping only those above `min_ratio` × the mean expert load.

    Hecate replicates the top-t experts outright, which assumes skewed routing. Under even
    routing the top-t are noise, change every step, and replicating them takes load off their
    owners unevenly; the threshold leaves even routing to plain ownership (our deviation)."""
    mean = sum(loads) / len(loads) if loads else 0.0
    return [e for e in _ranked(loads)[:max(hot, 0)] if loads[e] > 0 and loads[e] > min_ratio * mean]


def materialization(loads: list[float], owners: list[int], devices: int, hot: int, budget: int,
                    node_of=lambda d: 0, min_ratio: float = 1.25) -> list[list[int]]:
    """P1: the devices holding each expert this iteration (its owner first, then replicas).

    The hot experts (`hot_experts`) get replicas within `budget` extra experts per device: if
    hot ≤ budget every device holds them all; otherwise they share D·budget slots in proportion
    to load, each replica on the node with most free slots, then the device of that node with
    most free slots that does not yet hold the expert."""
    holders = [[owners[e]] for e in range(len(loads))]
    if hot <= 0 or budget <= 0 or devices == 1 or sum(loads) == 0:
        return holders
    top = hot_experts(loads, hot, min_ratio)
    if len(top) <= budget:
        for e in top:
            holders[e] += [d for d in range(devices) if d != owners[e]]
        return holders
    free = [budget] * devices
    total = sum(loads[e] for e in top)
    want = {e: min(devices - 1, int(devices * budget * loads[e] / total)) for e in top}
    for e in top:
        for _ in range(want[e]):
            candidates = [d for d in range(devices) if free[d] > 0 and d not in holders[e]]
            if not candidates:
                break
            node_free: dict[int, int] = {}
            for d in candidates:
                node_free[node_of(d)] = node_free.get(node_of(d), 0) + free[d]
            node = min(node_free, key=lambda n: (-node_free[n], n))
            d = min((d for d in candidates if node_of(d) == node), key=lambda d: (-free[d], d))
            holders[e].append(d)
            free[d] -= 1
    return holders


def ownership(loads: list[float], devices: int, hot: int, node_of=lambda d: 0, min_ratio: float = 1.25) -> list[int]:
    """Heterogeneous sharding P0 (re-planned every N steps): experts outside the top-`hot`, by
    descending load, go to the least-loaded node, then to its least-loaded device (ties: the
    device owning fewer experts); the hot experts, whose tokens spread over replicas, then fill
    the devices owning fewest experts. A device may own 0 … E experts of a layer."""
    ranked = _ranked(loads)
    hot_set = set(hot_experts(loads, hot, min_ratio))
    load = [0.0] * devices
    count = [0] * devices
    owners = [0] * len(loads)
    for e in ranked:
        if e in hot_set:
            continue
        node_load: dict[int, float] = {}
        for d in range(devices):
            node_load[node_of(d)] = node_load.get(node_of(d), 0.0) + load[d]
        node = min(node_load, key=lambda n: (node_load[n], n))
        d = min((d for d in range(devices) if node_of(d) == node), key=lambda d: (load[d], count[d], d))
        owners[e], load[d], count[d] = d, load[d] + loads[e], count[d] + 1
    for e in ranked:
        if e in hot_set:
            d = min(range(devices), key=lambda d: (count[d], load[d], d))
            owners[e], count[d] = d, count[d] + 1
    return owners


def dispatch_targets(holders: list[int], source: int, node_of=lambda d: 0) -> list[int]:
    """Where a device sends its tokens for an expert held by `holders`: itself if it holds a
    replica, else the holders in its node, else all holders (tokens split evenly among them)."""
    if source in holders:
        return [source]
    same = [d for d in holders if node_of(d) == node_of(source)]
    return sorted(same or holders)
