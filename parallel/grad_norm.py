"""The true global gradient norm of a model whose gradients are spread over ranks, and clipping.

Each parameter's gradient is counted once: a piece sharded over a group contributes its
squared sum, summed over that group; a replicated gradient contributes on every rank once.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard


def _shard_groups(grad: torch.Tensor) -> tuple:
    """The process groups over which this gradient is split into disjoint pieces."""
    if isinstance(grad, DTensor):
        mesh = grad.device_mesh
        return tuple(mesh.get_group(d) for d, p in enumerate(grad.placements) if isinstance(p, Shard))
    return ()


def global_grad_norm(params) -> torch.Tensor:
    """sqrt of the sum over every gradient element of the whole model, on every rank."""
    buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for p in params:
        if p.grad is not None:
            local = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            buckets[_shard_groups(p.grad)].append(local)
    total = None
    for groups, grads in buckets.items():
        dtype = torch.promote_types(grads[0].dtype, torch.float32)
        # One fused kernel for all the per-tensor norms of the bucket.
        norms = torch._foreach_norm([g.detach() for g in grads], 2, dtype=dtype)
        sq = torch.stack(norms).pow(2).sum()
        for group in groups:
            dist.all_reduce(sq, group=group)
        total = sq if total is None else total + sq
    if total is None:
        return torch.zeros(())
    return total.sqrt()


def clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """Scale gradients so their global norm is at most `max_norm` (0 = no clipping); returns the
    norm before clipping."""
    params = [p for p in params if p.grad is not None]
    norm = global_grad_norm(params)
    if max_norm > 0 and params:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params]
        torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return norm
