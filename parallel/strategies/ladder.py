"""Tensor-parallel execution of ladder-residual blocks: every branch's reduction overlaps the next
branch's compute, in forward, in backward and in generation.

A ladder branch reads the residual stream without the previous branch's output (Zhang, Mishra
et al., 2025). So under tensor parallelism a branch's output all-reduce (a reduce-scatter with
sequence parallelism) can be posted asynchronously and waited for only when the stream needs it,
one branch later. In backward the same holds mirrored: a branch's input-gradient all-reduce is
needed only two branches later, so it overlaps the backward of the branch in between.

PyTorch's autograd engine runs the highest-numbered ready node first, which would wait for each
reduction at once; `LadderFunction` therefore runs the ladder blocks' backward itself. Its forward
runs each branch on a detached input (so each has its own graph) and posts the output reduction;
its backward walks the branches in reverse, calling autograd on each branch's graph and posting
its input-gradient reduction, in the order
    M(l), A(l), wait M(l) → M(l−1), wait A(l) → A(l−1), wait M(l−1) → M(l−2), …
so every reduction runs while one branch computes. Parameter gradients accumulate as usual.

    pytest tests/dist/test_ladder.py
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.collectives import all_gather_along, reduce_scatter_tensor


class Pending:
    """A branch result being summed over the TP group: all-reduce, or reduce-scatter along the
    sequence (dim 1) with sequence parallelism. `wait()` returns the summed tensor."""

    def __init__(self, t: torch.Tensor, group, sequence_parallel: bool):
        self.sp = sequence_parallel
        if sequence_parallel:
            n = dist.get_world_size(group)
            front = t.movedim(1, 0).contiguous()
            self.out = front.new_empty((front.shape[0] // n, *front.shape[1:]))
            self.work = reduce_scatter_tensor(self.out, front, group=group, async_op=True)
        else:
            self.out = t.detach().clone()
            self.work = dist.all_reduce(self.out, group=group, async_op=True)

    def wait(self) -> torch.Tensor:
        self.work.wait()
        return self.out.movedim(0, 1) if self.sp else self.out


class TPLadderRunner:
    """The model's `ladder` (runtime.model.ladder_blocks) for tensor-parallel ranks: the
    branches' reductions overlap compute. Branches are built without their region collectives
    (parallel.tensor.apply_tp); this runner does them."""

    def __init__(self, group, sequence_parallel: bool):
        self.group, self.sp = group, sequence_parallel

    def branch_input(self, x: torch.Tensor) -> torch.Tensor:
        """The branch reads the whole sequence: all-gather the shards with sequence parallelism."""
        return all_gather_along(x, 1, self.group) if self.sp else x

    def reduce(self, t: torch.Tensor) -> Pending:
        return Pending(t, self.group, self.sp)

    def __call__(self, blocks, x, pending_attention, pending_mlp, inputs, cache=None):
        zero = torch.zeros_like(x)
        pa = zero if pending_attention is None else pending_attention
        pm = zero if pending_mlp is None else pending_mlp
        if torch.is_grad_enabled():
            return LadderFunction.apply(x, pa, pm, self, blocks, inputs)
        return self._forward(blocks, x, pa, pm, inputs, cache, records=None)

    def _forward(self, blocks, x, pa, pm, inputs, cache, records):
        """The ladder over `blocks` with overlapped reductions; `records` (if a list) receives
        each branch's (input leaf, output) for the backward."""
        pending_a = pending_m = None
        for block in blocks:
            x = x + (pending_a.wait() if pending_a is not None else pa)
            pending_a = self._branch(block, x, "attention", inputs, cache, records)
            x = x + (pending_m.wait() if pending_m is not None else pm)
            pending_m = self._branch(block, x, "mlp", inputs, None, records)
        return x, pending_a.wait(), pending_m.wait()

    def _branch(self, block, x, kind, inputs, cache, records) -> Pending:
        inp = self.branch_input(x)
        if records is None:
            out = block(inp, inputs, branch=kind, cache=cache.layer(block) if cache else None)
        else:
            inp = inp.detach().requires_grad_()
            with torch.enable_grad():
                out = block(inp, inputs, branch=kind)
            records.append((inp, out))
        return self.reduce(out.detach())

    def _branch_backward(self, record, grad_out) -> Pending:
        """Backward through one branch's graph; posts the reduction of its input gradient."""
        inp, out = record
        grad_full = all_gather_along(grad_out, 1, self.group) if self.sp else grad_out
        torch.autograd.backward(out, grad_full)
        return self.reduce(inp.grad)


class LadderFunction(torch.autograd.Function):
    """Forward: the ladder over `blocks` from (stream, pending attention, pending MLP), each
    branch's output reduction overlapping the next branch; returns the stream and the last two
    branch outputs, reduced. Backward: the branches' backward in the ladder's own order, each
    input-gradient reduction overlapping the next branch's backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, pa, pm, runner, blocks, inputs):
        records = []
        out = runner._forward(blocks, x, pa, pm, inputs, None, records)
        ctx.runner, ctx.records = runner, records
        return out

    @staticmethod
    def backward(ctx, d_x_out, d_pa_out, d_pm_out):
        runner, records = ctx.runner, ctx.records
        n_blocks = len(records) // 2
        attention = lambda l: records[2 * l]  # noqa: E731
        mlp = lambda l: records[2 * l + 1]  # noqa: E731
        last = n_blocks - 1
        g_m = runner._branch_backward(mlp(last), d_pm_out)
        g_a = runner._branch_backward(attention(last), d_pa_out)
        d_next = d_x_out  # gradient of the stream entering the block after l
        for l in range(last, -1, -1):
            d_xm = d_next + g_m.wait()  # the stream the MLP of block l read
            if l > 0:
                g_m = runner._branch_backward(mlp(l - 1), d_xm)  # its output was added there
            d_xa = d_xm + g_a.wait()  # the stream the attention of block l read
            if l > 0:
                g_a = runner._branch_backward(attention(l - 1), d_xa)
            d_next = d_xa
        ctx.records = None
        return d_xa, d_xa, d_xm, None, None, None
