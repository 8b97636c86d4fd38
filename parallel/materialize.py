"""Give a parallelised meta-device model real storage and layout-independent initial values.

Every parameter's full-size value is drawn from a generator seeded by (seed, canonical name),
then this rank keeps its slice. The result is the same numbers in every layout as in one
process with the same seed (DESIGN.md Section 5), at the cost of each rank drawing the full
tensors of the parameters it holds a piece of.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

# Prefixes that wrappers insert into parameter names (DDP, activation checkpointing, compile).
_WRAPPER_PARTS = ("module", "_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module")


def canonical_name(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def name_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (seed, name) that does not depend on Python's hash randomisation."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def local_part(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """The piece of `full` that `param` holds on this rank."""
    if isinstance(param, DTensor):
        # src_data_rank=None: every rank slices its own shard locally, no communication.
        return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
    return full


def materialize(model: nn.Module, init_full, device: torch.device, seed: int) -> None:
    """Allocate `model` on `device` and set every parameter from `init_full(name, shape, gen)`.

    `init_full` is the model's own initialiser (runtime.model.Transformer.init_full); it gets
    the full (global) shape and returns the full value.
    """
    model.to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            name = canonical_name(name)
            generator = torch.Generator().manual_seed(name_seed(seed, name))
            full = init_full(name, param.shape, generator)
            target = param.to_local() if isinstance(param, DTensor) else param
            target.copy_(local_part(param, full))
