"""Data parallelism: FSDP2 (`fully_shard`) or DistributedDataParallel over the data-parallel group.

Gradients are *summed* over data-parallel ranks, never averaged: each rank's loss is already
divided by the global number of target tokens (runtime/trainer.py), so the sum is the
gradient of the global mean, exactly as one process computes it.

    pytest tests/dist/test_data_parallel.py
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from runtime.moe import MoE


def apply_fsdp(model: nn.Module, groups, cfg) -> None:
    """FSDP2 over the dense data-parallel ranks (dp·cp; HSDP with `parallel.dp_replicate`), when
    there are several and `parallel.dp_impl=fsdp`; MoE experts over EDP. Parameters stay
    gathered from forward to backward with `parallel.reshard_after_forward=false`, and inside a
    pipeline schedule (a chunk runs several microbatches before its backward). bf16 runs gather
    in bf16 and reduce in `parallel.reduce_dtype`."""
    if groups["dp_cp"] is None or cfg.parallel.dp_impl.value != "fsdp":
        return
    topo = groups.topology
    mesh = groups.hsdp_mesh() if topo.dp_replicate > 1 else groups.device_mesh("dp_cp")
    expert_mesh = groups.device_mesh("edp") if groups["edp"] is not None else None
    experts = [m.experts for m in model.modules() if isinstance(m, MoE)]
    mp_policy = None
    if cfg.train.dtype.value == "bfloat16":
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                         reduce_dtype=getattr(torch, cfg.parallel.reduce_dtype))
    shard_model(model, mesh, cfg.parallel.reshard_after_forward and topo.pp == 1, expert_mesh, experts, mp_policy)


def shard_model(model: nn.Module, mesh: DeviceMesh, reshard_after_forward: bool = True,
                expert_mesh: DeviceMesh | None = None, experts: list[nn.Module] = (),
                mp_policy: MixedPrecisionPolicy | None = None) -> nn.Module:
    """Shard every Transformer block, then the rest (embedding, final norm, head) at the root.

    Call on the meta-device model; parameters become DTensors sharded on dim 0 over `mesh`
    (a 1-D mesh: fully sharded; a 2-D (replicate, shard) mesh: HSDP). With
    `reshard_after_forward=False` blocks keep their gathered parameters until backward
    (ZeRO-2-like: gradients and optimizer states stay sharded, no re-gather in backward).

    MoE `experts` modules are replicated over a different group (EDP): they get their own FSDP
    units on `expert_mesh`, or — when EDP has one rank — stay outside FSDP altogether.

    `mp_policy` (bf16 training): parameters are gathered and computed in bf16 while the sharded
    fp32 parameters stay the master copy the optimizer updates; gradients are reduced in the
    policy's reduce dtype (fp32 by default) and kept in fp32.
    """
    mp = {"mp_policy": mp_policy} if mp_policy is not None else {}
    ignored = set()
    for module in experts:
        if expert_mesh is not None:
            fully_shard(module, mesh=expert_mesh, reshard_after_forward=reshard_after_forward, **mp)
        else:
            ignored |= set(module.parameters())
    for layer in model.layers.values():
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored or None,
                    **mp)
    # The root's parameters are used again right at the start of backward: keep them gathered.
    fully_shard(model, mesh=mesh, reshard_after_forward=False, ignored_params=ignored or None, **mp)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # Each FSDP group has its own settings. A divide factor of 1 turns the mean into a
            # sum; forcing ReduceOp.SUM avoids PREMUL_SUM, which gloo does not implement.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


def _allreduce_sum_hook(group, bucket):
    """DDP communication hook: sum the bucket over the group (DDP's default divides by size).

    Unannotated on purpose: DDP checks the annotations' objects, which postponed evaluation
    (`from __future__ import annotations`) turns into strings."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def apply_ddp(model: nn.Module, group: dist.ProcessGroup, device: torch.device) -> nn.Module:
    """Wrap a materialised model; DDP checks that every rank starts with equal parameters."""
    ddp = DistributedDataParallel(model, process_group=group,
                                  device_ids=[device] if device.type == "cuda" else None)
    ddp.register_comm_hook(group, _allreduce_sum_hook)
    return ddp


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Reduce gradients in this backward (`enabled`) or only accumulate them locally.

    Used to reduce once per optimizer step: every microbatch but the last runs unsynced.
    """
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        yield
    elif isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
    else:
        yield
