"""Mixture-of-Experts feed-forward block, in plain PyTorch (no rank logic).

A router scores every token against E experts (softmax), picks the top k (optionally after
adding a per-expert balancing bias), and the token's output is the routing-weighted sum of those
experts' SwiGLU outputs, plus an optional shared expert every token goes through. Expert weights
are stacked [E, …]; tokens are sorted by expert and each expert multiplies its contiguous slice
(Megatron-Core's SequentialMLP), so the work is exactly that of the activated experts.

Load balancing (all layout-independent, computed over the tokens of the microbatch):
- the Switch Transformer auxiliary loss, coef · E · Σ_e f_e · P_e (Fedus et al., 2021), with f_e
  the fraction of routed assignments and P_e the mean router probability of expert e;
- the router z-loss, coef · mean over tokens of (log Σ exp logits)² (Zoph et al., 2022, ST-MoE);
- auxiliary-loss-free balancing (Wang et al., 2024; DeepSeek-V3): a per-expert bias added to the
  scores when choosing experts (not to the weights), moved after each step by
  rate · sign(mean load − load) from the global token counts.

How tokens reach the experts is the `dispatcher`'s job: `LocalDispatcher` computes every expert
here; expert parallelism (parallel/expert.py) swaps in one that moves tokens between ranks.
`stats_sum` (identity here) sums routing statistics over the ranks that share a microbatch's
tokens, so the balancing losses do not depend on how the tokens are split.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class MoEArgs:
    num_experts: int
    top_k: int
    expert_ffn_dim: int
    shared_experts: int = 0  # as one SwiGLU of shared_experts × expert_ffn_dim
    score: str = "softmax"  # softmax | sigmoid
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    renormalize: bool = True
    aux_loss_coef: float = 0.01
    sequence_aux_loss: bool = False  # the balance loss per sequence, averaged (DeepSeek-V3)
    z_loss_coef: float = 0.001
    bias_update_rate: float = 0.0
    capacity_factor: float = 0.0  # 0 = dropless
    force_balance: bool = False  # every expert gets the same share of assignments, whatever the scores


def balanced_choice(tokens: int, top_k: int, num_experts: int, device) -> torch.Tensor:
    """A [tokens, k] choice that loads every expert alike: assignment j of token t goes to expert
    (t·k + j) mod E (k ≤ E distinct experts per token). It depends on no score, so the counts that
    size the dispatch are known without the data — what a rehearsal on fake tensors needs — and
    every rank that routes the same number of tokens makes the same choice."""
    return (torch.arange(tokens * top_k, device=device) % num_experts).view(tokens, top_k)


class AttachAuxLoss(torch.autograd.Function):
    """Forward: return `out` unchanged. Backward: pass the output gradient through and give
    `aux` (an already scaled loss term) the gradient 1, so the term joins the objective inside
    the layer — in any pipeline stage — without being returned by the model (Megatron-LM's
    MoEAuxLossAutoScaler)."""

    @staticmethod
    def forward(ctx, out, aux):
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=grad.device)


class GroupedExperts(nn.Module):
    """E SwiGLU experts as stacked weights: w1, w3 [E, dim, hidden], w2 [E, hidden, dim]."""

    init_plan = {"w1": "normal", "w3": "normal", "w2": "residual"}  # runtime/model.py's `declared`

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: [M, dim] tokens sorted by expert, counts[e] of them for expert e (of this module's
        experts)."""
        return grouped_swiglu(x, counts, self.w1, self.w3, self.w2)


def grouped_swiglu(x: torch.Tensor, counts: torch.Tensor, w1, w3, w2) -> torch.Tensor:
    """SwiGLU of each token by its expert, for tokens sorted by expert (counts[e] rows for expert
    e), with the stacked weights w1, w3 [E, dim, hidden] and w2 [E, hidden, dim].

    One multiply per expert on its own rows rather than one batched multiply over tokens padded
    to [E, the busiest expert's rows, dim]: padding makes every expert pay for the busiest one,
    so a skewed load would cost more than a balanced one and the executed FLOPs would exceed the
    model's (runtime/flops.py counts the activated experts only).
    """
    # No early return for zero tokens: the output must stay in the autograd graph, so that a
    # rank that routed nothing still joins the backward's collectives.
    rows = x.split(counts.tolist())
    return torch.cat([(F.silu(r @ w1[e]) * (r @ w3[e])) @ w2[e] for e, r in enumerate(rows)])


def assignments(idx: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor | None):
    """The token-expert assignments of a [tokens, top_k] routing as flat (expert, token,
    weight) vectors, token-major, without those the capacity dropped (`keep` False)."""
    expert = idx.reshape(-1)
    token = torch.arange(idx.shape[0], device=idx.device).repeat_interleave(idx.shape[1])
    weight = weights.reshape(-1)
    if keep is not None:
        kept = keep.reshape(-1)
        expert, token, weight = expert[kept], token[kept], weight[kept]
    return expert, token, weight


class LocalDispatcher:
    """Every expert is on this rank: sort the token-expert assignments by expert, compute, undo
    the sort, combine by routing weight."""

    def __call__(self, x, experts: GroupedExperts, idx, weights, keep):
        n_experts = experts.w1.shape[0]
        flat_expert, token, weight = assignments(idx, weights, keep)
        order = torch.argsort(flat_expert, stable=True)
        counts = torch.bincount(flat_expert, minlength=n_experts)
        y = experts(x.index_select(0, token[order]), counts)
        out = x.new_zeros(x.shape)
        return out.index_add(0, token[order], y * weight[order].unsqueeze(-1).to(y.dtype))


def capacity_keep(probs_topk: torch.Tensor, idx: torch.Tensor, num_experts: int, factor: float) -> torch.Tensor:
    """Token dropping on the local tokens: each expert keeps at most
    capacity = ceil(factor · tokens · top_k / experts) assignments, those with the highest
    routing weight (ties: the earlier token, then the earlier of its k choices). Returns a
    [tokens, top_k] keep mask."""
    n, k = idx.shape
    capacity = math.ceil(factor * n * k / num_experts)
    flat_e, flat_p = idx.reshape(-1), probs_topk.detach().reshape(-1)
    order = torch.argsort(-flat_p, stable=True)  # highest weight first, ties in position order
    order = order[torch.argsort(flat_e[order], stable=True)]  # grouped by expert, keeping that order
    ranked = flat_e[order]
    rank_in_expert = torch.arange(n * k, device=idx.device) - torch.searchsorted(ranked, ranked)
    keep = torch.empty(n * k, dtype=torch.bool, device=idx.device)
    keep[order] = rank_in_expert < capacity
    return keep.view(n, k)


class MoE(nn.Module):
    # Tensor parallelism leaves the experts to expert parallelism; the router and the shared
    # expert stay whole on every TP rank, which routes its own tokens (runtime/model.py).
    tp_plan = {"router": "partial", "shared": "partial", "experts": "experts"}
    init_plan = {"router": "normal", "expert_bias": "zeros"}

    def __init__(self, dim: int, args: MoEArgs, ffn_factory):
        super().__init__()
        self.args = args
        self.router = nn.Linear(dim, args.num_experts, bias=False)
        self.experts = GroupedExperts(args.num_experts, dim, args.expert_ffn_dim)
        self.shared = ffn_factory() if args.shared_experts else None
        # Aux-loss-free balancing bias; a buffer: it is moved by the rule above, not by gradients.
        self.register_buffer("expert_bias", torch.zeros(args.num_experts), persistent=True)
        self.dispatcher = LocalDispatcher()
        self.stats_sum = lambda t: t  # summed over the ranks sharing the microbatch's tokens
        self.loss_scale = 1.0  # 1 / microbatches per global batch, set by the trainer
        self.reset_step_stats()

    def reset_step_stats(self) -> None:
        # Host-side running sums of the step (explicitly on the CPU: the model may be built on
        # the meta device).
        self.step_counts = torch.zeros(self.args.num_experts, dtype=torch.float64, device="cpu")
        self.step_aux = torch.zeros((), dtype=torch.float64, device="cpu")
        self.step_z = torch.zeros((), dtype=torch.float64, device="cpu")

    def route(self, logits: torch.Tensor):
        """(expert indices [tokens, k], their weights, the scores): softmax or sigmoid scores;
        the balancing bias added for the choice only; with groups, the choice limited to the
        topk_group groups whose two best scores sum highest (DeepSeek-V3's node-limited routing);
        the chosen scores renormalised and scaled by routed_scaling_factor."""
        a = self.args
        scores = logits.sigmoid() if a.score == "sigmoid" else logits.softmax(dim=-1)
        if a.force_balance:  # the weights still come from the scores, so the router still learns
            idx = balanced_choice(scores.shape[0], a.top_k, a.num_experts, scores.device)
            return idx, self._weights(scores, idx), scores
        choose = scores + self.expert_bias.to(scores.dtype)  # zero unless moved or loaded (DeepSeek-V3's)
        if a.n_group > 1:
            groups = choose.view(-1, a.n_group, a.num_experts // a.n_group)
            best = groups.topk(2, dim=-1).values.sum(dim=-1).topk(a.topk_group, dim=-1).indices  # [tokens, topk_group]
            allowed = torch.zeros_like(groups[..., 0], dtype=torch.bool).scatter_(1, best, True)
            choose = groups.masked_fill(~allowed[..., None], float("-inf")).view_as(choose)
        idx = torch.topk(choose, a.top_k, dim=-1).indices  # [tokens, k]
        return idx, self._weights(scores, idx), scores

    def _weights(self, scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        weights = scores.gather(-1, idx)
        if self.args.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.args.routed_scaling_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [tokens, dim]
        logits = self.router(x).float() if x.dtype != torch.float64 else self.router(x)
        idx, weights, scores = self.route(logits)
        # The balancing loss reads probabilities: sigmoid scores normalised per token (DeepSeek-V3).
        probs = scores / scores.sum(dim=-1, keepdim=True) if self.args.score == "sigmoid" else scores
        keep = None
        if self.args.capacity_factor > 0:
            # Forced balance drops by position (the earliest tokens stay), independent of the scores.
            rank_by = idx.new_ones(idx.shape, dtype=weights.dtype) if self.args.force_balance else weights
            keep = capacity_keep(rank_by, idx, self.args.num_experts, self.args.capacity_factor)
        out = self.dispatcher(x, self.experts, idx, weights, keep).to(x.dtype)
        if self.shared is not None:
            out = out + self.shared(x)
        if self.training:  # evaluation neither adds balancing losses nor counts toward the step's loads
            out = self._balance(out, logits, probs, idx, shape[0])
        return out.view(shape)

    def _balance(self, out, logits, probs, idx, sequences: int):
        """Add the auxiliary and z losses of this microbatch and record the expert load (routed
        assignments, before any capacity dropping). The balance loss is E · Σ_e f_e · P_e over
        the microbatch's tokens, or, with `sequence_aux_loss`, over each of its `sequences` and
        averaged (DeepSeek-V3's complementary sequence-wise loss)."""
        e, b = self.args.num_experts, sequences
        counts = self.stats_sum(F.one_hot(idx, e).to(probs.dtype).sum(dim=1).view(b, -1, e).sum(dim=1))  # [b, e]
        stats = self.stats_sum(torch.cat([probs.view(b, -1, e).sum(dim=1),
                                          torch.logsumexp(logits, -1).pow(2).view(b, -1).sum(dim=1, keepdim=True),
                                          torch.full((b, 1), probs.shape[0] // b, dtype=probs.dtype,
                                                     device=probs.device)], dim=1))  # [b, e + 2]
        if not self.args.sequence_aux_loss:  # one group of tokens: the microbatch
            counts, stats = counts.sum(dim=0, keepdim=True), stats.sum(dim=0, keepdim=True)
        n_tokens = stats[:, -1:].detach()
        prob_mean, z = stats[:, :e] / n_tokens, stats[:, e].sum() / n_tokens.sum()
        aux = (e * (counts / (n_tokens * self.args.top_k) * prob_mean).sum(dim=1)).mean()
        counts = counts.sum(dim=0)
        term = self.loss_scale * (self.args.aux_loss_coef * aux + self.args.z_loss_coef * z)
        self.step_counts += counts.detach().double().cpu()
        self.step_aux += self.loss_scale * self.args.aux_loss_coef * aux.detach().double().cpu()
        self.step_z += self.loss_scale * self.args.z_loss_coef * z.detach().double().cpu()
        if term.requires_grad:
            out = AttachAuxLoss.apply(out, term)
        return out

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor) -> None:
        """Aux-loss-free balancing: move each expert's bias toward the mean load."""
        if self.args.bias_update_rate:
            counts = counts.to(self.expert_bias)
            self.expert_bias += self.args.bias_update_rate * torch.sign(counts.mean() - counts)
