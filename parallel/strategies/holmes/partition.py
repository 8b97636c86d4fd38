"""`parallel.pp_layers=auto`: give faster pipeline ranks more layers (Holmes's self-adapting
partition).

A pipeline rank's step time is modelled as fixed + the sum of its layers' times, where layer
i costs (each layer its own: dense and MoE layers, attention kinds differ)

    compute:   (6 · activated parameters + attention scores' FLOPs) / tp · (tokens per rank)
               / (the rank's FLOP/s)
    gradient:  factor · (parameters / tp) · (bytes per element) / (its DP group's bandwidth)

with factor = 2(d−1)/d for DDP's all-reduce and 3(d−1)/d for FSDP (forward all-gather, backward
all-gather, reduce-scatter; 2(d−1)/d without resharding after forward) over d = dp·cp ranks. The
embedding's gradient is the first stage's fixed cost; the head's compute and gradient, and the
multi-token prediction blocks', the last stage's. Stages hold consecutive layers: the split is
the one whose slowest rank is fastest (a bisection on that time, each stage filled in order as
far as it fits while leaving a layer for every later stage); with vpp chunks per rank, each
chunk gets an equal share of its rank's time. Pipeline point-to-point traffic is not modelled:
it is the same whatever the split.

Rates come from the cluster description where it gives them (`cluster.nodes[*].tflops`,
`cluster.classes[*].gbps`) and are measured otherwise (parallel/probe.py).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerCosts:
    """What each Transformer layer and the two ends of the model weigh, per rank of a stage."""

    layer_flops: list[float]  # forward + backward FLOPs of each layer on one rank
    layer_grad_bytes: list[float]  # bytes of each layer's gradient on one rank
    head_flops: float  # the head's, and multi-token prediction's blocks and heads
    head_grad_bytes: float
    embedding_grad_bytes: float


def reduction_factor(ranks: int, dp_impl: str, reshard_after_forward: bool) -> float:
    """Bytes on the wire per gradient byte for one step's data-parallel traffic (ring algorithms)."""
    if ranks <= 1:
        return 0.0
    passes = 2 if dp_impl == "ddp" or not reshard_after_forward else 3
    return passes * (ranks - 1) / ranks


def rank_times(costs: LayerCosts, pp: int, flops: list[float], bandwidth: list[float],
               factor: float) -> tuple[list[list[float]], list[float]]:
    """(seconds of each layer, fixed seconds) on each pipeline rank, given its FLOP/s and its DP
    group's bandwidth in bytes/s."""
    per_layer = [[c / f + factor * g / b for c, g in zip(costs.layer_flops, costs.layer_grad_bytes)]
                 for f, b in zip(flops, bandwidth)]
    fixed = [0.0] * pp
    fixed[0] += factor * costs.embedding_grad_bytes / bandwidth[0]
    fixed[-1] += costs.head_flops / flops[-1] + factor * costs.head_grad_bytes / bandwidth[-1]
    return per_layer, fixed


def balance(pp: int, vpp: int, per_layer: list[list[float]], fixed: list[float]) -> list[int]:
    """Layer counts of the pp·vpp stages (stage c·pp + r is chunk c of rank r), consecutive
    layers each, minimising the slowest rank's fixed + Σ its layers' seconds (`per_layer[r][i]`:
    layer i on rank r); every stage keeps at least one layer."""
    n_layers, n_stages = len(per_layer[0]), pp * vpp
    if n_layers < n_stages:
        raise ValueError(f"model.n_layers={n_layers} is fewer than the pp·vpp = {n_stages} stages")
    stage_fixed = [0.0] * n_stages
    stage_fixed[0] += fixed[0]
    stage_fixed[-1] += fixed[-1]

    def fill(budget: float) -> list[int] | None:
        """Each stage in order takes layers while it stays within its share of `budget`."""
        counts, i = [], 0
        for s in range(n_stages):
            r, left = s % pp, n_stages - s - 1
            t, n = stage_fixed[s], 0
            while i + n < n_layers - left and (n == 0 or t + per_layer[r][i + n] <= budget / vpp):
                t += per_layer[r][i + n]
                n += 1
            if t > budget / vpp * (1 + 1e-12):
                return None
            counts.append(n)
            i += n
        return counts if i == n_layers else None

    lo, hi = 0.0, vpp * (max(stage_fixed) + sum(max(col) for col in zip(*per_layer)))
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fill(mid) is not None else (mid, hi)
    return fill(hi)
