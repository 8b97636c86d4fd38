"""Estimated peak memory per rank of a layout (the busiest pipeline rank), from the model's
shapes, the layout and what calibration measured.

    peak = floor + parameters + gradients + AdamW state + transient + activations (+ logits)

- floor: a process running the smallest model through the same code (torch, the process
  groups, allocator arenas, the checkpoint engine's host pool), measured once per machine;
- states: plan/memory.py's elements per rank × bytes (fp32 master weights);
- transient: FSDP2's unsharded parameters and gradient of a block (two blocks gathered with the
  next prefetched); DDP's gradient buckets (a second copy of the gradients);
- activations: the calibrated bytes per token of a block, split over tp (sequence parallelism)
  and cp, times the layers of the rank and the microbatches its schedule keeps in flight; full
  checkpointing keeps each block's input, selective drops the attention core's share;
- logits: on the last stage.
"""
from __future__ import annotations

from dataclasses import dataclass

from parallel.plan.layouts import Layout
from parallel.plan.memory import (BYTES_PER_ELEMENT, activation_bytes, in_flight, logits_bytes, rank_elements,
                                  state_bytes)
from runtime.model import ModelArgs


@dataclass(frozen=True)
class Calibration:
    floor_bytes: float  # the runtime without a model to speak of
    block_bytes_per_token: float  # saved by one block, no parallelism
    attention_share: float  # of that, the attention core (selective checkpointing)


@dataclass(frozen=True)
class MemoryEstimate:
    floor: float
    states: float
    transient: float
    activations: float
    logits: float
    pp_rank: int  # the busiest pipeline rank

    @property
    def total(self) -> float:
        return self.floor + self.states + self.transient + self.activations + self.logits


def _block_elements(args: ModelArgs, layout: Layout) -> int:
    """Unsharded elements of the largest block on a rank (after TP/EP slicing)."""
    one = rank_elements(ModelArgs(**{**args.__dict__, "n_layers": 1}), layout.tp, 1, 1, layout.cp, layout.dp,
                        layout.ep, layout.etp, fsdp=False, pp_rank=0)
    ends = (args.vocab_size // layout.tp) * args.dim * 2 + args.dim  # embedding, head, final norm
    return one - ends


def estimate_memory(args: ModelArgs, layout: Layout, *, seq_len: int, global_batch_size: int, dtype: str,
                    dp_impl: str, calibration: Calibration) -> MemoryEstimate:
    size = BYTES_PER_ELEMENT[dtype]
    tokens = layout.micro_batch_size * seq_len // layout.cp
    microbatches = global_batch_size // layout.dp // layout.micro_batch_size
    fsdp = dp_impl == "fsdp" and layout.dp * layout.cp > 1
    block = _block_elements(args, layout) * size
    transient = 3 * block if fsdp else (0.0 if layout.dp * layout.cp == 1 else None)
    best = None
    for r in range(layout.pp):
        elements = rank_elements(args, layout.tp, layout.pp, layout.vpp, layout.cp, layout.dp, layout.ep, layout.etp,
                                 fsdp, r)
        states = state_bytes(elements, dtype).total
        extra = transient if transient is not None else elements * size  # DDP's buckets
        # Rank r of a 1F1B pipeline keeps pp − r microbatches in flight.
        depth = in_flight(layout.pp - r, layout.vpp, layout.schedule, microbatches) if layout.pp > 1 else 1.0
        acts = activation_bytes(calibration.block_bytes_per_token, args, tokens, layout.tp, layout.pp, layout.vpp,
                                layout.schedule, microbatches, layout.activation_checkpoint,
                                calibration.attention_share, size)
        acts *= depth / in_flight(layout.pp, layout.vpp, layout.schedule, microbatches)
        logits = logits_bytes(args, tokens, layout.tp) if r == layout.pp - 1 else 0.0
        estimate = MemoryEstimate(calibration.floor_bytes, states, extra, acts, logits, r)
        if best is None or estimate.total > best.total:
            best = estimate
    return best
