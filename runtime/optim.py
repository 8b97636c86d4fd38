"""AdamW with weight decay on matrices only, and the warm-up + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch


def build_optimizer(params, optim, lr: float, device: torch.device | None = None) -> torch.optim.Optimizer:
    """AdamW over `params` (this rank's parameters, of any number of model chunks): the fused
    kernel (one launch per parameter group) where `optim.fused` says so or, when it is null, on
    CUDA; the foreach kernel otherwise."""
    groups: dict[tuple[bool, type], list] = {}
    for p in params:
        # Norm weights (1-D) are not decayed; matrices and embeddings are. Sharded (DTensor) and
        # plain parameters — MoE experts outside FSDP — go in separate groups: a fused foreach
        # update cannot mix the two.
        groups.setdefault((p.dim() >= 2, type(p)), []).append(p)
    param_groups = [{"params": ps, "weight_decay": optim.weight_decay if decay else 0.0}
                    for (decay, _), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1].__name__))]
    fused = optim.fused if optim.fused is not None else device is not None and device.type == "cuda"
    kernel = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(param_groups, lr=lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, **kernel)


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up to `peak` over `warmup`
    steps, then cosine decay to `peak·min_ratio` at step `total`."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's per-parameter state (as its first step would) so a checkpoint can be
    loaded into it before any step has run."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
