"""Apply every parallelism to a meta-device model, in DESIGN.md's fixed order, and give the
trainer what it needs: the model, its loss function and the step's gradient completion.

    pipeline split → tensor/sequence parallel → context parallel → expert parallel (or FSSDP)
    → activation checkpointing → compile → data parallel (FSDP2 / HSDP / DDP)

Only the stages that exist so far are applied; each lives in its own module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from parallel.activation_checkpoint import apply_ac
from parallel.data_parallel import apply_ddp, apply_fsdp
from parallel.grad_norm import clip_grad_norm_
from parallel.groups import Groups
from parallel.materialize import canonical_name, materialize
from parallel.sharding import ShardingPlan
from parallel.tensor import apply_tp, sum_partial_grads


@dataclass
class Parallelized:
    model: nn.Module
    loss_fn: Callable  # (logits, labels) -> sum of token losses on this rank's part
    plan: ShardingPlan
    groups: Groups
    dp_impl: str
    init_full: Callable

    def materialize(self, device: torch.device, seed: int) -> None:
        """Real storage with layout-independent values; DDP wraps the materialised model."""
        materialize(self.model, self.init_full, device, seed, self.plan)
        if self.dp_impl == "ddp" and self.groups["dp_cp"] is not None:
            self.model = apply_ddp(self.model, self.groups["dp_cp"], device)

    def _named(self):
        return [(canonical_name(n), p) for n, p in self.model.named_parameters()]

    def finish_grads(self) -> None:
        """After the step's last backward: sum the gradients TP ranks hold only parts of."""
        partial = [p for n, p in self._named() if self.plan.partial_grad(n)]
        if partial and self.groups["tp"] is not None:
            sum_partial_grads(partial, self.groups["tp"])

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        tp = self.groups["tp"]
        entries = [(p, (tp,) if self.plan.tp_sharded(n) else ()) for n, p in self._named()]
        return clip_grad_norm_(entries, max_norm)


def parallelize(model: nn.Module, groups: Groups, parallel, loss_fn: Callable) -> Parallelized:
    """Rewrite the meta-device `model` for this rank. `loss_fn` is the single-process loss,
    replaced where a parallelism computes it differently (vocabulary-parallel with TP)."""
    topo, plan = groups.topology, ShardingPlan()
    init_full = model.init_full
    if topo.tp > 1:
        loss_fn = apply_tp(model, groups["tp"], groups.index("tp"), topo.tp, parallel.sp, plan)
    apply_ac(model, parallel.activation_checkpoint.value)
    dp_impl = parallel.dp_impl.value
    if groups["dp_cp"] is not None and dp_impl == "fsdp":
        mesh = groups.hsdp_mesh() if topo.dp_replicate > 1 else groups.device_mesh("dp_cp")
        apply_fsdp(model, mesh, reshard_after_forward=parallel.reshard_after_forward)
    return Parallelized(model, loss_fn, plan, groups, dp_impl, init_full)
