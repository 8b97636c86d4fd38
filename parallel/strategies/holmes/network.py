"""What a run knows about its machines: every process's node and NIC class, the Holmes placement
built from them, and the rates `parallel.pp_layers=auto` balances with.

All of it is agreed on by every rank: each rank reports itself once over the default group
(`all_gather_object`) and the same pure functions run everywhere on the same inputs.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from parallel.mesh import Topology
from parallel.strategies.holmes.partition import LayerCosts, balance, rank_times, reduction_factor
from parallel.strategies.holmes.placement import RankInfo, described_ranks, holmes_placement
from runtime.accounting import probe_peak_flops
from runtime.flops import attention_flops_per_token

GBIT = 1e9 / 8  # bytes per second in one Gbit/s


def gather_ranks(node_rank: int, local_rank: int, nic: str) -> list[RankInfo]:
    """Every process's RankInfo, indexed by process rank (a collective over the default group)."""
    mine = RankInfo(node=node_rank, local_rank=local_rank, nic=nic)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [mine]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def process_ranks(cluster, world_size: int, node_rank: int, local_rank: int, detected_nic: str) -> list[RankInfo]:
    """The processes of this job: as described by `cluster.nodes` (node ranks in the listed
    order), else as every rank detects itself."""
    if cluster.nodes:
        return described_ranks(cluster.nodes, world_size)
    return gather_ranks(node_rank, local_rank, detected_nic)


def place(topo: Topology, ranks: list[RankInfo], cluster, how: str) -> Topology:
    if how == "megatron" or topo.world_size == 1:
        return topo
    speed = {name: spec.speed_rank for name, spec in cluster.classes.items()}
    return holmes_placement(topo, ranks, speed)


# --- rates for the self-adapting partition ------------------------------------------------------

def allreduce_bandwidth(group, size: int, device: torch.device, nbytes: int = 1 << 22) -> float:
    """Bus bandwidth (bytes/s) of an all-reduce over `group`; infinite for a group of one."""
    if group is None or size == 1:
        return float("inf")
    buf = torch.zeros(nbytes // 4, device=device)
    dist.all_reduce(buf, group=group)  # connect first
    start = time.perf_counter()
    dist.all_reduce(buf, group=group)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * (size - 1) / size * nbytes / (time.perf_counter() - start)


def layer_costs(model, topo: Topology, tokens_per_step: int, grad_bytes: int, seq_len: int = 0) -> LayerCosts:
    """Per-rank FLOPs and gradient bytes of each layer, the head (with multi-token prediction's
    blocks and their passes through it) and the embedding of `model` (any device, meta included).
    Dense weights are split over tp, experts over ep·etp, and top_k of num_experts experts
    compute per token; attention scores over `seq_len` positions count as runtime/flops.py does."""
    args = model.args
    share = args.moe.top_k / args.moe.num_experts if args.moe is not None else 1.0
    tokens = tokens_per_step / (topo.dp * topo.cp)
    scores = attention_flops_per_token(args, seq_len) / (args.n_layers + args.mtp_depth) if seq_len else 0.0

    def cost(block) -> tuple[float, float]:
        flops_params = grad_params = 0.0
        for name, p in block.named_parameters():
            if ".experts." in f".{name}":
                grad_params += p.numel() / (topo.ep * topo.etp)
                flops_params += p.numel() * share / topo.etp
            else:
                grad_params += p.numel() / topo.tp
                flops_params += p.numel() / topo.tp
        return (6 * flops_params + scores / topo.tp) * tokens, grad_params * grad_bytes

    layers = [cost(b) for i, b in model.layers.items() if int(i) < args.n_layers]
    mtp = [cost(b) for i, b in model.layers.items() if int(i) >= args.n_layers]
    head = model.output.weight.numel() / topo.tp
    embedding = model.tok_embeddings.weight.numel() / topo.tp
    return LayerCosts(layer_flops=[f for f, _ in layers], layer_grad_bytes=[g for _, g in layers],
                      head_flops=6 * head * tokens * (1 + args.mtp_depth) + sum(f for f, _ in mtp),
                      head_grad_bytes=head * grad_bytes + sum(g for _, g in mtp),
                      embedding_grad_bytes=embedding * grad_bytes)


def stage_rates(cfg, topo: Topology, groups, ranks: list[RankInfo], device: torch.device) -> tuple[list, list]:
    """(FLOP/s, DP bandwidth in bytes/s) of each pipeline rank: described where the cluster
    gives them, measured otherwise; the slowest member of a stage sets its rate."""
    cluster = cfg.cluster
    described_flops = bool(cluster.nodes) and all(n.tflops for n in cluster.nodes)
    described_bw = bool(cluster.nodes)
    # All ranks probe at once, so shared cores are shared here as in training.
    flops = 0.0 if described_flops else probe_peak_flops(device, torch.float32, seconds=0.2, n=256)
    bw = 0.0 if described_bw else allreduce_bandwidth(groups["dp_cp"], groups.size("dp_cp"), device)
    measured = [(flops, bw)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        measured = [None] * dist.get_world_size()
        dist.all_gather_object(measured, (flops, bw))
    stage_flops, stage_bw = [], []
    for stage in range(topo.pp):
        members = [g[stage] for g in topo.groups("pp")]
        if described_flops:
            stage_flops.append(min(cluster.nodes[ranks[r].node].tflops for r in members) * 1e12)
        else:
            stage_flops.append(sorted(m[0] for m in measured)[len(measured) // 2])  # one device kind: the median
        if described_bw:
            stage_bw.append(min(class_gbps(cluster, {ranks[q].nic for q in topo.group_of("dp_cp", r)})
                                for r in members) * GBIT)
        else:
            stage_bw.append(min(measured[r][1] for r in members))
    return stage_flops, stage_bw


def class_gbps(cluster, nics: set[str]) -> float:
    """Bandwidth of a group over NIC classes `nics`: its class's, or between classes the
    described cross-class rate (else the slowest class's)."""
    rates = [cluster.classes[n].gbps for n in nics]
    if len(nics) > 1 and cluster.cross_gbps:
        return cluster.cross_gbps
    return min(rates)


def auto_pp_layers(cfg, model, topo: Topology, groups, ranks: list[RankInfo], device: torch.device) -> list[int]:
    """Layer counts per stage for `parallel.pp_layers=auto` (the same on every rank)."""
    return split_for_rates(cfg, model, topo, *stage_rates(cfg, topo, groups, ranks, device))


def split_for_rates(cfg, model, topo: Topology, flops: list[float], bandwidth: list[float]) -> list[int]:
    """Layer counts per stage for pipeline ranks of these FLOP/s and DP bandwidths (bytes/s)."""
    p, t = cfg.parallel, cfg.train
    grad_bytes = 8 if t.dtype.value == "float64" else 4
    costs = layer_costs(model, topo, t.global_batch_size * t.seq_len, grad_bytes, t.seq_len)
    factor = reduction_factor(topo.dp * topo.cp, p.dp_impl.value, p.reshard_after_forward)
    per_layer, fixed = rank_times(costs, topo.pp, flops, bandwidth, factor)
    return balance(topo.pp, p.vpp, per_layer, fixed)
