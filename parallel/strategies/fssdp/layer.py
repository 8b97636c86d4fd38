"""FSSDP for MoE layers: whole experts sharded over the stage, materialised where tokens are.

Each MoE layer's experts are owned one copy each by the devices of its group (`owned` rows of
the stacked weights, ordered by expert id, with their optimizer state). Every step:

1. plan P1 from the sliding-window loads (`planner.materialization`);
2. SparseAllGather the owned rows to P1 — posted when the block starts, so it overlaps the
   attention before the MoE layer (`prefetch`), waited for when the MoE layer needs it;
3. dispatch each token-expert assignment to a device holding that expert (its own replica
   first, then one in its node, then any; split evenly) with an uneven all-to-all, compute,
   return;
4. in backward, post the SparseReduceScatter of the materialised weights' gradients to their
   owners without waiting (it overlaps the rest of the backward); `finish` adds the results to the
   owned weights' gradients after the last backward.

With re-materialisation the gathered weights are freed after the forward and gathered again in
the backward (activation checkpointing of gather + expert compute). Every N steps ownership is
re-planned (`planner.ownership`) and owned rows move with their optimizer state, only when the
plan changes.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.checkpoint import checkpoint

from parallel.expert import AllToAllV, moe_common
from parallel.strategies.fssdp import planner
from parallel.strategies.fssdp.collectives import PendingGather, PendingReduceScatter, SparsePlan
from parallel.sharding import ShardingPlan, ParamSpec
from runtime.moe import MoE, assignments, grouped_swiglu

MATRICES = ("w1", "w3", "w2")


class MaterializedMemory:
    """Bytes of materialised (gathered) expert weights alive now, and the peak, on this rank.

    Alive means the storage is: autograd keeps a weight for backward through the per-expert views
    it saved (runtime.moe.grouped_swiglu) after the stacked tensor itself is gone. The amount
    only grows when weights are materialised, so the peak is taken there.
    """

    def __init__(self):
        self.peak = 0
        self._tracked: list[tuple[StorageWeakRef, int]] = []

    @property
    def live(self) -> int:
        self._tracked = [(ref, n) for ref, n in self._tracked if not ref.expired()]
        return sum(n for _, n in self._tracked)

    def track(self, t: torch.Tensor) -> None:
        self._tracked.append((StorageWeakRef(t.untyped_storage()), t.numel() * t.element_size()))
        self.peak = max(self.peak, self.live)


class SparseMaterialize(torch.autograd.Function):
    """Forward: the SparseAllGather of the owned experts to this step's P1 (or the prefetched
    one), as stacked w1, w3, w2 of the held experts. Backward: post the SparseReduceScatter of
    their gradients to the owners and return no gradient here — `FSSDPExperts.finish` adds the
    owners' sums after the step's last backward, so the exchange overlaps the remaining backward."""

    @staticmethod
    def forward(ctx, w1, w3, w2, experts):
        pending = experts.take_prefetch() or PendingGather(experts.flat_owned(), experts.plan, experts.group)
        rows = pending.wait()
        experts.gathered_rows += pending.sent_rows
        ctx.experts, ctx.plan = experts, experts.plan
        out = experts.unflatten(rows)
        for t in out:
            experts.memory.track(t)
        return out

    @staticmethod
    def backward(ctx, g1, g3, g2):
        e = ctx.experts
        rows = torch.cat([g.flatten(1) for g in (g1, g3, g2)], dim=1)
        e.pending_grads.append(PendingReduceScatter(rows, ctx.plan, e.group))
        return None, None, None, None


class FSSDPExperts(nn.Module):
    def __init__(self, num_experts: int, dim: int, hidden: int, dtype, groups, cfg, node_of, memory):
        super().__init__()
        self.group, self.rank, self.devices = groups["ep"], groups.index("ep"), groups.size("ep")
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.cfg, self.node_of, self.memory = cfg, node_of, memory
        self.owners = planner.even_ownership(num_experts, self.devices)
        self.window = planner.LoadWindow(num_experts, cfg.window)
        n = len(self._owned())
        self.w1 = nn.Parameter(torch.empty(n, dim, hidden, dtype=dtype, device="meta"))
        self.w3 = nn.Parameter(torch.empty(n, dim, hidden, dtype=dtype, device="meta"))
        self.w2 = nn.Parameter(torch.empty(n, hidden, dim, dtype=dtype, device="meta"))
        self.plan = SparsePlan.make(self.rank, self.devices, self.owners, [[o] for o in self.owners])
        self._prefetched = None
        self.pending_grads: list[PendingReduceScatter] = []
        self.gathered_rows = 0  # experts this rank sent by SparseAllGather (bytes: × row size)
        self.tokens_in = 0  # assignments this rank computed (its expert load)

    def _owned(self, owners=None) -> list[int]:
        return [e for e, o in enumerate(self.owners if owners is None else owners) if o == self.rank]

    @property
    def row_numel(self) -> int:
        return 3 * self.dim * self.hidden

    def flat_owned(self) -> torch.Tensor:
        return torch.cat([self.w1.detach().flatten(1), self.w3.detach().flatten(1), self.w2.detach().flatten(1)], 1)

    def unflatten(self, rows: torch.Tensor):
        n, a = rows.shape[0], self.dim * self.hidden
        return (rows[:, :a].reshape(n, self.dim, self.hidden), rows[:, a:2 * a].reshape(n, self.dim, self.hidden),
                rows[:, 2 * a:].reshape(n, self.hidden, self.dim))

    # --- per-step plan ---------------------------------------------------------------------------

    def observe(self, loads) -> None:
        self.window.add(loads)

    def plan_step(self, loads=None) -> None:
        """P1 for this step, from the window's average (or the given loads, for calibration)."""
        loads = self.window.average() if loads is None else loads
        holders = planner.materialization(loads, self.owners, self.devices, self.cfg.hot, self.cfg.budget,
                                          self.node_of, self.cfg.hot_min_ratio)
        self.plan = SparsePlan.make(self.rank, self.devices, self.owners, holders)
        self._prefetched = None

    def prefetch(self) -> None:
        """Post this step's SparseAllGather now (at the block's start), to overlap the attention."""
        if self._prefetched is None and not self.cfg.calibrate:
            self._prefetched = PendingGather(self.flat_owned(), self.plan, self.group)

    def take_prefetch(self):
        pending, self._prefetched = self._prefetched, None
        return pending

    def materialized(self):
        return SparseMaterialize.apply(self.w1, self.w3, self.w2, self)

    def finish(self) -> None:
        """After the step's last backward: the owners' gradients, from every copy."""
        for pending in self.pending_grads:
            for p, g in zip((self.w1, self.w3, self.w2), self.unflatten(pending.wait())):
                p.grad = g.clone() if p.grad is None else p.grad.add_(g)
        self.pending_grads.clear()
        for p in (self.w1, self.w3, self.w2):
            if p.grad is None:  # no token reached this layer's experts anywhere
                p.grad = torch.zeros_like(p)

    # --- heterogeneous sharding ------------------------------------------------------------------

    def reshard(self, optimizer, plan_specs: ShardingPlan, prefix: str) -> bool:
        """Re-plan ownership from the window's loads; move the owned rows that change owner, with
        their optimizer state. Returns whether anything moved."""
        new = planner.ownership(self.window.average(), self.devices, self.cfg.hot, self.node_of,
                                self.cfg.hot_min_ratio)
        if new == self.owners:
            return False
        params = (self.w1, self.w3, self.w2)
        states = [optimizer.state.get(p, {}) for p in params]
        keys = [k for k in ("exp_avg", "exp_avg_sq") if all(k in s for s in states)]
        # One row per expert: the three matrices, then each optimizer state of the three.
        parts = [t for p, s in zip(params, states) for t in [p.detach()] + [s[k] for k in keys]]
        rows = torch.cat([t.flatten(1) for t in parts], 1)
        old_owned, new_owned = self._owned(), self._owned(new)
        send = [[e for e in old_owned if new[e] == j and j != self.rank] for j in range(self.devices)]
        recv_from = [[e for e in range(self.num_experts) if self.owners[e] == s and new[e] == self.rank
                      and s != self.rank] for s in range(self.devices)]
        index = {e: i for i, e in enumerate(old_owned)}
        send_rows = torch.cat([rows[[index[e] for e in block]] for block in send]) if any(send) else rows[:0]
        recv = rows.new_empty(sum(map(len, recv_from)), rows.shape[1])
        dist.all_to_all_single(recv, send_rows.contiguous(), output_split_sizes=[len(b) for b in recv_from],
                               input_split_sizes=[len(b) for b in send], group=self.group)
        by_expert = {e: rows[index[e]] for e in old_owned if new[e] == self.rank}
        offset = 0
        for block in recv_from:
            for e in block:
                by_expert[e] = recv[offset]
                offset += 1
        merged = torch.stack([by_expert[e] for e in new_owned]) if new_owned else rows.new_zeros(0, rows.shape[1])
        # Split the rows back and swap in the new parameters and optimizer state.
        sizes = [t.flatten(1).shape[1] for t in parts]
        pieces = list(torch.split(merged, sizes, dim=1))
        for i, (name, old) in enumerate(zip(MATRICES, params)):
            shape = old.shape[1:]
            chunk = pieces[i * (1 + len(keys)): (i + 1) * (1 + len(keys))]
            new_param = nn.Parameter(chunk[0].reshape(len(new_owned), *shape).clone())
            for group in optimizer.param_groups:
                group["params"] = [new_param if q is old else q for q in group["params"]]
            state = optimizer.state.pop(old, {})
            for k, t in zip(keys, chunk[1:]):
                state[k] = t.reshape(len(new_owned), *shape).clone()
            if state:
                optimizer.state[new_param] = state
            setattr(self, name, new_param)
            full = plan_specs.specs[f"{prefix}.{name}"]
            plan_specs[f"{prefix}.{name}"] = ParamSpec(full.full_shape, rows=tuple(new_owned), rows_group="ep")
        self.owners = new
        return True


class FSSDPDispatcher:
    """Sends each token-expert assignment to a device holding the expert this step."""

    def __init__(self, experts: FSSDPExperts):
        self.experts = experts

    def _targets(self, plan: SparsePlan, device):
        """[E, D] table of this rank's destinations per expert, and how many each has."""
        e, d = self.experts.num_experts, self.experts.devices
        table = torch.zeros(e, d, dtype=torch.long)
        counts = torch.zeros(e, dtype=torch.long)
        for expert in range(e):
            targets = planner.dispatch_targets(list(plan.holders[expert]), plan.rank, self.experts.node_of)
            table[expert, : len(targets)] = torch.tensor(targets)
            counts[expert] = len(targets)
        return table.to(device), counts.to(device)

    def __call__(self, x, experts, idx, weights, keep):
        ex, n_e, n_d = self.experts, self.experts.num_experts, self.experts.devices
        if ex.cfg.calibrate:  # plan P1 from this microbatch's routing, counted over the group
            counts = torch.bincount(idx.reshape(-1), minlength=n_e).double()
            dist.all_reduce(counts, group=ex.group)
            ex.plan_step(counts.tolist())
        plan = ex.plan
        flat_e, token, weight = assignments(idx, weights, keep)
        # Destination of each assignment: the k-th assignment of expert e goes to its
        # (k mod #targets)-th target — an even split over the chosen replicas.
        table, n_targets = self._targets(plan, x.device)
        by_expert = torch.argsort(flat_e, stable=True)
        sorted_e = flat_e[by_expert]
        rank_in_expert = torch.empty_like(flat_e)
        rank_in_expert[by_expert] = torch.arange(flat_e.numel(), device=x.device) - torch.searchsorted(sorted_e, sorted_e)
        dest = table[flat_e, rank_in_expert % n_targets[flat_e]]
        order = torch.argsort(dest * n_e + flat_e, stable=True)
        flat_e, token, weight, dest = flat_e[order], token[order], weight[order], dest[order]
        counts = torch.bincount(dest * n_e + flat_e, minlength=n_d * n_e)  # [D·E]: per destination, expert
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=ex.group)
        recv_counts = recv_counts.view(n_d, n_e)  # [source, expert]
        send, recv = counts.view(n_d, n_e).sum(1).tolist(), recv_counts.sum(1).tolist()
        rows = AllToAllV.apply(x.index_select(0, token), send, recv, ex.group)
        ex.tokens_in += rows.shape[0]
        # Compute on the materialised experts, grouped by their position in the held stack.
        held = plan.held()
        position = torch.full((n_e,), -1, dtype=torch.long, device=x.device)
        position[held] = torch.arange(len(held), device=x.device)
        expert_of_row = torch.repeat_interleave(torch.arange(n_e, device=x.device).repeat(n_d), recv_counts.reshape(-1))
        slot = position[expert_of_row]
        regroup = torch.argsort(slot, stable=True)
        per_slot = torch.bincount(slot, minlength=len(held))

        rows_sorted = rows.index_select(0, regroup)
        if ex.cfg.rematerialize:
            # Gather and compute again in backward instead of keeping the gathered weights.
            out = checkpoint(lambda r: grouped_swiglu(r, per_slot, *ex.materialized()), rows_sorted,
                             use_reentrant=False)
        else:
            out = grouped_swiglu(rows_sorted, per_slot, *ex.materialized())
        out = out.index_select(0, torch.argsort(regroup))
        out = AllToAllV.apply(out, recv, send, ex.group)
        result = x.new_zeros(x.shape)
        return result.index_add(0, token, out * weight.unsqueeze(-1).to(out.dtype))


def apply_fssdp(model: nn.Module, groups, cfg) -> None:
    """Rewrite every MoE block of the meta-device `model` for FSSDP over the `ep` group (when
    `parallel.moe_backend=fssdp`); the blocks' materialised expert bytes are counted in
    `model.fssdp_memory` (a MaterializedMemory)."""
    if cfg.parallel.moe_backend != "fssdp":
        return
    plan, node_size, ep_ranks = model.sharding, groups.node_size, groups.ranks["ep"]
    node_of = (lambda d: ep_ranks[d] // node_size) if node_size else (lambda d: 0)
    memory = model.fssdp_memory = getattr(model, "fssdp_memory", None) or MaterializedMemory()
    for i, block in model.layers.items():
        moe = block.feed_forward
        if not isinstance(moe, MoE):
            continue
        prefix = f"layers.{i}.feed_forward.experts"
        e, dim, hidden = moe.experts.w1.shape
        experts = FSSDPExperts(e, dim, hidden, moe.experts.w1.dtype, groups, cfg.parallel.fssdp, node_of, memory)
        for name in MATRICES:
            full = getattr(moe.experts, name)
            plan[f"{prefix}.{name}"] = ParamSpec(tuple(full.shape), rows=tuple(experts._owned()), rows_group="ep")
        moe.experts = experts
        moe.dispatcher = FSSDPDispatcher(experts)
        moe_common(moe, int(i), groups, plan, cfg.parallel.sp)
        # Post the gather when the block starts: it overlaps the attention that comes first.
        block.register_forward_pre_hook(lambda *_, x=experts: x.prefetch())


def fssdp_step(layers: dict[int, FSSDPExperts], plan: ShardingPlan, reshard_every: int, done: int, optimizer,
               metrics: dict) -> dict:
    """A step hook (parallel/parallelize.py), after the MoE statistics: each layer's load joins its
    sliding window; every `reshard_every` steps ownership is re-planned (rows and their
    optimizer state move); then the next step's replicas are planned. It runs between the
    optimizer step and the next checkpoint request, when no checkpoint copy is in flight."""
    for layer, experts in layers.items():
        experts.observe(metrics["expert_load"][str(layer)])
        if reshard_every and done % reshard_every == 0:
            experts.reshard(optimizer, plan, f"layers.{layer}.feed_forward.experts")
        experts.plan_step()
    return {}
