"""This rank's training state as blocks of full tensors (runtime/checkpoint/format.py's
StateBlock): what a checkpoint stores and restores, named from the sharding plan.

Every parameter and every optimizer state tensor of the same shape is a rectangle (`block`) of
a full tensor named by its canonical key; scalar optimizer states are whole. A layout is then
only a choice of rectangles, so a checkpoint written by one layout loads into any other.
"""
from __future__ import annotations

import torch

from parallel.materialize import canonical_name
from parallel.sharding import local_blocks
from runtime.checkpoint.format import StateBlock


def state_blocks(parallel, optimizer) -> list[StateBlock]:
    """Blocks of the model's parameters, its persistent buffers (whole on every rank, e.g. MoE
    routing biases) and the optimizer's per-parameter state."""
    out = []
    for chunk in parallel.chunks:
        for name, buf in chunk.named_buffers():
            name = canonical_name(name)
            out.append(StateBlock(f"buffer/{name}", buf, tuple(buf.shape), tuple(slice(0, n) for n in buf.shape)))
    plan = parallel.plan
    for name, p in parallel.named_parameters():
        full = plan.full_shape(name, p)
        out += [StateBlock(f"model/{name}", view, full, block) for view, block in local_blocks(plan, name, p)]
        for key, value in optimizer.state.get(p, {}).items():
            if not torch.is_tensor(value):
                continue
            if value.dim() == 0:
                out.append(StateBlock(f"optim/{name}/{key}", value, (), ()))
            else:
                out += [StateBlock(f"optim/{name}/{key}", view, full, block)
                        for view, block in local_blocks(plan, name, p, like=value)]
    return out
