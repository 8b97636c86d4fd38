"""`parallel.pp_layers=auto`: give faster pipeline ranks more layers (Holmes's self-adapting
partition).

A pipeline rank's step time is modelled as fixed + layers × per-layer time, where a layer costs

    compute:   6 · (activated parameters / tp) · (tokens per rank) / (the rank's FLOP/s)
    gradient:  factor · (parameters / tp) · (bytes per element) / (its DP group's bandwidth)

with factor = 2(d−1)/d for DDP's all-reduce and 3(d−1)/d for FSDP (forward all-gather, backward
all-gather, reduce-scatter; 2(d−1)/d without resharding after forward) over d = dp·cp ranks. The
embedding's gradient and the head's compute and gradient are the fixed costs of the first and
last stage. The layers then go one at a time to the rank that would finish soonest with it, which
minimises the slowest rank's time for linear costs; a rank's layers are split evenly over its
vpp chunks. Pipeline point-to-point traffic is not modelled: it is the same whatever the split.

Rates come from the cluster description where it gives them (`cluster.nodes[*].tflops`,
`cluster.classes[*].gbps`) and are measured otherwise (parallel/probe.py).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerCosts:
    """What one Transformer layer and the two ends of the model weigh, per rank of a stage."""

    layer_flops: float  # forward + backward FLOPs of one layer on one rank
    layer_grad_bytes: float  # bytes of one layer's gradient on one rank
    head_flops: float
    head_grad_bytes: float
    embedding_grad_bytes: float


def reduction_factor(ranks: int, dp_impl: str, reshard_after_forward: bool) -> float:
    """Bytes on the wire per gradient byte for one step's data-parallel traffic (ring algorithms)."""
    if ranks <= 1:
        return 0.0
    passes = 2 if dp_impl == "ddp" or not reshard_after_forward else 3
    return passes * (ranks - 1) / ranks


def rank_times(costs: LayerCosts, pp: int, flops: list[float], bandwidth: list[float],
               factor: float) -> tuple[list[float], list[float]]:
    """(seconds per layer, fixed seconds) of each pipeline rank, given its FLOP/s and its DP
    group's bandwidth in bytes/s."""
    per_layer = [costs.layer_flops / f + factor * costs.layer_grad_bytes / b for f, b in zip(flops, bandwidth)]
    fixed = [0.0] * pp
    fixed[0] += factor * costs.embedding_grad_bytes / bandwidth[0]
    fixed[-1] += costs.head_flops / flops[-1] + factor * costs.head_grad_bytes / bandwidth[-1]
    return per_layer, fixed


def balance(n_layers: int, pp: int, vpp: int, per_layer: list[float], fixed: list[float]) -> list[int]:
    """Layer counts of the pp·vpp stages (stage c·pp + r is chunk c of rank r) minimising the
    slowest rank's fixed + layers × per_layer; every stage keeps at least one layer."""
    if n_layers < pp * vpp:
        raise ValueError(f"model.n_layers={n_layers} is fewer than the pp·vpp = {pp * vpp} stages")
    counts = [vpp] * pp
    for _ in range(n_layers - pp * vpp):
        r = min(range(pp), key=lambda i: (fixed[i] + (counts[i] + 1) * per_layer[i], i))
        counts[r] += 1
    stages = [0] * (pp * vpp)
    for r, total in enumerate(counts):
        for c in range(vpp):
            stages[c * pp + r] = total // vpp + (1 if c < total % vpp else 0)
    return stages
