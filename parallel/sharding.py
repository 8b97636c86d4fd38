"""What part of each full parameter this rank holds, and how its gradient must be completed.

Tensor and expert parallelism replace parameters by slices of the full ones; the plan records,
per canonical parameter name, the full shape and its splits (`ParamSpec`: which dimension, which
piece, over which group). Data parallelism (FSDP2) then shards the local tensor again, which its
DTensor records. Together they give the rectangle of the full tensor this rank holds
(`local_block`): initialisation draws the full tensor and keeps that rectangle, the gradient
norm counts each piece once, and checkpoints store rectangles that any other layout can read.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.distributed.tensor import DTensor, Shard


@dataclass(frozen=True)
class Split:
    dim: int  # dimension of the full tensor
    index: int  # this rank's piece
    parts: int  # number of pieces
    group: str  # the group the pieces are spread over: "tp", "ep" or "etp"


@dataclass(frozen=True)
class ParamSpec:
    full_shape: tuple[int, ...]
    splits: tuple[Split, ...] = ()
    # A group whose ranks each compute only part of this parameter's gradient (sequence-parallel
    # norms and MoE routers see a shard of the tokens; replicated KV heads serve some query
    # heads): the gradient is summed over it after backward.
    partial_grad: str | None = None
    # Explicit dim-0 rows of the full tensor held here, in order (FSSDP's owned experts, any
    # set), spread over the group `rows_group`; instead of `splits`.
    rows: tuple[int, ...] | None = None
    rows_group: str | None = None

    def slices(self) -> tuple[slice, ...]:
        if self.rows is not None:
            raise ValueError("a row-set parameter is not one rectangle; use local_blocks")
        out = [slice(0, n) for n in self.full_shape]
        for s in self.splits:
            size = (out[s.dim].stop - out[s.dim].start) // s.parts
            start = out[s.dim].start + s.index * size
            out[s.dim] = slice(start, start + size)
        return tuple(out)

    @property
    def local_shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.slices())


def split(full_shape, *splits: Split, partial_grad: str | None = None) -> ParamSpec:
    return ParamSpec(tuple(full_shape), tuple(splits), partial_grad)


@dataclass
class ShardingPlan:
    """Specs by canonical parameter name; parameters not listed are whole on every rank."""

    specs: dict[str, ParamSpec] = field(default_factory=dict)
    # Trailing dim-0 rows of a parameter that are padding (a padded vocabulary): no part of the
    # tensor that initialisation, checkpoints and exports see, whose full shape lacks them.
    padded_rows: dict[str, int] = field(default_factory=dict)

    def __setitem__(self, name: str, spec: ParamSpec) -> None:
        self.specs[name] = spec

    def full_shape(self, name: str, param: torch.Tensor) -> tuple[int, ...]:
        """The shape of the whole tensor, without padding rows."""
        shape = self.specs[name].full_shape if name in self.specs else tuple(param.shape)
        return (shape[0] - self.padded_rows.get(name, 0), *shape[1:])

    def split_groups(self, name: str) -> tuple[str, ...]:
        """The groups this parameter's pieces are spread over (each piece counted once)."""
        if name not in self.specs:
            return ()
        spec = self.specs[name]
        return (spec.rows_group,) if spec.rows is not None else tuple(s.group for s in spec.splits)

    def partial_grad(self, name: str) -> str | None:
        return self.specs[name].partial_grad if name in self.specs else None


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
    block = list(plan.specs[name].slices()) if name in plan.specs else [slice(0, n) for n in param.shape]
    if isinstance(param, DTensor):
        # FSDP slices the local tensor: compose its slices inside the block.
        for d, inner in enumerate(_dtensor_slices(param)):
            block[d] = slice(block[d].start + inner.start, block[d].start + inner.stop)
    return tuple(block)


def local_blocks(plan: ShardingPlan, name: str, param: torch.Tensor, like: torch.Tensor | None = None):
    """[(view, block)]: the pieces of `like` (default: the parameter's local tensor; any tensor of
    its local shape, such as an optimizer state) and the rectangle of the full tensor each is."""
    local = like if like is not None else param
    local = local.to_local() if isinstance(local, DTensor) else local
    spec = plan.specs.get(name)
    if spec is not None and spec.rows is not None:
        rest = tuple(slice(0, n) for n in spec.full_shape[1:])
        return [(local[i:i + 1], (slice(e, e + 1), *rest)) for i, e in enumerate(spec.rows)]
    block = local_block(plan, name, param)
    rows = plan.full_shape(name, param)[0] if plan.padded_rows.get(name) else None
    if rows is not None and block[0].stop > rows:  # this rank holds padding rows: not part of the tensor
        if block[0].start >= rows:
            return []
        return [(local[:rows - block[0].start], (slice(block[0].start, rows), *block[1:]))]
    return [(local, block)]
