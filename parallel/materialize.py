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


def initial_values(init_full, seed: int):
    """The model's own initial values as a `materialize` source: each full tensor drawn by
    `init_full(name, shape, generator)` (runtime.model.Transformer.init_full) from a generator
    seeded by (seed, name), of which the rank keeps its blocks."""
    def values(name: str, full_shape, blocks):
        full = init_full(name, torch.Size(full_shape), torch.Generator().manual_seed(name_seed(seed, name)))
        return [full[block] for block in blocks]

    return values


def materialize(model: nn.Module, values, device: torch.device, plan: ShardingPlan | None = None) -> None:
    """Allocate `model` on `device` and fill every parameter and buffer from `values(name,
    full_shape, blocks)`, which returns the given rectangles of the full tensor `name` (the full
    shape before any parallelism): the blocks the sharding plan and FSDP assign this rank.
    `initial_values` draws them; runtime/hf/checkpoint.py reads them from a Hugging Face folder.
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
            if plan.padded_rows.get(name):
                param.zero_()  # padding rows: never looked up, never scored, so they stay zero
            pieces = local_blocks(plan, name, param)
            for (view, _), value in zip(pieces, values(name, plan.full_shape(name, param), [b for _, b in pieces])):
                view.copy_(value)
        for name, buf in model.named_buffers():  # whole on every rank (e.g. MoE routing biases)
            buf.copy_(values(canonical_name(name), buf.shape, [tuple(slice(0, n) for n in buf.shape)])[0])
