"""What part of each full parameter this rank holds, and how its gradient must be completed.

Tensor parallelism replaces parameters by slices of the full ones; the plan records, per
canonical parameter name, the full shape and the slice (`TPSpec`). Data parallelism (FSDP2)
then shards the TP-local tensor again, which its DTensor records. Together they give the
rectangle of the full tensor this rank holds (`local_block`): initialisation draws the full
tensor and keeps that rectangle, the gradient norm counts each piece once, and checkpoints
store rectangles that any other layout can read.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.distributed.tensor import DTensor, Shard


@dataclass(frozen=True)
class TPSpec:
    full_shape: tuple[int, ...]
    dim: int | None  # dimension of the full tensor split over TP ranks; None = a full copy
    index: int = 0  # this rank's piece
    parts: int = 1  # number of pieces
    # Each TP rank computes only part of this parameter's gradient (sequence-parallel norms see
    # a shard of the tokens; replicated KV heads serve some query heads): sum it over TP.
    partial_grad: bool = False

    def slices(self) -> tuple[slice, ...]:
        out = [slice(0, n) for n in self.full_shape]
        if self.dim is not None:
            size = self.full_shape[self.dim] // self.parts
            out[self.dim] = slice(self.index * size, (self.index + 1) * size)
        return tuple(out)


@dataclass
class ShardingPlan:
    """TP specs by canonical parameter name; parameters not listed are whole on every TP rank."""

    tp: dict[str, TPSpec] = field(default_factory=dict)

    def full_shape(self, name: str, param: torch.Tensor) -> tuple[int, ...]:
        return self.tp[name].full_shape if name in self.tp else tuple(param.shape)

    def tp_sharded(self, name: str) -> bool:
        return name in self.tp and self.tp[name].dim is not None

    def partial_grad(self, name: str) -> bool:
        return name in self.tp and self.tp[name].partial_grad


def _dtensor_slices(param: DTensor) -> tuple[slice, ...]:
    """The part of the DTensor's global tensor this rank holds (torch.chunk semantics per
    sharded mesh dimension, as FSDP2 and DTensor split)."""
    out = [slice(0, n) for n in param.shape]
    mesh = param.device_mesh
    for mesh_dim, placement in enumerate(param.placements):
        if isinstance(placement, Shard):
            d = placement.dim
            length = out[d].stop - out[d].start
            n, r = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
            chunk = -(-length // n)  # ceil
            start = out[d].start + min(r * chunk, length)
            out[d] = slice(start, out[d].start + min((r + 1) * chunk, length))
    return tuple(out)


def local_block(plan: ShardingPlan, name: str, param: torch.Tensor) -> tuple[slice, ...]:
    """The rectangle of the full parameter `name` that `param` holds on this rank."""
    block = list(plan.tp[name].slices()) if name in plan.tp else [slice(0, n) for n in param.shape]
    if isinstance(param, DTensor):
        # FSDP slices the TP-local tensor: compose its slices inside the TP block.
        for d, inner in enumerate(_dtensor_slices(param)):
            block[d] = slice(block[d].start + inner.start, block[d].start + inner.stop)
    return tuple(block)
