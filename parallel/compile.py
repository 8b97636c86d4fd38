"""torch.compile per Transformer block (`train.compile=true`), as torchtitan does.

Each block's `forward` is compiled, not the module call: hooks that FSDP2 registers on the block
afterwards (all-gather before, reshard after) stay outside the compiled code, and parameter
names do not change (no `_orig_mod.`), so checkpoints are the same with and without compile.
Blocks share one compiled graph: dynamo treats a block's parameters as inputs, so the layers,
identical in structure, reuse what the first compiled. Parts that cannot be captured (the MoE
dispatcher's token counts, collectives of the parallel regions) fall back to eager at a graph
break rather than failing: `fullgraph` is off.

The compile mode decides CUDA graphs: `default` and `max-autotune-no-cudagraphs` use none;
`reduce-overhead` and `max-autotune` capture them (GPU only; off by default, because FSDP2
gathers parameters into new buffers every step).

    python -m launch.train train.compile=true train.dtype=bfloat16
"""
from __future__ import annotations

import torch
from torch import nn

CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def apply_compile(model: nn.Module, groups, cfg) -> None:
    """With `train.compile`, compile the forward of every block of `model` (a model or a pipeline
    chunk) in place, in `train.compile_mode`."""
    if not cfg.train.compile:
        return
    mode = cfg.train.compile_mode
    for block in model.layers.values():
        block.forward = torch.compile(block.forward, mode=mode)
