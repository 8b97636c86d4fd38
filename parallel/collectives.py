"""Collectives with autograd rules, one small named function each.

These are the conjugate pairs of Megatron-LM (Shoeybi et al., 2019, "Megatron-LM: Training
Multi-Billion Parameter Language Models Using Model Parallelism", §3: the `f` and `g`
operators) and of sequence parallelism (Korthikanti et al., 2022, "Reducing Activation
Recomputation in Large Transformer Models", §4.2.2: `g` and `ḡ`). Each states what happens
forward and backward; all work on gloo and NCCL (tensor collectives along dimension 0).

    pytest tests/dist/test_tensor_parallel.py -k primitive
"""
from __future__ import annotations

import torch
import torch.distributed as dist



# The dim-0 tensor collectives, under their torch ≥ 2.13 names where they exist (the older
# all_gather_into_tensor / reduce_scatter_tensor are deprecated there). Looked up at each call,
# so that a test or benchmark can wrap torch.distributed's functions (emulated slow links).
def all_gather_tensor(output, input, group=None, async_op=False):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(output, input, group=group, async_op=async_op)


def reduce_scatter_tensor(output, input, group=None, async_op=False):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(output, input, group=group, async_op=async_op)


def all_gather_along(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim` (rank order)."""
    n = dist.get_world_size(group)
    front = x.movedim(dim, 0).contiguous()
    out = torch.empty((n * front.shape[0], *front.shape[1:]), dtype=x.dtype, device=x.device)
    all_gather_tensor(out, front, group=group)
    return out.movedim(0, dim)


def reduce_scatter_along(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Sum `x` over ranks and keep this rank's 1/n slice along `dim`."""
    n = dist.get_world_size(group)
    front = x.movedim(dim, 0).contiguous()
    if front.shape[0] % n:
        raise ValueError(f"dimension {dim} of size {front.shape[0]} does not split over {n} ranks")
    out = torch.empty((front.shape[0] // n, *front.shape[1:]), dtype=x.dtype, device=x.device)
    reduce_scatter_tensor(out, front, group=group)
    return out.movedim(0, dim)


def local_slice(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n, r = dist.get_world_size(group), dist.get_rank(group)
    return x.chunk(n, dim)[r].contiguous()


class CopyToParallelRegion(torch.autograd.Function):
    """Megatron's `f`. Forward: identity (the input is replicated on every TP rank).
    Backward: all-reduce (sum) the gradient over the TP group, since each rank's parallel
    region contributed only its part of it."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class ReduceFromParallelRegion(torch.autograd.Function):
    """Megatron's `g`. Forward: all-reduce (sum) the partial outputs of the TP ranks.
    Backward: identity (every rank needs the whole output gradient)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class GatherFromSequenceParallelRegion(torch.autograd.Function):
    """Sequence parallelism's `g`. Forward: all-gather the sequence shards along `dim` into the
    whole sequence. Backward: reduce-scatter the gradient along `dim` (sum over the TP ranks'
    parallel regions, keep this rank's shard)."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return all_gather_along(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_along(grad, ctx.dim, ctx.group), None, None


class ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    """Sequence parallelism's `ḡ`. Forward: reduce-scatter the partial outputs along `dim`
    (sum over TP ranks, keep this rank's sequence shard). Backward: all-gather the gradient
    shards along `dim`."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return reduce_scatter_along(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_along(grad, ctx.dim, ctx.group), None, None


class ScatterToSequenceParallelRegion(torch.autograd.Function):
    """Forward: keep this rank's shard of a replicated tensor along `dim`.
    Backward: all-gather the gradient shards (each rank holds the gradient of its shard)."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return local_slice(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_along(grad, ctx.dim, ctx.group), None, None


def copy_to_tp(x, group):
    return CopyToParallelRegion.apply(x, group)


def reduce_from_tp(x, group):
    return ReduceFromParallelRegion.apply(x, group)


def gather_sequence(x, group, dim: int = 1):
    return GatherFromSequenceParallelRegion.apply(x, dim, group)


def reduce_scatter_sequence(x, group, dim: int = 1):
    return ReduceScatterToSequenceParallelRegion.apply(x, dim, group)


def scatter_sequence(x, group, dim: int = 1):
    return ScatterToSequenceParallelRegion.apply(x, dim, group)


def all_reduce_grads(params, group) -> None:
    """Sum the gradients of `params` over `group` in one coalesced all-reduce (no autograd).

    Used after the step's last backward for gradients no wrapper reduces during backward:
    tensor-parallel partial gradients (sequence-parallel norms, replicated KV heads, as
    Megatron-LM does for its layer-norm gradients) and pipelined data parallelism."""
    grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag OR-ed over every rank (one small all-reduce on the default group)."""
    if dist.get_world_size() == 1:
        return list(flags)
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def gather_ranks(values: list[float], device: torch.device) -> list[list[float]]:
    """Every rank's `values`, by rank (one small all-gather on the default group)."""
    world = dist.get_world_size()
    if world == 1:
        return [list(values)]
    mine = torch.tensor(values, dtype=torch.float64, device=device)
    out = torch.empty(world * len(values), dtype=torch.float64, device=device)
    all_gather_tensor(out, mine)
    return out.view(world, len(values)).tolist()
