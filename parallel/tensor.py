"""Megatron-style tensor parallelism, with sequence parallelism, applied from outside the model.

`apply_tp(model, groups, cfg)` rewrites a meta-device `Transformer` in place, as its modules
declare (`tp_plan` and `tp_regions`, next to each module in runtime/model.py):

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

from parallel.collectives import (all_gather_along, copy_to_tp, gather_sequence, reduce_from_tp,
                                  reduce_scatter_sequence)
from parallel.strategies.ladder import TPLadderRunner
from parallel.sharding import Split, split
from runtime.loss import IGNORE_INDEX
from runtime.model import declared



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
        self.weight, self.bias = linear.weight, linear.bias
        self.rows = rows

    def forward(self, x):
        return F.linear(x, self.weight[self.rows], None if self.bias is None else self.bias[self.rows])


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
    """loss_fn(logits [b, s, V/tp], labels [b, s]) → sum of token losses (same on every TP rank).
    The columns of ids ≥ vocab_size (a padded vocabulary's) are set to the dtype's lowest value
    first: they add exp(−huge) = 0 and get no gradient."""

    def __init__(self, vocab_start: int, group, vocab_size: int):
        self.vocab_start, self.group, self.vocab_size = vocab_start, group, vocab_size

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        real = self.vocab_size - self.vocab_start  # this rank's columns that are real ids
        if real < logits.shape[-1]:
            padding = torch.arange(logits.shape[-1], device=logits.device) >= real
            logits = logits.masked_fill(padding, torch.finfo(logits.dtype).min)
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
    # A column-parallel bias is split with the output features (launch/validate.py refuses a
    # row-parallel one: it would be added once per rank).
    return cls(in_features, out_features, bias=full.bias is not None, device="meta", dtype=full.weight.dtype)


def apply_tp(model: nn.Module, groups, cfg) -> None:
    """Rewrite `model` (a meta-device Transformer, or a pipeline chunk of one) for this rank's
    part of tensor parallelism, as its modules declare (`tp_plan`, `tp_regions`:
    runtime/model.py); record every slice in `model.sharding`; the chunk holding the head gets
    the vocabulary-parallel loss. A no-op when tp = 1."""
    size = groups.size("tp")
    if size == 1:
        return
    group, rank, sp = groups["tp"], groups.index("tp"), cfg.parallel.sp
    args, plan = model.args, model.sharding
    for name, _ in model.named_parameters():
        declared(model, name, "tp_plan", innermost=False)  # a parameter nobody declared: an error naming it
    vocab_local = args.padded_vocab // size

    def linear(parent: nn.Module, attr: str, name: str, style: str) -> None:
        full = getattr(parent, attr)
        if style == "kv_column" and args.n_kv_heads % size:
            # Fewer KV heads than ranks: a full copy, of which this rank uses one head.
            kv_head = (rank * (args.n_heads // size)) // (args.n_heads // args.n_kv_heads)
            rows = slice(kv_head * args.head_dim, (kv_head + 1) * args.head_dim)
            setattr(parent, attr, ReplicatedHeadLinear(full, rows))
            for n, p in full.named_parameters():
                plan[f"{name}.{n}"] = split(p.shape, partial_grad="tp")
            return
        column = style in ("column", "kv_column", "vocab")
        cls = ColumnParallelLinear if column else RowParallelLinear
        shape = ((full.in_features, full.out_features // size) if column
                 else (full.in_features // size, full.out_features))
        setattr(parent, attr, _linear(cls, full, *shape))
        plan[f"{name}.weight"] = split(full.weight.shape, Split(0 if column else 1, rank, size, "tp"))
        if full.bias is not None:
            plan[f"{name}.bias"] = split(full.bias.shape, Split(0, rank, size, "tp"))

    def rewrite(module: nn.Module, prefix: str, ladder: bool) -> None:
        declared = getattr(type(module), "tp_plan", {})
        for attr, style in declared.items():
            child, name = getattr(module, attr), f"{prefix}{attr}"
            if child is None:  # a pipeline chunk without the embedding or the head
                continue
            if style in ("column", "row", "kv_column"):
                linear(module, attr, name, style)
            elif style == "vocab" and isinstance(child, nn.Embedding):
                setattr(module, attr, VocabParallelEmbedding(vocab_local, args.dim, rank * vocab_local, group, sp,
                                                             child.weight.dtype))
                plan[f"{name}.weight"] = split(child.weight.shape, Split(0, rank, size, "tp"))
            elif style == "vocab":  # the head: logits split by vocabulary, never gathered
                linear(module, attr, name, style)
                _region(getattr(module, attr), group, sp, exit_reduce=False)
                model.token_loss = VocabParallelLoss(rank * vocab_local, group, args.vocab_size)
            elif style == "norm" and (sp or ladder):
                # With sequence parallelism a norm sees a shard of the tokens; in a ladder branch
                # (whose f/g the runner does around the whole branch) the gradient reaching the
                # norm is each rank's part of the column-parallel inputs'.
                plan[f"{name}.weight"] = split(child.weight.shape, partial_grad="tp")
            elif style == "partial":  # whole on every rank, which sees its own tokens
                for n, p in child.named_parameters():
                    plan[f"{name}.{n}"] = split(p.shape, partial_grad="tp")
        for attr in getattr(type(module), "tp_regions", ()):
            child = getattr(module, attr)
            # A branch that tensor parallelism splits is a region, unless the ladder runner
            # does its collectives (overlapped); an MoE branch is expert parallelism's.
            splits = any(s in ("column", "row") for s in getattr(type(child), "tp_plan", {}).values())
            if splits and not ladder:
                _region(child, group, sp)
        for attr, child in module.named_children():
            if attr not in declared:
                layer_ladder = ladder or (isinstance(module, nn.ModuleDict) and int(attr) >= args.ladder_start)
                rewrite(child, f"{prefix}{attr}.", layer_ladder)

    rewrite(model, "", False)
    if args.tie_embeddings and model.tok_embeddings is not None and model.output is not None:
        model.output.weight = model.tok_embeddings.weight  # the same vocabulary rows on this rank
    if args.ladder_start < args.n_layers:
        model.ladder = TPLadderRunner(group, sp)


def gather_logits(logits: torch.Tensor, groups) -> torch.Tensor:
    """The whole vocabulary's logits from this rank's part (tensor parallelism splits the head by
    vocabulary rows), for generation."""
    return all_gather_along(logits, -1, groups["tp"]) if groups["tp"] is not None else logits
