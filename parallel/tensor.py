"""Megatron-style tensor parallelism, with sequence parallelism, applied from outside the model.

`apply_tp(model, groups, sp)` rewrites a meta-device `Transformer` in place:

- attention: wq, wk, wv column-parallel (heads split over TP ranks; with fewer KV heads than
  ranks, each rank keeps a full copy of the KV projection and uses the head its query heads
  read), wo row-parallel;
- feed-forward: w1, w3 column-parallel, w2 row-parallel;
- embedding: vocabulary-parallel (rows split; each rank looks up the tokens it holds);
- head: column-parallel over the vocabulary; the loss is the vocabulary-parallel cross-entropy,
  so the full logits are never gathered.

Each attention, feed-forward and head module is a parallel region: it is entered through `f`
(or, with sequence parallelism, an all-gather of the sequence shards) and left through `g` (or a
reduce-scatter back to sequence shards). With sequence parallelism the residual stream and the
norms live on sequence shards. Linears themselves do no communication.

    pytest tests/dist/test_tensor_parallel.py
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parallel.collectives import (copy_to_tp, gather_sequence, reduce_from_tp, reduce_scatter_sequence)
from parallel.strategies.ladder import TPLadderRunner
from runtime.model import FeedForward
from parallel.sharding import ShardingPlan, Split, split

IGNORE_INDEX = -100


class ColumnParallelLinear(nn.Linear):
    """y[..., this rank's output features] = x · W[rows of this rank]ᵀ; x is whole on every rank.
    Holds rows [r·out/tp, (r+1)·out/tp) of the full weight (out = full output features)."""


class RowParallelLinear(nn.Linear):
    """A partial y = x[..., this rank's input features] · W[:, those columns]ᵀ; the region's exit
    sums the partials over TP ranks. Holds columns [r·in/tp, (r+1)·in/tp) of the full weight."""


class ReplicatedHeadLinear(nn.Module):
    """A projection kept whole on every TP rank, of which this rank uses the rows of the KV heads
    its query heads read (used when there are fewer KV heads than TP ranks). Its gradient on a
    rank covers only those rows, so it is summed over TP after backward (`partial_grad`)."""

    def __init__(self, linear: nn.Linear, rows: slice):
        super().__init__()
        self.weight = linear.weight
        self.rows = rows

    def forward(self, x):
        return F.linear(x, self.weight[self.rows])


class VocabParallelEmbedding(nn.Module):
    """Holds rows [start, start + V/tp) of the embedding table. Forward: look up the tokens in
    this range (others give 0), then sum over TP ranks — all-reduce, or reduce-scatter to
    sequence shards with sequence parallelism. Backward follows from those collectives."""

    def __init__(self, num_local: int, dim: int, start: int, group, sequence_parallel: bool, dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_local, dim, dtype=dtype, device="meta"))
        self.start, self.group, self.sequence_parallel = start, group, sequence_parallel

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_sequence(out, self.group)
        return reduce_from_tp(out, self.group)


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy from logits split over the vocabulary, never gathered
    (Megatron-LM's vocab-parallel loss).

    Forward: the global max of each row (all-reduce MAX), then Σ exp and the target's shifted
    logit (one all-reduce SUM of both; only the rank holding the target contributes it);
    loss = log Σ exp − target logit. Ignored targets give 0.
    Backward: softmax − one-hot on this rank's vocabulary slice, times the incoming gradient;
    no communication."""

    @staticmethod
    def forward(ctx, logits, target, vocab_start, group):
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        n_local = logits.shape[-1]
        row_max = logits.max(dim=-1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - row_max.unsqueeze(-1)
        exp = shifted.exp()
        local_target = target - vocab_start
        here = (local_target >= 0) & (local_target < n_local)
        index = local_target.clamp(0, n_local - 1).unsqueeze(-1)
        target_logit = shifted.gather(-1, index).squeeze(-1) * here
        sums = torch.stack([exp.sum(dim=-1), target_logit])
        dist.all_reduce(sums, group=group)
        valid = target != IGNORE_INDEX
        loss = (sums[0].log() - sums[1]) * valid
        ctx.save_for_backward(exp.div_(sums[0].unsqueeze(-1)), index, here, valid)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, index, here, valid = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, index, -here.to(grad.dtype).unsqueeze(-1))
        grad *= (grad_loss * valid).unsqueeze(-1)
        return grad, None, None, None


class VocabParallelLoss:
    """loss_fn(logits [b, s, V/tp], labels [b, s]) → sum of token losses (same on every TP rank)."""

    def __init__(self, vocab_start: int, group):
        self.vocab_start, self.group = vocab_start, group

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        losses = VocabParallelCrossEntropy.apply(logits.flatten(0, 1), labels.flatten(), self.vocab_start, self.group)
        return losses.sum()


def _region(module: nn.Module, group, sequence_parallel: bool, exit_reduce: bool = True) -> None:
    """Make `module` a tensor-parallel region: enter through f (or a sequence all-gather), exit
    through g (or a sequence reduce-scatter) unless `exit_reduce` is False."""

    def enter(_, args):
        x = gather_sequence(args[0], group) if sequence_parallel else copy_to_tp(args[0], group)
        return (x, *args[1:])

    def leave(_, args, out):
        return reduce_scatter_sequence(out, group) if sequence_parallel else reduce_from_tp(out, group)

    module.register_forward_pre_hook(enter)
    if exit_reduce:
        module.register_forward_hook(leave)


def _linear(cls, full: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return cls(in_features, out_features, bias=False, device="meta", dtype=full.weight.dtype)


def apply_tp(model: nn.Module, group, rank: int, size: int, sequence_parallel: bool,
             plan: ShardingPlan) -> VocabParallelLoss:
    """Rewrite `model` (a meta-device Transformer) for TP rank `rank` of `size`; record every
    parameter's slice in `plan`. Returns the loss function to use with the rewritten model."""
    args = model.args
    hd = args.head_dim

    def column(parent: nn.Module, attr: str, name: str) -> None:
        full = getattr(parent, attr)
        setattr(parent, attr, _linear(ColumnParallelLinear, full, full.in_features, full.out_features // size))
        plan[f"{name}.weight"] = split(full.weight.shape, Split(0, rank, size, "tp"))

    def row(parent: nn.Module, attr: str, name: str) -> None:
        full = getattr(parent, attr)
        setattr(parent, attr, _linear(RowParallelLinear, full, full.in_features // size, full.out_features))
        plan[f"{name}.weight"] = split(full.weight.shape, Split(1, rank, size, "tp"))

    ladder_start = args.ladder_start
    for i, block in model.layers.items():
        prefix = f"layers.{i}"
        attn, ffn = block.attention, block.feed_forward
        # A ladder block's branch collectives are done by the ladder runner, which overlaps them.
        ladder = int(i) >= ladder_start
        column(attn, "wq", f"{prefix}.attention.wq")
        if args.n_kv_heads % size == 0:
            column(attn, "wk", f"{prefix}.attention.wk")
            column(attn, "wv", f"{prefix}.attention.wv")
        else:  # fewer KV heads than ranks: a full copy, of which this rank uses one head
            kv_head = (rank * (args.n_heads // size)) // (args.n_heads // args.n_kv_heads)
            rows = slice(kv_head * hd, (kv_head + 1) * hd)
            for attr in ("wk", "wv"):
                full = getattr(attn, attr)
                setattr(attn, attr, ReplicatedHeadLinear(full, rows))
                plan[f"{prefix}.attention.{attr}.weight"] = split(full.weight.shape, partial_grad="tp")
        row(attn, "wo", f"{prefix}.attention.wo")
        if not ladder:
            _region(attn, group, sequence_parallel)
        if isinstance(ffn, FeedForward):  # an MoE block is left to expert parallelism
            column(ffn, "w1", f"{prefix}.feed_forward.w1")
            column(ffn, "w3", f"{prefix}.feed_forward.w3")
            row(ffn, "w2", f"{prefix}.feed_forward.w2")
            if not ladder:
                _region(ffn, group, sequence_parallel)
        if sequence_parallel or ladder:
            # The norms' gradients are partial: with sequence parallelism they see a shard of the
            # tokens; in a ladder branch (whose f/g the runner does around the whole branch) the
            # gradient reaching the norm is each rank's part of the column-parallel inputs'.
            for norm in ("attention_norm", "ffn_norm"):
                plan[f"{prefix}.{norm}.weight"] = split((args.dim,), partial_grad="tp")

    vocab_local = args.vocab_size // size
    if model.tok_embeddings is not None:
        full = model.tok_embeddings
        model.tok_embeddings = VocabParallelEmbedding(vocab_local, args.dim, rank * vocab_local, group,
                                                      sequence_parallel, full.weight.dtype)
        plan["tok_embeddings.weight"] = split(full.weight.shape, Split(0, rank, size, "tp"))
    if model.norm is not None and sequence_parallel:
        plan["norm.weight"] = split((args.dim,), partial_grad="tp")
    if ladder_start < args.n_layers:
        model.ladder = TPLadderRunner(group, sequence_parallel)
    if model.output is not None:
        column(model, "output", "output")
        _region(model.output, group, sequence_parallel, exit_reduce=False)
    return VocabParallelLoss(rank * vocab_local, group)
