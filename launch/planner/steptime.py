"""Estimated time of one training step of a layout, from FLOPs, bytes and measured rates.

A pipeline stage's forward and backward of one microbatch cost

    compute   its FLOPs (runtime/flops.py's counting, split as the layout splits the work, plus
              what activation checkpointing recomputes) / the device's measured FLOP/s;
    TP        sequence parallelism's all-gather into and reduce-scatter out of attention and the
              MLP: four collectives per block in forward, their four mirrors in backward (full
              checkpointing repeats the forward's); the embedding's reduce-scatter and the head's
              gather on the end stages, and the vocabulary-parallel loss's two small all-reduces;
              not overlapped;
    CP        ring attention's K/V blocks, cp − 1 hops in forward and again in backward, under
              the attention of the block in hand (parallel/context.py), so only what exceeds the
              attention's compute shows; the K/V gradients' cp hops in backward, exposed; every
              hop a call that waits for the neighbour; Ulysses' four all-to-alls (and their
              mirrors) do not overlap;
    EP        the token dispatch and combine all-to-alls of every MoE block, each way
              (MoE backend fssdp: the layer's experts gathered instead, in forward and backward);

and the pipeline's schedule (1F1B, interleaved, ZB-H1) is executed with those durations by the
schedule simulator — the exact bubble of that schedule, not a formula — with each stage's output
(forward) and its input's gradient (backward) sent to the neighbouring stage over the links that
hop crosses (`Links.hop`: a pipeline over two node classes pays the slow link on the hops that
cross it, not on every hop); sends do not block, so PP's share is what they delay the schedule.

Compute is FLOPs at the device's measured rate plus a measured fixed cost per block and
microbatch (dispatch and kernel launches: what makes many small microbatches slower than their
FLOPs say). Where ranks share a device (an emulated cluster's ranks share the host's cores), a
step lasts at least the ranks' total work at the shared rate: `shared` is the time beyond the
critical path that costs. Once per step come the data-parallel gradient reduction (DDP: an
all-reduce overlapping the last backward; FSDP: the reduce-scatter likewise, and the parameter
all-gathers of every microbatch's forward — and backward, when resharded — prefetched under
compute: what exceeds the compute shows; and FSDP's own copies into and out of its buffers,
as measured per parameter element, with its hooks' cost per block and microbatch) and the
optimizer (AdamW reads and writes 7 words per parameter at the measured memory bandwidth).

Every communication term is `Links.time` of the group kind the runtime uses (launch/planner/
links.py), so a group that the placement puts across a slow or mixed link pays for it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from parallel.pipeline.partition import stage_layers
from parallel.pipeline.schedules import build, simulate
from launch.planner.layouts import Layout
from launch.planner.links import CALLS, Links
from runtime.model import ModelArgs

ACT_BYTES = {"float32": 4, "bfloat16": 2, "float64": 8}


@dataclass(frozen=True)
class StepTime:
    """Seconds per step and where they go (the parts of the critical path, not summed work)."""

    compute: float  # the busiest stage's compute over all its microbatches
    tp: float
    cp: float
    ep: float
    pp: float
    bubble: float  # the schedule's idle time on the busiest stage
    dp: float  # exposed data-parallel communication
    optimizer: float
    shared: float = 0.0  # waiting for a device other ranks share (more work than it can do)

    @property
    def total(self) -> float:
        return (self.compute + self.tp + self.cp + self.ep + self.pp + self.bubble + self.dp + self.optimizer
                + self.shared)


@dataclass(frozen=True)
class DeviceRates:
    flops: float  # sustained matmul FLOP/s of one rank, its device to itself
    memory_bandwidth: float  # bytes/s of an element-wise kernel (the optimizer's bound)
    block_overhead_s: float = 0.0  # one block's forward and backward beyond its FLOPs
    flops_shared: float | None = None  # per rank while every rank computes; None = flops
    # FSDP2 beyond its collectives' bytes (probe.fsdp_costs): its hooks per block and microbatch,
    # its copies per parameter element gathered and per element reduced.
    fsdp_hook_s: float = 0.0
    fsdp_gather_s: float = 0.0
    fsdp_reduce_s: float = 0.0

    @property
    def sharing(self) -> float:
        """How many ranks' work a device does at once: 1 for a GPU per rank; on an emulated
        cluster, ranks over cores (the host's throughput is shared)."""
        return max(1.0, self.flops / self.flops_shared) if self.flops_shared else 1.0


def block_forward_flops(args: ModelArgs, layer: int, tokens: float, seq_len: int, tp: int) -> tuple[float, float]:
    """(forward FLOPs of one block on one rank, of which the attention core) for `tokens` local
    tokens: projections and MLP split over tp (sequence parallelism: the tokens over tp for
    experts), the attention of each local query over the whole sequence."""
    d, hd = args.dim, args.head_dim
    proj = 2 * tokens * d * hd * (2 * args.n_heads + 2 * args.n_kv_heads) / tp
    core = 4 * tokens * seq_len * args.n_heads * hd / tp
    if args.is_moe(layer):
        m = args.moe
        expert = 3 * d * m.expert_ffn_dim
        mlp = 2 * tokens * (d * m.num_experts + (m.top_k + m.shared_experts) * expert) / tp
    else:
        mlp = 2 * tokens * 3 * d * args.ffn_dim / tp
    return proj + core + mlp, core


@functools.lru_cache(maxsize=4096)
def _makespan(schedule: str, pp: int, vpp: int, m: int, f: float, b: float, w: float,
              hops: tuple = ()) -> float:
    """The schedule's simulated duration; `hops`: ((src, dst), seconds a message takes) for the
    pipeline ranks' links (none: messages arrive as they are sent)."""
    schedules = [build(schedule, pp, vpp, m, r) for r in range(pp)]
    split = schedule == "zero_bubble"
    times = {"F": f, "B": b if split else b + w, "W": w}
    seconds = dict(hops)
    transfer = (lambda src, dst: seconds[(src, dst)]) if hops else None
    timeline = simulate(schedules, pp, vpp, lambda a: times[a.kind], transfer)
    return max(t[-1][2] for t in timeline)


class _Chunk:
    """One pipeline chunk's seconds per microbatch: compute (forward, input gradient, weight
    gradient) and communication by dimension and direction, and the CPU time its collective
    calls cost its process (the library's fixed cost of each, `LinkRates.call_s`)."""

    def __init__(self, links: Links):
        self.links = links
        self.f = self.b = self.w = 0.0
        self.tp_f = self.tp_b = self.cp_f = self.cp_b = self.ep_f = self.ep_b = 0.0
        self.call_cpu = 0.0

    def comm(self, dim: str, pattern: str, nbytes: float, direction: str, times: int = 1) -> None:
        t = self.links.time(dim, pattern, nbytes)
        if t:
            attr = f"{dim}_{direction}"
            setattr(self, attr, getattr(self, attr) + times * t)
            self.calls(pattern, times)

    def calls(self, pattern: str, times: int) -> None:
        self.call_cpu += times * (self.links.rates.call_s if pattern in CALLS else 0.0)

    @property
    def total(self) -> float:
        return self.f + self.b + self.w + self.tp_f + self.tp_b + self.cp_f + self.cp_b + self.ep_f + self.ep_b


def estimate_step(args: ModelArgs, layout: Layout, links: Links, rates: DeviceRates, *, seq_len: int,
                  global_batch_size: int, dtype: str, dp_impl: str, reshard_after_forward: bool = True,
                  cp_impl: str = "ring", local_elements: int | None = None,
                  expert_elements: int = 0) -> StepTime:
    """`local_elements`: parameter elements of the busiest pipeline rank (planner/memory.py),
    `expert_elements`: the part of them that are experts (reduced over EDP, not DP·CP)."""
    L, act = layout, ACT_BYTES[dtype]
    grad = 8 if dtype == "float64" else 4
    m = global_batch_size // L.dp // L.micro_batch_size
    tokens = L.micro_batch_size * seq_len / L.cp  # per rank of a TP group, before SP splits them
    chunks = stage_layers(args.n_layers, L.pp, L.vpp)
    full_ac = L.activation_checkpoint == "full"
    fsdp = dp_impl == "fsdp" and L.dp * L.cp > 1
    # Fixed costs of a block and microbatch: forward, input gradient and weight gradient alike.
    fixed = (rates.block_overhead_s + (rates.fsdp_hook_s if fsdp else 0.0)) / 3
    activations = tokens * args.dim * act  # a TP region's gathered input (sequence parallelism)
    h: _Chunk | None = None  # the slowest chunk: it sets the pipeline's pace
    for stage, layers in enumerate(chunks):
        c = _Chunk(links)
        if stage == 0:  # the embedding's reduce-scatter; its all-gather in backward
            c.comm("tp", "reduce_scatter", activations, "f")
            c.comm("tp", "all_gather", activations, "b")
        for layer in layers:
            fwd, core = block_forward_flops(args, layer, tokens, seq_len, L.tp)
            recompute = {"none": 0.0, "selective": core, "full": fwd}[L.activation_checkpoint]
            c.f += fixed + fwd / rates.flops
            c.b += fixed * (1 + (recompute > 0)) + (fwd + recompute) / rates.flops  # (and the recomputation)
            c.w += fixed + fwd / rates.flops  # the weight gradient
            # Attention and MLP: a gather in, a reduce-scatter out; their mirrors in backward
            # (and the recomputed forward's).
            for pattern in ("all_gather", "reduce_scatter"):
                c.comm("tp", pattern, activations, "f", 2)
                c.comm("tp", pattern, activations, "b", 4 if full_ac else 2)
            kv = 2 * tokens * args.n_kv_heads * args.head_dim / L.tp
            if L.cp > 1 and cp_impl == "ring":
                # Forward: the K/V block moves cp − 1 times, each under the attention of the block
                # in hand. Backward: the K/V again, under the attention's gradient, and the K/V
                # gradients (accumulated in float32), which move on once computed: cp exposed hops.
                ring = (L.cp - 1) * links.time("cp", "ring_pass", kv * act)
                c.cp_f += max(0.0, ring - core / rates.flops)
                c.cp_b += max(0.0, ring - 2 * core / rates.flops) + L.cp * links.time("cp", "ring_pass", kv * grad)
                c.calls("ring_pass", 3 * L.cp - 2)
            elif L.cp > 1:  # Ulysses: four all-to-alls, their mirrors (and the recomputed forward's)
                c.comm("cp", "all_to_all", activations / L.tp, "f", 4)
                c.comm("cp", "all_to_all", activations / L.tp, "b", 8 if full_ac else 4)
            if args.is_moe(layer) and L.ep > 1:
                if L.moe_backend == "fssdp":  # the experts gathered in forward and backward, gradients back
                    weights = 3 * args.dim * args.moe.expert_ffn_dim * args.moe.num_experts / L.etp * act
                    c.comm("ep", "all_gather", weights, "f")
                    c.comm("ep", "all_gather", weights, "b", 2)
                else:  # dispatch and combine, twice in backward
                    routed = tokens / L.tp * args.moe.top_k * args.dim * act
                    c.comm("ep", "all_to_all", routed, "f", 2)
                    c.comm("ep", "all_to_all", routed, "b", 4)
        if stage == len(chunks) - 1:  # the head: its input gathered, the loss's max and sums reduced
            head = 2 * tokens * args.dim * args.vocab_size / L.tp / rates.flops
            c.f, c.b, c.w = c.f + head, c.b + head, c.w + head
            c.comm("tp", "all_gather", activations, "f")
            c.comm("tp", "all_reduce", 4 * tokens, "f")
            c.comm("tp", "all_reduce", 8 * tokens, "f")
            c.comm("tp", "reduce_scatter", activations, "b")
        if h is None or c.total > h.total:
            h = c
    f, b, w = h.f, h.b, h.w
    fwd_total = f + h.tp_f + h.cp_f + h.ep_f
    bwd_total = b + h.tp_b + h.cp_b + h.ep_b
    per_rank = L.vpp * m  # chunk-microbatches the busiest rank runs
    compute = per_rank * (f + b + w)
    tp, cp, ep = per_rank * (h.tp_f + h.tp_b), per_rank * (h.cp_f + h.cp_b), per_rank * (h.ep_f + h.ep_b)
    if L.pp > 1:
        # Each hop of the pipeline priced by the links it crosses (a stage's output forward, its
        # input's gradient back; interleaving wraps from the last rank to the first): the sends do
        # not block, so what they cost is what they delay the schedule by.
        sent = tokens * args.dim / L.tp * act
        pairs = {(r, (r + 1) % L.pp) for r in range(L.pp)} | {((r + 1) % L.pp, r) for r in range(L.pp)}
        hops = tuple(sorted((pair, round(links.hop("pp", *pair, sent), 9)) for pair in pairs))
        durations = (L.schedule, L.pp, L.vpp, m, round(fwd_total, 9), round(bwd_total, 9), round(w, 9))
        span, unsent = _makespan(*durations, hops), _makespan(*durations)
    else:
        span = unsent = m * (fwd_total + bwd_total + w)
    pp = max(0.0, span - unsent)
    bubble = max(0.0, unsent - compute - tp - cp - ep)

    # Data parallelism: the gradients once per step, the FSDP gathers every microbatch.
    elements = local_elements or 0
    dense, experts = elements - expert_elements, expert_elements
    shards_dense, shards_expert = (L.dp * L.cp, links.topo.edp) if fsdp else (1, 1)
    layers = args.n_layers / L.pp
    units = max(1, round(layers)) if fsdp else 1  # FSDP reduces and gathers block by block
    reduce = (links.time("dp_cp", "reduce_scatter" if fsdp else "all_reduce", dense * shards_dense * grad, units)
              + links.time("edp", "reduce_scatter" if fsdp else "all_reduce", experts * shards_expert * grad, units))
    # The reduction overlaps the rank's last backward; its last bucket (a block's) cannot.
    dp = max(reduce / layers, reduce - L.vpp * (b + w))
    if fsdp:
        gather = (links.time("dp_cp", "all_gather", dense * shards_dense * act, units)
                  + links.time("edp", "all_gather", experts * shards_expert * act, units))
        # Prefetching hides a gather under the previous block's compute; the first block's shows.
        exposed_fwd = max(gather / layers, gather - L.vpp * f)
        exposed_bwd = max(gather / layers, gather - L.vpp * (b + w))
        if L.pp == 1:
            dp += m * (exposed_fwd + (exposed_bwd if reshard_after_forward else 0.0))
        else:  # pipelines keep the parameters gathered over the step's microbatches
            dp += exposed_fwd
        # FSDP's copies into and out of its buffers, every rank at once (so at the shared rate).
        gathers = 1 if L.pp > 1 else m * (2 if reshard_after_forward else 1)
        unsharded = dense * shards_dense + (experts * shards_expert if shards_expert > 1 else 0)
        dp += unsharded * (gathers * rates.fsdp_gather_s + rates.fsdp_reduce_s) * rates.sharing
    optimizer = 7 * elements * grad / rates.memory_bandwidth
    # Ranks that share a device can together do no more than it can: their work — compute and
    # the collectives' fixed CPU cost — lasts at least its time at the shared rate (the
    # schedule's idle time is then others' busy time).
    work = compute + per_rank * h.call_cpu
    shared = max(0.0, rates.sharing * work - span)
    return StepTime(compute, tp, cp, ep, pp, bubble, dp, optimizer * rates.sharing, shared)
