"""Give a parallelised meta-device model real storage and layout-independent initial values.

Every parameter's full-size value is drawn from a generator seeded by (seed, canonical name),
then this rank keeps its slice. The result is the same numbers in every layout as in one
process with the same seed (docs/architecture.md, "Numerics contract"), at the cost of each rank drawing the full
tensors of the parameters it holds a piece of.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn
from parallel.sharding import ShardingPlan, local_blocks

# Prefixes that wrappers insert into parameter names (DDP, activation checkpointing, compile).
_WRAPPER_PARTS = ("module", "_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module")


def canonical_name(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def name_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (seed, name) that does not depend on Python's hash randomisation."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def materialize(model: nn.Module, init_full, device: torch.device, seed: int,
                plan: ShardingPlan | None = None) -> None:
    """Allocate `model` on `device` and set every parameter from `init_full(name, shape, gen)`.

    `init_full` is the model's own initialiser (runtime.model.Transformer.init_full); it gets
    the full shape of the parameter (before any parallelism) and returns its full value, of
    which this rank keeps the block the sharding plan and FSDP assign it.
    """
    plan = plan or ShardingPlan()
    # A parameter held by two modules (tied embeddings) must stay one parameter: to_empty makes
    # a new one per module, so each is pointed back at the first.
    sites: dict[int, list] = {}
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None:
                sites.setdefault(id(p), []).append((module, attr))
    model.to_empty(device=device)
    for (first, first_attr), *others in sites.values():
        for module, attr in others:
            setattr(module, attr, getattr(first, first_attr))
    with torch.no_grad():
        for name, param in model.named_parameters():
            name = canonical_name(name)
            generator = torch.Generator().manual_seed(name_seed(seed, name))
            full = init_full(name, torch.Size(plan.full_shape(name, param)), generator)
            for view, block in local_blocks(plan, name, param):
                view.copy_(full[block])
        for name, buf in model.named_buffers():  # whole on every rank (e.g. MoE routing biases)
            name = canonical_name(name)
            buf.copy_(init_full(name, buf.shape, torch.Generator().manual_seed(name_seed(seed, name))))
