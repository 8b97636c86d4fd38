"""Expert parallelism: MoE experts spread over the EP group of the expert view, with folding.

The experts of an MoE layer are split over the `ep` ranks (each holds E/ep consecutive experts)
and, with expert tensor parallelism, each expert's hidden size over the `etp` ranks. Because
the expert view ETP×EP×EDP×PP lays out the same ranks as the dense TP×CP×DP×PP, EP can fold over
TP and CP ranks (Liu et al., 2025, "MoE Parallel Folding"): tokens leave the attention already
split over TP (sequence parallelism) and CP, and the dispatcher is the only communication.

Dispatcher, forward (Megatron-Core's all-to-all dispatcher):
    route → permute by expert → all-to-all-v over EP (uneven splits) → all-gather-v over ETP
    → expert GEMMs → reduce-scatter-v over ETP → all-to-all-v back → unpermute → weighted sum.
Backward runs the same path in reverse (the all-to-alls swap their splits; the ETP all-gather
and reduce-scatter swap roles). Dropless unless the model sets a capacity factor, in which case
each expert keeps the best assignments of the local tokens (runtime/moe.py).
Expert gradients are reduced over EDP, dense ones over DP×CP.

    pytest tests/dist/test_expert_parallel.py
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from parallel.collectives import all_gather_tensor, reduce_from_tp, reduce_scatter_tensor
from parallel.reduce import DataReducer
from parallel.sharding import ShardingPlan, Split, split
from runtime.moe import MoE, assignments


# --- collectives with uneven splits --------------------------------------------------------------

def _all_to_all_v(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


class AllToAllV(torch.autograd.Function):
    """Forward: all-to-all with uneven splits — `send[j]` rows go to rank j, `recv[j]` rows come
    from it. Backward: the same with the splits swapped (gradients return to where their rows
    came from)."""

    @staticmethod
    def forward(ctx, x, send, recv, group):
        ctx.splits, ctx.group = (send, recv), group
        return _all_to_all_v(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad):
        send, recv = ctx.splits
        return _all_to_all_v(grad, recv, send, ctx.group), None, None, None


def _gather_v(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Concatenate every rank's rows (rank j has sizes[j] of them)."""
    cap = max(sizes)
    padded = x.new_zeros((cap, *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = x.new_empty((len(sizes) * cap, *x.shape[1:]))
    all_gather_tensor(out, padded, group=group)
    return torch.cat([out[j * cap: j * cap + n] for j, n in enumerate(sizes)])


def _reduce_scatter_v(x: torch.Tensor, sizes: list[int], group, rank: int) -> torch.Tensor:
    """Sum `x` (every rank's rows, concatenated) over ranks; keep this rank's sizes[rank] rows."""
    cap = max(sizes)
    padded = x.new_zeros((len(sizes) * cap, *x.shape[1:]))
    offset = 0
    for j, n in enumerate(sizes):
        padded[j * cap: j * cap + n] = x[offset: offset + n]
        offset += n
    out = x.new_empty((cap, *x.shape[1:]))
    reduce_scatter_tensor(out, padded, group=group)
    return out[: sizes[rank]]


class AllGatherV(torch.autograd.Function):
    """Forward: all-gather rows of uneven counts over the ETP group. Backward: reduce-scatter the
    gradient back to the rows' owners (every ETP rank used every row)."""

    @staticmethod
    def forward(ctx, x, sizes, group, rank):
        ctx.args = (sizes, group, rank)
        return _gather_v(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_v(grad, *ctx.args), None, None, None


class ReduceScatterV(torch.autograd.Function):
    """Forward: sum the ETP ranks' partial expert outputs and keep this rank's rows. Backward:
    all-gather the gradient rows (every ETP rank's partial output needs all of them)."""

    @staticmethod
    def forward(ctx, x, sizes, group, rank):
        ctx.args = (sizes, group)
        return _reduce_scatter_v(x, sizes, group, rank)

    @staticmethod
    def backward(ctx, grad):
        sizes, group = ctx.args
        return _gather_v(grad, sizes, group), None, None, None


# --- the dispatcher ------------------------------------------------------------------------------

def _sort_by(keys: torch.Tensor) -> torch.Tensor:
    return torch.argsort(keys, stable=True)


class EPDispatcher:
    """Moves each token-expert assignment to the rank holding its expert and back."""

    def __init__(self, groups, num_experts: int):
        self.ep, self.etp = groups["ep"], groups["etp"]
        self.ep_ranks, self.ep_size, self.ep_rank = groups.ranks["ep"], groups.size("ep"), groups.index("ep")
        self.etp_size, self.etp_rank = groups.size("etp"), groups.index("etp")
        self.num_experts, self.local_experts = num_experts, num_experts // self.ep_size
        self.bytes_to: dict[int, int] = {}  # global rank -> bytes this rank sent it (tokens)

    def _count(self, send: list[int], row_bytes: int) -> None:
        for j, n in enumerate(send):
            if j != self.ep_rank:
                dst = self.ep_ranks[j]
                self.bytes_to[dst] = self.bytes_to.get(dst, 0) + n * row_bytes

    def __call__(self, x, experts, idx, weights, keep):
        # 1. Token-expert assignments, sorted by (global) expert.
        flat_e, token, weight = assignments(idx, weights, keep)
        order = _sort_by(flat_e)
        flat_e, token, weight = flat_e[order], token[order], weight[order]
        counts = torch.bincount(flat_e, minlength=self.num_experts)  # [E] from this rank
        # 2. How many rows go to, and come from, each EP rank (per local expert).
        if self.ep is not None:
            recv_counts = torch.empty_like(counts)
            dist.all_to_all_single(recv_counts, counts, group=self.ep)  # [ep·E_local]: sender-major
        else:
            recv_counts = counts
        recv_counts = recv_counts.view(self.ep_size, self.local_experts)
        send = counts.view(self.ep_size, self.local_experts).sum(1).tolist()
        recv = recv_counts.sum(1).tolist()
        rows = x.index_select(0, token)
        if self.ep is not None:
            self._count(send, rows.shape[-1] * rows.element_size())
            rows = AllToAllV.apply(rows, send, recv, self.ep)
        # 3. Expert-major order of the received rows (they arrive sender-major).
        local_e = torch.repeat_interleave(torch.arange(self.local_experts, device=x.device).repeat(self.ep_size),
                                          recv_counts.reshape(-1))
        per_expert = recv_counts.sum(0)
        # 4. Expert tensor parallelism: every ETP rank computes its hidden slice for all rows.
        if self.etp is not None:
            count = torch.tensor([rows.shape[0]], device=x.device)
            all_counts = [torch.empty_like(count) for _ in range(self.etp_size)]
            dist.all_gather(all_counts, count, group=self.etp)
            sizes = [int(c) for c in all_counts]
            local_e = _gather_v(local_e.unsqueeze(-1), sizes, self.etp).squeeze(-1)
            rows = AllGatherV.apply(rows, sizes, self.etp, self.etp_rank)
            per_expert = torch.bincount(local_e, minlength=self.local_experts)
        regroup = _sort_by(local_e)
        out = experts(rows.index_select(0, regroup), per_expert)
        out = out.index_select(0, torch.argsort(regroup))
        if self.etp is not None:
            out = ReduceScatterV.apply(out, sizes, self.etp, self.etp_rank)
        # 5. Back to the tokens' ranks, then to the tokens, weighted by the routing.
        if self.ep is not None:
            out = AllToAllV.apply(out, recv, send, self.ep)
        result = x.new_zeros(x.shape)
        return result.index_add(0, token, out * weight.unsqueeze(-1).to(out.dtype))


def moe_common(moe: MoE, layer: int, groups, plan: ShardingPlan, sequence_parallel: bool) -> None:
    """What every parallel MoE block needs whatever moves its tokens: its layer index, routing
    statistics summed over the ranks that share a microbatch's tokens (TP under sequence
    parallelism, and CP), and the router's and shared expert's gradients summed over TP (each TP
    rank routes its sequence shard)."""
    topo = groups.topology
    moe.layer = layer
    token_group = groups["tp_cp"] if (topo.tp > 1 and sequence_parallel) else groups["cp"]
    if token_group is not None:
        moe.stats_sum = lambda t, g=token_group: reduce_from_tp(t, g)
    if topo.tp > 1:
        prefix = f"layers.{layer}.feed_forward"
        plan[f"{prefix}.router.weight"] = split(moe.router.weight.shape, partial_grad="tp")
        if moe.shared is not None:
            for name, p in moe.shared.named_parameters():
                plan[f"{prefix}.shared.{name}"] = split(p.shape, partial_grad="tp")


def apply_ep(model: nn.Module, groups, cfg) -> None:
    """Rewrite every MoE block of the meta-device `model` for this rank: its slice of the experts
    (E/ep experts, each hidden/etp wide) and the EP dispatcher, slices recorded in
    `model.sharding`. Also with ep = etp = 1 (the MoE statistics still sum over the ranks that
    share tokens); FSSDP (`parallel.moe_backend=fssdp`) takes the MoE blocks instead."""
    if cfg.parallel.moe_backend != "ep":
        return
    topo, plan = groups.topology, model.sharding
    ep, etp = topo.ep, topo.etp
    ep_rank, etp_rank = groups.index("ep"), groups.index("etp")
    for i, block in model.layers.items():
        moe = block.feed_forward
        if not isinstance(moe, MoE):
            continue
        prefix = f"layers.{i}.feed_forward"
        local = moe.experts
        for name, hidden_dim in (("w1", 2), ("w3", 2), ("w2", 1)):
            full = getattr(local, name)
            spec = split(full.shape, Split(0, ep_rank, ep, "ep"), Split(hidden_dim, etp_rank, etp, "etp"))
            setattr(local, name, nn.Parameter(torch.empty(spec.local_shape, dtype=full.dtype, device="meta")))
            plan[f"{prefix}.experts.{name}"] = spec
        if ep > 1 or etp > 1:
            moe.dispatcher = EPDispatcher(groups, local.w1.shape[0] * ep)
        moe_common(moe, int(i), groups, plan, cfg.parallel.sp)


def moe_step(moe_layers: dict[int, MoE], groups, args, done: int, optimizer, metrics: dict) -> dict:
    """A step hook (parallel/parallelize.py): the step's auxiliary and z losses and each MoE
    layer's global expert load (tokens per expert), the aux-loss-free bias update from those
    loads, and fresh statistics for the next step. Every rank runs it (it reduces)."""
    n_layers, moe = args.n_layers + args.mtp_depth, args.moe  # MTP's blocks follow the main ones
    # Rows of every MoE layer of the model; each pipeline stage fills its own.
    loads = torch.zeros(n_layers, moe.num_experts, dtype=torch.float64)
    losses = torch.zeros(2, dtype=torch.float64)
    for layer, m in moe_layers.items():
        loads[layer] = m.step_counts
        losses += torch.stack([m.step_aux, m.step_z])
    # Counts and losses are already summed over the ranks sharing a microbatch's tokens (TP
    # with SP, and CP); data ranks hold different microbatches, pipeline ranks other layers.
    DataReducer([groups["dp"], groups["pp"]]).sum(loads)
    if groups.index("cp") != 0 or groups.index("tp") != 0:
        losses.zero_()  # counted once per token group
    DataReducer([groups["dp_cp"], groups["tp"], groups["pp"]]).sum(losses)
    for layer, m in moe_layers.items():
        m.update_bias(loads[layer])
        m.reset_step_stats()
    aux, z = losses.tolist()
    # The language-model loss above; the balancing terms beside it.
    return {"aux_loss": aux, "z_loss": z, "total_loss": metrics["loss"] + metrics.get("mtp_loss", 0.0) + aux + z,
            "expert_load": {str(i): loads[i].tolist() for i in range(n_layers) if args.is_moe(i)}}
