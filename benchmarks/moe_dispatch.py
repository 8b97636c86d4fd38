"""MoE layer throughput with expert parallelism, folded and not, on an emulated two-node machine.

8 local ranks (gloo) form 2 emulated nodes of 4; attention would be laid out tp=2 × dp=4, so the
MoE layer's expert view is etp × ep × edp over the same ranks. "Folded" (etp=1) puts EP on
neighbouring ranks — TP and DP ranks of one node; "unfolded" (etp = tp = 2, Megatron's layout
before folding) strides EP across data-parallel ranks. Traffic between the nodes is emulated:
after each of the dispatcher's all-to-alls a rank waits for (bytes it sent to the other node) /
link bandwidth (a byte-proportional comm wrapper, docs/architecture.md, "Emulation": a 2-core machine has no second
node). One MoE layer (16 experts, top-2, 2,048 tokens per rank) runs forward and backward;
tokens/s counts all ranks' tokens.

    python -m benchmarks.moe_dispatch            # ~2 minutes
    python -m benchmarks.moe_dispatch --quick    # ~1 minute
"""
from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch

from benchmarks.common import emit, median

WORLD, NODE = 8, 4
E, K, DIM, HIDDEN, TOKENS = 16, 2, 128, 128, 2048


def _run(rank: int, world: int, ep: int, etp: int, steps: int, link_mb_s: float) -> dict:
    import parallel.expert as expert
    from parallel.expert import apply_ep
    from parallel.groups import build_groups
    from parallel.mesh import Topology
    from parallel.sharding import ShardingPlan
    from runtime.moe import MoE, MoEArgs

    torch.set_num_threads(1)
    topo = Topology.from_config(SimpleNamespace(tp=2, cp=1, pp=1, ep=ep, etp=etp, dp=-1, order="tp-cp-ep-dp-pp"), world)
    groups = build_groups(topo, "cpu", timeout_s=120)
    moe = MoE(DIM, MoEArgs(E, K, HIDDEN), ffn_factory=None)
    holder = SimpleNamespace(layers={"0": SimpleNamespace(feed_forward=moe)}, sharding=ShardingPlan())
    apply_ep(holder, groups, SimpleNamespace(parallel=SimpleNamespace(moe_backend="ep", sp=True)))
    moe.to_empty(device="cpu")
    torch.manual_seed(rank)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.02)
    moe.expert_bias.zero_()

    # Emulated inter-node link: each all-to-all costs this rank's off-node bytes / bandwidth.
    plain = expert._all_to_all_v
    ep_ranks = groups.ranks["ep"]

    def slow_all_to_all(x, send, recv, group):
        out = plain(x, send, recv, group)
        off_node = sum(n for j, n in enumerate(send) if ep_ranks[j] // NODE != rank // NODE)
        time.sleep(off_node * x.shape[-1] * x.element_size() / (link_mb_s * 1e6))
        return out

    expert._all_to_all_v = slow_all_to_all
    x = torch.randn(TOKENS, DIM, generator=torch.Generator().manual_seed(100 + rank), requires_grad=True)
    times = []
    for _ in range(steps):
        torch.distributed.barrier()
        start = time.perf_counter()
        moe(x).sum().backward()
        torch.distributed.barrier()
        times.append(time.perf_counter() - start)
    sent = moe.dispatcher.bytes_to if hasattr(moe.dispatcher, "bytes_to") else {}
    cross = sum(n for dst, n in sent.items() if dst // NODE != rank // NODE) / steps
    return {"times": times, "cross_node_bytes": cross, "ep_group": ep_ranks}


def main() -> None:
    from launch.spawn import run_ranks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--link-mb-s", type=float, default=100.0, help="emulated inter-node bandwidth, MB/s")
    args = parser.parse_args()
    steps = 3 if args.quick else 6
    contenders = [("ep1", 1, 1), ("ep2-folded", 2, 1), ("ep2-unfolded", 2, 2),
                  ("ep4-folded", 4, 1), ("ep4-unfolded", 4, 2)]
    results = {}
    for name, ep, etp in contenders:
        out = run_ranks(_run, WORLD, args=(ep, etp, steps, args.link_mb_s), timeout_s=1800)
        step = median([max(r["times"][i] for r in out) for i in range(1, steps)])
        results[name] = {"ep": ep, "etp": etp, "step_s": round(step, 4), "tokens_per_s": round(WORLD * TOKENS / step, 1),
                         "cross_node_mb_per_step": round(sum(r["cross_node_bytes"] for r in out) / 1e6, 3),
                         "ep_group_of_rank0": out[0]["ep_group"]}
        r = results[name]
        print(f"{name:13s} EP group {str(r['ep_group_of_rank0']):14s} {r['tokens_per_s']:9,.0f} tokens/s  "
              f"cross-node {r['cross_node_mb_per_step']:6.2f} MB/step", flush=True)
    for ep in (2, 4):
        f, u = results[f"ep{ep}-folded"], results[f"ep{ep}-unfolded"]
        print(f"ep={ep}: folded / unfolded throughput = {f['tokens_per_s'] / u['tokens_per_s']:.2f}x")
    emit("moe_dispatch", {"world": WORLD, "node_size": NODE, "experts": E, "top_k": K, "tokens_per_rank": TOKENS,
                          "link_mb_s": args.link_mb_s, "steps": steps, "results": results})


if __name__ == "__main__":
    main()
