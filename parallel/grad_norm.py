"""The true global gradient norm of a model whose gradients are spread over ranks, and clipping.

Each gradient element is counted once: a piece split over a group (FSDP's shard, a tensor-
parallel slice, a pipeline stage's layers) contributes its squared sum, summed over that group;
a replicated gradient contributes once. Every rank ends with the same norm.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard


def _local(grad: torch.Tensor) -> torch.Tensor:
    return grad.to_local() if isinstance(grad, DTensor) else grad


def _dtensor_groups(grad: torch.Tensor) -> tuple:
    """The process groups over which a DTensor gradient is split into disjoint pieces."""
    if isinstance(grad, DTensor):
        mesh = grad.device_mesh
        return tuple(mesh.get_group(d) for d, p in enumerate(grad.placements) if isinstance(p, Shard))
    return ()


def global_grad_norm(entries) -> torch.Tensor:
    """entries: (parameter, groups its pieces are split over besides its DTensor mesh).
    Returns sqrt(Σ over every gradient element of the whole model), on every rank."""
    buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for p, groups in entries:
        if p.grad is not None:
            key = _dtensor_groups(p.grad) + tuple(g for g in groups if g is not None)
            buckets[key].append(_local(p.grad).detach())
    total = None
    for groups, grads in buckets.items():
        dtype = torch.promote_types(grads[0].dtype, torch.float32)
        # One fused kernel for all the per-tensor norms of the bucket.
        sq = torch.stack(torch._foreach_norm(grads, 2, dtype=dtype)).pow(2).sum()
        for group in groups:
            dist.all_reduce(sq, group=group)
        total = sq if total is None else total + sq
    return torch.zeros(()) if total is None else total.sqrt()


def clip_grad_norm_(entries, max_norm: float, uncounted: set[int] = frozenset()) -> torch.Tensor:
    """Scale gradients so their global norm is at most `max_norm` (0 = no clipping); returns the
    norm before clipping. Parameters whose id is in `uncounted` (a copy of a parameter counted
    on another rank) are scaled but not counted."""
    entries = [(p, g) for p, g in entries if p.grad is not None]
    norm = global_grad_norm([(p, g) for p, g in entries if id(p) not in uncounted])
    if max_norm > 0 and entries:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        grads = [_local(p.grad) for p, _ in entries]
        torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return norm
