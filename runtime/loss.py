"""The training loss of one microbatch: token cross-entropies summed (the trainer divides by the
global number of target tokens). The model holds it as `loss_fn`; tensor parallelism replaces
it with the vocabulary-parallel version, which never gathers the logits."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # a target that does not count


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """Sum of token cross-entropies, in at least fp32; targets equal to IGNORE_INDEX count 0. The
    logit columns from `vocab_size` on (a padded vocabulary's) take no part."""
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return F.cross_entropy(logits.flatten(0, 1).to(dtype), labels.flatten(),
                           reduction="sum", ignore_index=IGNORE_INDEX)


class AlsoMinimise(torch.autograd.Function):
    """Forward: `value`, unchanged. Backward: the incoming gradient to `value` and to `extra`
    alike, so `extra` joins the objective at `value`'s scale while the reported loss stays
    `value` (multi-token prediction's losses ride on the main loss this way)."""

    @staticmethod
    def forward(ctx, value, extra):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, grad
