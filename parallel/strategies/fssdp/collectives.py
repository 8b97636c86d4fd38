"""SparseAllGather and SparseReduceScatter over whole experts (Hecate, 2025, §4).

Each device holds its owned experts as rows of a [n_owned, P] tensor (P = all of an expert's
parameters, flattened), ordered by expert id; P0 (`owners`) puts every expert on one device and
P1 (`holders`) lists, per expert, every device that holds it this iteration (P1 ⊇ P0).

    SparseAllGather(P0 → P1): afterwards device d holds, in expert order, a row for every expert
        P1 gives it. Only experts that change place move: each owner sends an expert's row to the
        devices that hold a replica and do not own it.
    SparseReduceScatter(P1 → P0): every copy of an expert in P1 is summed into its owner's row.

Both are one all-to-all with uneven splits, so they run on gloo and NCCL alike, and their volume
is the sum of the sizes of the experts that change place (λ·S, not the S of a dense all-gather).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class SparsePlan:
    """One device's view of a (P0, P1) pair."""

    rank: int
    devices: int
    owners: tuple[int, ...]
    holders: tuple[tuple[int, ...], ...]

    @classmethod
    def make(cls, rank: int, devices: int, owners, holders) -> "SparsePlan":
        return cls(rank, devices, tuple(owners), tuple(tuple(sorted(set(h))) for h in holders))

    def owned(self, d: int | None = None) -> list[int]:
        d = self.rank if d is None else d
        return [e for e, o in enumerate(self.owners) if o == d]

    def held(self, d: int | None = None) -> list[int]:
        d = self.rank if d is None else d
        return [e for e, h in enumerate(self.holders) if d in h]

    def moving(self, src: int, dst: int) -> list[int]:
        """Experts `src` owns and `dst` holds a replica of (in expert order)."""
        return [e for e in self.owned(src) if dst != src and dst in self.holders[e]]

    def moved_rows(self) -> int:
        """Rows that change place in a SparseAllGather (all devices together)."""
        return sum(len(h) - 1 for h in self.holders)


def _exchange(send_rows: list[torch.Tensor], recv_counts: list[int], template: torch.Tensor, group,
              async_op: bool = False):
    """All-to-all of row blocks: send_rows[j] to rank j, recv_counts[j] rows from it."""
    width = template.shape[1]
    send = torch.cat(send_rows) if send_rows else template.new_zeros(0, width)
    recv = template.new_empty(sum(recv_counts), width)
    work = dist.all_to_all_single(recv, send.contiguous(), output_split_sizes=list(recv_counts),
                                  input_split_sizes=[r.shape[0] for r in send_rows], group=group,
                                  async_op=async_op)
    return recv, work


class PendingGather:
    """A SparseAllGather in flight; `wait()` returns the materialised [n_held, P] rows."""

    def __init__(self, owned: torch.Tensor, plan: SparsePlan, group):
        self.plan, self.owned = plan, owned
        d, n = plan.rank, plan.devices
        self.recv_from = [plan.moving(s, d) for s in range(n)]
        send = [owned[[plan.owned().index(e) for e in plan.moving(d, j)]] if plan.moving(d, j) else
                owned.new_zeros(0, owned.shape[1]) for j in range(n)]
        self.sent_rows = sum(r.shape[0] for r in send)
        self.recv, self.work = _exchange(send, [len(r) for r in self.recv_from], owned, group, async_op=True)

    def wait(self) -> torch.Tensor:
        self.work.wait()
        plan, rows = self.plan, {}
        for e, row in zip(plan.owned(), self.owned):
            rows[e] = row
        offset = 0
        for experts in self.recv_from:
            for e in experts:
                rows[e] = self.recv[offset]
                offset += 1
        held = plan.held()
        if not held:
            return self.owned.new_zeros(0, self.owned.shape[1])
        return torch.stack([rows[e] for e in held])


def sparse_all_gather(owned: torch.Tensor, plan: SparsePlan, group) -> torch.Tensor:
    return PendingGather(owned, plan, group).wait()


class PendingReduceScatter:
    """A SparseReduceScatter in flight; `wait()` returns the owned experts' summed rows."""

    def __init__(self, held_rows: torch.Tensor, plan: SparsePlan, group):
        self.plan = plan
        d, n = plan.rank, plan.devices
        held = plan.held()
        index = {e: i for i, e in enumerate(held)}
        self.local = held_rows
        self.index = index
        send = [held_rows[[index[e] for e in plan.moving(j, d)]] if plan.moving(j, d) else
                held_rows.new_zeros(0, held_rows.shape[1]) for j in range(n)]
        self.sent_rows = sum(r.shape[0] for r in send)
        self.recv_from = [plan.moving(d, s) for s in range(n)]
        self.recv, self.work = _exchange(send, [len(r) for r in self.recv_from], held_rows, group, async_op=True)

    def wait(self) -> torch.Tensor:
        self.work.wait()
        owned = self.plan.owned()
        out = torch.stack([self.local[self.index[e]] for e in owned]) if owned else \
            self.local.new_zeros(0, self.local.shape[1])
        position = {e: i for i, e in enumerate(owned)}
        offset = 0
        for experts in self.recv_from:
            for e in experts:
                out[position[e]] += self.recv[offset]
                offset += 1
        return out


def sparse_reduce_scatter(held_rows: torch.Tensor, plan: SparsePlan, group) -> torch.Tensor:
    return PendingReduceScatter(held_rows, plan, group).wait()


# --- the dense definitions, for tests ------------------------------------------------------------

def dense_all_gather_then_select(owned: torch.Tensor, plan: SparsePlan, group) -> torch.Tensor:
    """SparseAllGather by definition: gather every expert everywhere, keep the held ones."""
    everyone = [None] * plan.devices
    dist.all_gather_object(everyone, (plan.owned(), owned))
    full = {}
    for experts, rows in everyone:
        for e, row in zip(experts, rows):
            full[e] = row
    held = plan.held()
    return torch.stack([full[e] for e in held]) if held else owned.new_zeros(0, owned.shape[1])


def dense_reduce_then_scatter(held_rows: torch.Tensor, plan: SparsePlan, group) -> torch.Tensor:
    """SparseReduceScatter by definition: sum every copy of every expert, keep the owned ones."""
    everyone = [None] * plan.devices
    dist.all_gather_object(everyone, (plan.held(), held_rows))
    sums: dict[int, torch.Tensor] = {}
    for experts, rows in everyone:
        for e, row in zip(experts, rows):
            sums[e] = sums[e] + row if e in sums else row.clone()
    owned = plan.owned()
    return torch.stack([sums[e] for e in owned]) if owned else held_rows.new_zeros(0, held_rows.shape[1])
