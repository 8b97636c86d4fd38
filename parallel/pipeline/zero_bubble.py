"""Deferred weight gradients for zero-bubble schedules.

ZB-H1 splits a backward into B (the input gradient, which the previous stage waits for) and W
(the weight gradient, which nobody waits for) and runs W later, where the pipeline would idle
(Qi et al., 2023, "Zero Bubble Pipeline Parallelism", §2). Nearly all of a Transformer's
weight-gradient work is in its linear layers; under a zero-bubble schedule their backward
computes only grad_x = grad_y · W and leaves grad_W = grad_yᵀ · x in a store, run by the
schedule's W action for that (chunk, microbatch). Other parameters (norms, embedding) get their
small gradients in B as usual.
"""
from __future__ import annotations

import types
from collections import defaultdict

import torch
from torch import nn


class WeightGradStore:
    """Pending weight-gradient work per (chunk, microbatch)."""

    def __init__(self):
        self.pending: dict[tuple[int, int], list] = defaultdict(list)
        self.key: tuple[int, int] | None = None

    def begin(self, key: tuple[int, int]) -> None:
        """Work deferred from now on belongs to `key` (called before a B)."""
        self.key = key

    def push(self, work) -> None:
        self.pending[self.key].append(work)

    def run(self, key: tuple[int, int]) -> None:
        for work in self.pending.pop(key, []):
            work()

    def __len__(self) -> int:
        return sum(len(v) for v in self.pending.values())


class DeferredWeightLinear(torch.autograd.Function):
    """y = x · Wᵀ. Forward: the matrix multiply (in the autocast dtype when autocast is on).
    Backward: grad_x = grad_y · W now; grad_W = grad_yᵀ · x deferred to the store, which adds it
    to W.grad when the schedule runs this microbatch's W."""

    @staticmethod
    def forward(ctx, x, weight, store):
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            xc, wc = x.to(dtype), weight.to(dtype)
        else:
            xc, wc = x, weight
        ctx.save_for_backward(xc, wc)
        ctx.weight, ctx.store = weight, store
        return xc @ wc.t()

    @staticmethod
    def backward(ctx, grad_y):
        xc, wc = ctx.saved_tensors
        grad_y = grad_y.to(wc.dtype)
        weight = ctx.weight

        def weight_grad():
            g = (grad_y.flatten(0, -2).t() @ xc.flatten(0, -2)).to(weight.dtype)
            weight.grad = g if weight.grad is None else weight.grad.add_(g)

        ctx.store.push(weight_grad)
        return grad_y @ wc, None, None


def defer_weight_grads(module: nn.Module, store: WeightGradStore) -> int:
    """Make every bias-free nn.Linear in `module` defer its weight gradient to `store`; returns
    how many were changed."""
    count = 0
    for linear in module.modules():
        if isinstance(linear, nn.Linear) and linear.bias is None:
            linear.forward = types.MethodType(
                lambda self, x: DeferredWeightLinear.apply(x, self.weight, store), linear)
            count += 1
    return count


def apply_zero_bubble(model: nn.Module, groups, cfg) -> None:
    """ZB-H1 (`parallel.schedule=zero_bubble`, with a pipeline): every bias-free linear of the
    chunk defers its weight gradient to the chunk's own store, `model.weight_grads`, which the
    schedule's W actions run (parallel/pipeline/executor.py)."""
    if groups.topology.pp == 1 or cfg.parallel.schedule != "zero_bubble":
        return
    model.weight_grads = WeightGradStore()
    defer_weight_grads(model, model.weight_grads)
