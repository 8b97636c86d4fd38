"""Estimated peak memory per rank of a layout (the busiest pipeline rank), from the model's
shapes, the layout and what calibration measured (planner/calibrate.py).

    peak = floor + parameters + gradients + optimizer_states + comm_buffers + cp_ring_buffers
           + activations + heap_slack + ends_working_set

- floor: a process running the smallest model through the same code (torch, the process
  groups, allocator arenas, the checkpoint engine's host pool), measured once per machine;
- parameters, gradients, optimizer_states: planner/memory.py's elements per rank × bytes (fp32
  master weights; AdamW's two moments);
- comm_buffers: FSDP2's unsharded parameters and gradient of a block (two blocks gathered with
  the next prefetched); DDP's gradient buckets (a second copy of the gradients);
- cp_ring_buffers: ring attention's K/V chunk being sent and the one being received;
- activations: the calibrated bytes autograd saves per token in a block, split over tp
  (sequence parallelism) and cp, times the layers of the rank and the microbatches its schedule
  keeps in flight; full checkpointing keeps each block's input, selective drops the attention
  core's share;
- heap_slack: on CPU the peak is the heap's high-water mark, and glibc leaves holes between the
  activations (freed temporaries, gradients and optimizer temporaries placed among them): the
  heap probe's growth per layer and token beyond the saved activations, in proportion to them;
- ends_working_set: what the heap probe grows by beyond its layers and states: the logits, the
  loss's fp32 log-softmax and their gradients, a block's activation gradients during backward,
  AdamW's foreach temporaries, BLAS packing buffers; per token of the microbatch on a cp rank
  (not split over tp, whose sequence parallelism all-gathers the tokens before each matmul).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from launch.planner.layouts import Layout
from launch.planner.memory import (
    BYTES_PER_ELEMENT,
    activation_bytes,
    in_flight,
    logits_bytes,
    rank_elements,
    state_bytes,
)
from runtime.model import ModelArgs


@dataclass(frozen=True)
class Calibration:
    floor_bytes: float  # the runtime without a model to speak of
    block_bytes_per_token: float  # saved by one block, no parallelism
    attention_share: float  # of that, the attention core (selective checkpointing)
    layer_heap_bytes_per_token: float = 0.0  # heap growth per layer and token beyond the layer's states (CPU)
    ends_heap_bytes_per_token: float = 0.0  # heap growth per token beyond layers and states (CPU)


@dataclass(frozen=True)
class MemoryEstimate:
    floor: float
    parameters: float
    gradients: float
    optimizer_states: float
    comm_buffers: float
    cp_ring_buffers: float
    activations: float
    heap_slack: float
    ends_working_set: float
    pp_rank: int  # the busiest pipeline rank

    @property
    def total(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self) if f.name != "pp_rank")


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
    # Ring attention: the K/V chunk a rank sends and the one it receives are alive together.
    kv_split = layout.tp if args.n_kv_heads % layout.tp == 0 else 1
    ring = 2 * 2 * tokens * args.n_kv_heads // kv_split * args.head_dim * size if layout.cp > 1 else 0.0
    # Holes per byte of saved activations: what one layer grows the heap by, over what it saves.
    slack_ratio = max(calibration.layer_heap_bytes_per_token / calibration.block_bytes_per_token - 1, 0.0)
    # Not split over tp: sequence parallelism all-gathers the sequence before each projection, so
    # the matmuls' buffers and a block's activation gradients see every token of the microbatch.
    # Where there is no heap probe (CUDA: the peak is allocated bytes), the logits and the loss's
    # fp32 copies and gradients are the ends' working set.
    ends = max(calibration.ends_heap_bytes_per_token * tokens, logits_bytes(args, tokens, layout.tp))
    best = None
    for r in range(layout.pp):
        elements = rank_elements(args, layout.tp, layout.pp, layout.vpp, layout.cp, layout.dp, layout.ep, layout.etp,
                                 fsdp, r)
        states = state_bytes(elements, dtype)
        extra = transient if transient is not None else elements * size  # DDP's buckets
        # Rank r of a 1F1B pipeline keeps pp − r microbatches in flight.
        depth = in_flight(layout.pp - r, layout.vpp, layout.schedule, microbatches) if layout.pp > 1 else 1.0
        acts = activation_bytes(calibration.block_bytes_per_token, args, tokens, layout.tp, layout.pp, layout.vpp,
                                layout.schedule, microbatches, layout.activation_checkpoint,
                                calibration.attention_share, size)
        acts *= depth / in_flight(layout.pp, layout.vpp, layout.schedule, microbatches)
        estimate = MemoryEstimate(calibration.floor_bytes, states.parameters, states.gradients, states.optimizer,
                                  extra, ring, acts, slack_ratio * acts, ends, r)
        if best is None or estimate.total > best.total:
            best = estimate
    return best
