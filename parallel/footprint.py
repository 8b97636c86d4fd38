"""What one rank holds of the training state: the bytes of its local pieces of every parameter,
gradient and optimizer state, as the real run allocates them (DTensors counted by their local
shard; a parameter shared by two modules, as tied embeddings are, is one Parameter, counted
once). The same function measures a real rank and a rehearsed one (launch/rehearse.py), so the
two can differ only where the layouts' pieces do."""
from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _bytes(tensors) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors)


def state_bytes(parameters: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer | None = None) -> dict:
    """{"parameters", "gradients", "optimizer"} bytes of this rank: gradients where backward has
    made them, the optimizer's per-parameter tensors (AdamW's moments; its step counters too)."""
    unique = list({id(p): p for p in parameters}.values())
    state = [] if optimizer is None else [v for s in optimizer.state.values() for v in s.values()
                                           if isinstance(v, torch.Tensor)]
    return {"parameters": _bytes(unique), "gradients": _bytes(p.grad for p in unique if p.grad is not None),
            "optimizer": _bytes(state)}
