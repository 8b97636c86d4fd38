"""The planner's calibration, measured on the cluster it plans for (`python -m launch.plan --probe`
under torchrun or Slurm, on every node of the allocation):

- floor: the peak memory of a rank training the smallest model through the same code (torch, the
  process groups, allocator arenas, the checkpoint engine's host pool);
- device: rank 0 alone, then every rank at once, multiplies matrices: the sustained FLOP/s of a
  rank with its device to itself, and while every rank computes (ranks sharing a device or a
  host's cores share its throughput: the planner bounds a step by the total work over it); rank 0
  times the forward and backward of one of the model's blocks on a handful of tokens — the fixed
  cost per block and microbatch that FLOPs do not show (dispatch, kernel launches); every rank
  streams an element-wise update through memory (the optimizer's bound);
- links: one pair of processes at a time, everyone else waiting, sends a buffer there and back
  for each link class the cluster has: inside a node, between two nodes of each NIC class, and
  between classes; then two ranks bounce a tiny message while all others compute: the latency
  of a message while the job is busy;
- collectives: the pair on the slowest link runs an all-gather, a reduce-scatter, an all-reduce,
  an all-to-all and ring attention's exchange of one buffer: how each costs per byte against the ring model, relative to
  the all-gather (the library's algorithm: gloo's reduce-scatter takes an all-reduce's time);
  the first pair runs them many times on a small buffer: the fixed cost of a call beyond a
  message's latency (gloo's is near a millisecond on a CPU, where a message takes 0.1 ms);
- FSDP: the first pair shards one of the model's blocks with FSDP2 and times what its hooks add
  to every microbatch, and what its gathers and reductions cost per parameter element beyond
  their bytes on the link (the copies into and out of its flat buffers).

Everything is gathered to rank 0, which writes one JSON file the planner reads (`--calibration`).
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from parallel.strategies.holmes.placement import RankInfo
from launch.planner.links import pair_share
from runtime.accounting import cpu_name, probe_peak_flops

LINK_BYTES = 8 << 20
PING_BYTES = 4


def memory_bandwidth(device: torch.device, seconds: float = 0.5, nbytes: int = 64 << 20) -> float:
    """Bytes/s of `x += y` over buffers larger than the caches (two reads and a write per element)."""
    x = torch.zeros(nbytes // 4, device=device)
    y = torch.ones_like(x)
    x.add_(y)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done == 0:
        x.add_(y)
        done += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 3 * nbytes * done / (time.perf_counter() - start)


def link_pairs(ranks: list[RankInfo]) -> dict[str, tuple[int, int]]:
    """One pair of processes per link class present: 'intra' (one node), a NIC class's name (two
    nodes of it), 'cross' (nodes of two classes)."""
    firsts: dict[int, int] = {}
    for p, r in enumerate(ranks):
        firsts.setdefault(r.node, p)
    pairs: dict[str, tuple[int, int]] = {}
    for p, r in enumerate(ranks):
        if p != firsts[r.node] and "intra" not in pairs:
            pairs["intra"] = (firsts[r.node], p)
    heads = sorted(firsts.values())
    for i, a in enumerate(heads):
        for b in heads[i + 1:]:
            na, nb = ranks[a].nic, ranks[b].nic
            pairs.setdefault(na if na == nb else "cross", (a, b))
    return pairs


def _timed(fn, repeats: int, device: torch.device, summary=min) -> float:
    """The best (or another `summary`) of `repeats` runs of fn, after one that connects and
    allocates."""
    def run():
        fn()
        if device.type == "cuda":  # NCCL returns before the transfer ends
            torch.cuda.synchronize(device)

    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return summary(times)


def _ping_pong(a: int, b: int, nbytes: int, repeats: int, device: torch.device) -> float:
    """Seconds for one round trip of `nbytes` between processes a and b (others return 0)."""
    me = dist.get_rank()
    if me not in (a, b):
        return 0.0
    buf = torch.zeros(max(1, nbytes // 4), device=device)
    other = b if me == a else a

    def trip():
        if me == a:
            dist.send(buf, other)
            dist.recv(buf, other)
        else:
            dist.recv(buf, other)
            dist.send(buf, other)

    return _timed(trip, repeats, device)


def _on_pair(a: int, b: int, measure):
    """measure(group) on processes a and b, in a group of their own; every rank calls this (it
    creates the group) and gets a's result."""
    group = dist.new_group([a, b])
    result = measure(group) if dist.get_rank() in (a, b) else None
    shared = [None] * dist.get_world_size()
    dist.all_gather_object(shared, result)
    dist.destroy_process_group(group)
    return shared[a]


def _collectives(nbytes: int, group, device: torch.device) -> dict:
    """The calls the step-time model prices (links.CALLS) on a full buffer of `nbytes`: the four
    collectives, and ring attention's exchange (parallel/context.py's: a send to the next rank and
    a receive from the previous one, posted together, then waited on)."""
    from parallel.collectives import all_gather_tensor, reduce_scatter_tensor
    from parallel.context import ring_exchange

    half = torch.zeros(max(1, nbytes // 8), device=device)  # float32: a pair's halves of the buffer
    full, out = torch.zeros(2 * half.numel(), device=device), torch.zeros(2 * half.numel(), device=device)
    members = dist.get_process_group_ranks(group)

    def ring_pass():
        for work in ring_exchange(full, group, members, members.index(dist.get_rank()))[1]:
            work.wait()

    return {"all_gather": lambda: all_gather_tensor(full, half, group=group),
            "reduce_scatter": lambda: reduce_scatter_tensor(half, full, group=group),
            "all_reduce": lambda: dist.all_reduce(full, group=group),
            "all_to_all": lambda: dist.all_to_all_single(out, full, group=group),
            "ring_pass": ring_pass}


def collective_costs(a: int, b: int, device: torch.device, nbytes: int) -> dict[str, float]:
    """Each collective's time per byte on processes a and b against the ring model of links.py,
    relative to an all-gather's: 1 where the library moves the ring's bytes, 2 for gloo's
    reduce-scatter, which moves an all-reduce's. Measure it on the link that will bound the
    collectives (on a CPU's loopback, memory copies rather than bytes on the wire set the pace)."""
    def measure(group):
        per_byte = {k: _timed(fn, 3, device) / pair_share(k) for k, fn in _collectives(nbytes, group, device).items()}
        return {k: v / per_byte["all_gather"] for k, v in per_byte.items() if k != "all_gather"}

    return _on_pair(a, b, measure)


def collective_call(a: int, b: int, device: torch.device, latency_s: float, bandwidth: float,
                    nbytes: int = 4 << 10, calls: int = 30) -> float:
    """The fixed cost of a collective call beyond a message's `latency_s`, on processes a and b
    joined by `bandwidth`: the mean over many calls of each on a small buffer (the tail is
    long, and training pays thousands of calls), less the buffer's bytes."""
    def measure(group):
        fixed = [_timed(fn, calls, device, statistics.mean) - nbytes * pair_share(k) / bandwidth
                 for k, fn in _collectives(nbytes, group, device).items()]
        return max(0.0, statistics.mean(fixed) - latency_s)

    return _on_pair(a, b, measure)


def block_overhead(args, device: torch.device, flops_rate: float, tokens: int = 16, repeats: int = 10) -> float:
    """Seconds one block's forward and backward take beyond its FLOPs at `flops_rate`, on a
    handful of tokens: the per-block, per-microbatch fixed cost."""
    from launch.planner.calibrate import lone_block
    from launch.planner.steptime import block_forward_flops
    from runtime.model import AttentionInputs, rotary_tables

    block = lone_block(args, 0, device)
    x = torch.randn(1, tokens, args.dim, device=device, requires_grad=True)
    rope = AttentionInputs(*rotary_tables(torch.arange(tokens, device=device), args.rope_dim, args.rope_theta,
                                          torch.float32))
    times = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        block(x, rope).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    flops = 3 * block_forward_flops(args, 0, tokens, tokens, 1)[0]
    return max(0.0, statistics.median(times[2:]) - flops / flops_rate)


def fsdp_costs(a: int, b: int, args, device: torch.device, bandwidth: float, costs: dict[str, float],
               tokens: int = 16, repeats: int = 30) -> dict[str, float]:
    """What FSDP2 adds to a block beyond its collectives' bytes, on processes a and b joined by
    `bandwidth`: one of the model's blocks sharded over the pair, its forward and backward timed
    with the parameters kept gathered and the gradients unreduced (the hooks, paid by every
    microbatch: `hook_s`), then gathered again every forward (`gather_s`), then reduced every
    backward (`reduce_s`), each against the one before; the gather and the reduction per
    parameter element, less their bytes on the link (links.py prices those; what remains is
    FSDP's copies into and out of its flat buffers, and its bookkeeping)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    from launch.planner.calibrate import lone_block
    from runtime.model import AttentionInputs, rotary_tables

    def measure(group):
        bare, block = lone_block(args, 0, device), lone_block(args, 0, device)
        elements = sum(p.numel() for p in block.parameters())
        fully_shard(block, mesh=DeviceMesh.from_group(group, device.type), reshard_after_forward=False)
        x = torch.randn(1, tokens, args.dim, device=device, requires_grad=True)
        rope = AttentionInputs(*rotary_tables(torch.arange(tokens, device=device), args.rope_dim, args.rope_theta,
                                          torch.float32))

        def step(module, sync=False, reshard=False):
            if module is block:
                block.set_requires_gradient_sync(sync)
                block.set_reshard_after_backward(reshard)
            module(x, rope).sum().backward()

        # The modes in turn, round after round, so that drift in the machine's speed hits all
        # (each timed after one step in its mode: the state the previous mode left is gone).
        modes = [(bare,), (block, False, False), (block, False, True), (block, True, True)]
        times = [[_timed(lambda: step(*mode), 1, device) for mode in modes] for _ in range(repeats)]
        bare_s, hooks, gathered, reduced = (statistics.median(t) for t in zip(*times))
        wire = {k: 4 * pair_share(k) * costs.get(k, 1.0) / bandwidth for k in ("all_gather", "reduce_scatter")}
        return {"hook_s": max(0.0, hooks - bare_s),
                "gather_s": max(0.0, (gathered - hooks) / elements - wire["all_gather"]),
                "reduce_s": max(0.0, (reduced - gathered) / elements - wire["reduce_scatter"])}

    return _on_pair(a, b, measure)


def _loaded_latency(device: torch.device, seconds: float = 1.0) -> float:
    """Seconds a message takes while the job computes: ranks 0 and 1 bounce a tiny message for
    `seconds` while every other rank multiplies matrices, as in training some ranks wait on a
    message while the rest compute (where ranks share cores, the receiver waits to be
    scheduled)."""
    me = dist.get_rank()
    if dist.get_world_size() < 2:
        return 0.0
    buf, a = torch.zeros(1, device=device), torch.randn(256, 256, device=device)
    dist.barrier()
    start, trips = time.perf_counter(), 0
    if me == 1:  # answers until rank 0 says stop
        while True:
            dist.recv(buf, 0)
            if buf.item() < 0:
                return 0.0
            dist.send(buf, 0)
    while time.perf_counter() - start < seconds:
        if me == 0:
            dist.send(buf, 1)
            dist.recv(buf, 1)
            trips += 1
        else:
            torch.mm(a, a)
    if me:
        return 0.0
    dist.send(torch.tensor([-1.0], device=device), 1)
    return (time.perf_counter() - start) / max(1, trips) / 2


def probe(ranks: list[RankInfo], device: torch.device, dtype: torch.dtype, args, seconds: float = 1.0) -> dict:
    """Measure on every rank (a collective); rank 0 gets the whole calibration, others None.
    `args`: the model's ModelArgs (its block's fixed cost)."""
    world = dist.get_world_size()
    dist.barrier()
    alone = overhead = 0.0
    if dist.get_rank() == 0:
        alone = probe_peak_flops(device, dtype, seconds=seconds)
        overhead = block_overhead(args, device, alone)
    dist.barrier()
    flops = probe_peak_flops(device, dtype, seconds=seconds)
    dist.barrier()
    stream = memory_bandwidth(device, seconds=seconds / 2)
    links: dict[str, float] = {}
    latency = []
    pairs = link_pairs(ranks)
    for name, (a, b) in pairs.items():
        dist.barrier()
        trip = _ping_pong(a, b, LINK_BYTES, 3, device)
        ping = _ping_pong(a, b, PING_BYTES, 5, device)
        measured = [None] * world
        dist.all_gather_object(measured, (trip, ping))
        links[name] = 2 * LINK_BYTES / measured[a][0]
        latency.append(measured[a][1] / 2)
    costs, call_s, fsdp = {}, 0.0, {}
    if pairs:
        # The call's cost where it is cheapest to see (the first pair: inside a node); the bytes'
        # on the slowest link, a buffer of about 50 ms there.
        call_s = collective_call(*next(iter(pairs.values())), device, latency[0], links[next(iter(pairs))])
        slowest = min(links, key=links.get)
        nbytes = int(min(max(0.05 * links[slowest], 256 << 10), 16 << 20))
        costs = collective_costs(*pairs[slowest], device, nbytes)
        first = next(iter(pairs))
        fsdp = fsdp_costs(*pairs[first], args, device, links[first], costs)
    dist.barrier()
    loaded = _loaded_latency(device)
    rates = [None] * world
    dist.all_gather_object(rates, (flops, stream, loaded))
    if dist.get_rank():
        return None
    return {"machine": cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device),
            "world_size": world, "processes": [[r.node, r.local_rank, r.nic] for r in ranks],
            "device_flops": alone, "device_flops_shared": statistics.median(r[0] for r in rates),
            "block_overhead_s": overhead,
            "memory_bandwidth": statistics.median(r[1] for r in rates),
            "links": links, "latency_s": statistics.median(latency) if latency else 0.0,
            "loaded_latency_s": rates[0][2], "collective_cost": costs,
            "collective_call_s": call_s, "fsdp_cost": fsdp}
