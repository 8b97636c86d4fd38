"""Activation checkpointing: trade recomputation for activation memory.

- full: every Transformer block keeps only its input; backward reruns its forward (including
  its tensor-parallel collectives, in the same order on every rank).
- selective: only the attention core (scores, softmax, weighted sum) is recomputed — the
  activations that grow with the square of the sequence length, at a few percent of the step's
  FLOPs (Korthikanti et al., 2022, "Reducing Activation Recomputation in Large Transformer
  Models", §5).
"""
from __future__ import annotations

import functools

import torch.utils.checkpoint
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper


def apply_ac(model: nn.Module, groups, cfg) -> None:
    """`parallel.activation_checkpoint`: full (each block recomputed in backward), selective
    (only the attention core), or none."""
    mode = cfg.parallel.activation_checkpoint.value
    if mode == "full":
        for name, block in list(model.layers.items()):
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)
    elif mode == "selective":
        for block in model.layers.values():
            attn = block.attention
            attn.core = functools.partial(torch.utils.checkpoint.checkpoint, attn.core, use_reentrant=False)
