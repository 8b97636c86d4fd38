"""FSSDP against expert parallelism under skewed and uniform routing (Hecate's claim).

On 4 and 8 local ranks (gloo), a stack of 4 MoE layers (16 experts, top-2, 1,024 tokens per
rank) runs forward and backward with routing drawn from a Zipf law over the experts (exponent
1.2; which experts are hot is a fixed random permutation) or uniformly. Expert compute is
emulated as work proportional to the rows a device processes — a wait of 20 µs per row forward,
twice that backward — so that the straggler EP suffers under skew shows on a 2-core CPU; the
dispatch, the sparse collectives and the gradients are real. FSSDP (4 hot experts, budget 4
per device, re-planned ownership every 5 steps) warms up for 8 steps, then both contenders run
6 measured steps. Reported per contender: median step time, max/mean rows per device, bytes
moved per step (token dispatch, and FSSDP's sparse collectives), and the peak memory of
materialised expert weights (EP: its owned experts; FSSDP: owned + gathered copies alive).

    python -m benchmarks.fssdp            # ~3 minutes
    python -m benchmarks.fssdp --quick    # ~1.5 minutes
"""
from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch
from torch import nn

from benchmarks.common import emit, median

E, K, DIM, HIDDEN, TOKENS, LAYERS = 16, 2, 64, 64, 1024, 4
ROW_US = 20.0


class _Block(nn.Module):
    def __init__(self, moe):
        super().__init__()
        self.feed_forward = moe

    def forward(self, x, idx, weights):
        return self.feed_forward.dispatcher(x, self.feed_forward.experts, idx, weights, None)


class _EmulatedWork(torch.autograd.Function):
    """Forward: wait ROW_US per row; backward: twice that. Returns the real result unchanged."""

    @staticmethod
    def forward(ctx, out, rows):
        ctx.rows = rows
        time.sleep(rows * ROW_US * 1e-6)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        time.sleep(2 * ctx.rows * ROW_US * 1e-6)
        return grad, None


def _routing(kind: str, rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    if kind == "zipf":
        popularity = torch.randperm(E, generator=torch.Generator().manual_seed(7))  # which expert is hot
        p = torch.zeros(E, dtype=torch.float64)
        p[popularity] = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.2
    else:
        p = torch.ones(E, dtype=torch.float64)
    idx = torch.multinomial(p.expand(TOKENS, E), K, replacement=False, generator=g)
    return idx, torch.full((TOKENS, K), 1.0 / K, dtype=torch.float32)


def _run(rank: int, world: int, mode: str, kind: str, warmup: int, steps: int) -> dict:
    import runtime.moe as moe_mod
    import parallel.strategies.fssdp.layer as fssdp_layer
    from parallel.expert import apply_ep
    from parallel.strategies.fssdp.layer import MaterializedMemory, apply_fssdp
    from parallel.groups import build_groups
    from parallel.mesh import Topology
    from parallel.sharding import ShardingPlan
    from runtime.moe import MoE, MoEArgs

    torch.set_num_threads(1)
    real = moe_mod.grouped_swiglu
    processed = [0]

    def emulated(x, counts, w1, w3, w2):
        processed[0] += x.shape[0]
        return _EmulatedWork.apply(real(x, counts, w1, w3, w2), x.shape[0])

    moe_mod.grouped_swiglu = fssdp_layer.grouped_swiglu = emulated
    topo = Topology.from_config(SimpleNamespace(tp=1, cp=1, pp=1, ep=world, etp=1, dp=-1, order="tp-cp-ep-dp-pp"), world)
    groups = build_groups(topo, "cpu", timeout_s=300)
    fssdp = SimpleNamespace(window=5, hot=4, budget=4, hot_min_ratio=1.25, reshard_every=5,
                            rematerialize=mode == "fssdp-remat", calibrate=False)
    cfg = SimpleNamespace(parallel=SimpleNamespace(moe_backend="ep" if mode == "ep" else "fssdp", sp=True, fssdp=fssdp))
    memory, plan = MaterializedMemory(), ShardingPlan()
    blocks = []
    for layer in range(LAYERS):
        moe = MoE(DIM, MoEArgs(E, K, HIDDEN), ffn_factory=None)
        block = _Block(moe)
        holder = SimpleNamespace(layers={str(layer): block}, sharding=plan, fssdp_memory=memory)
        apply_ep(holder, groups, cfg)
        apply_fssdp(holder, groups, cfg)
        moe.to_empty(device="cpu")
        for p in moe.experts.parameters():
            nn.init.normal_(p, std=0.05)
        blocks.append(block)
    optimizer = torch.optim.SGD([p for b in blocks for p in b.feed_forward.experts.parameters()], lr=0.0)
    times, rows, moved = [], [], []
    for step in range(warmup + steps):
        if mode != "ep":
            for layer, b in enumerate(blocks):
                ex = b.feed_forward.experts
                if step and step % fssdp.reshard_every == 0:
                    ex.reshard(optimizer, plan, f"layers.{layer}.feed_forward.experts")
                ex.plan_step()
                ex.gathered_rows = 0
        idx, weights = _routing(kind, rank, step)
        x = torch.randn(TOKENS, DIM, generator=torch.Generator().manual_seed(step), requires_grad=True)
        processed[0] = 0
        torch.distributed.barrier()
        start = time.perf_counter()
        h = x
        for b in blocks:
            h = b(h, idx, weights)
        h.sum().backward()
        if mode != "ep":
            for b in blocks:
                b.feed_forward.experts.finish()
        torch.distributed.barrier()
        elapsed = time.perf_counter() - start
        counts = torch.bincount(idx.reshape(-1), minlength=E).double()
        torch.distributed.all_reduce(counts)
        if mode != "ep":
            for b in blocks:
                b.feed_forward.experts.observe(counts.tolist())
        if step >= warmup:
            times.append(elapsed)
            rows.append(processed[0])
            sparse = sum(b.feed_forward.experts.gathered_rows for b in blocks) * 2 if mode != "ep" else 0
            row_bytes = 3 * DIM * HIDDEN * 4
            moved.append(sparse * row_bytes)
        optimizer.zero_grad(set_to_none=True)
    own = sum(p.numel() * p.element_size() for b in blocks for p in b.feed_forward.experts.parameters())
    return {"times": times, "rows": rows, "sparse_bytes": moved,
            "materialized_peak": own if mode == "ep" else memory.peak}


def main() -> None:
    from launch.spawn import run_ranks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    warmup, steps = 8, (3 if args.quick else 6)
    worlds = (4,) if args.quick else (4, 8)
    results = {}
    for world in worlds:
        for kind in ("zipf", "uniform"):
            for mode in ("ep", "fssdp", "fssdp-remat"):
                out = run_ranks(_run, world, args=(mode, kind, warmup, steps), timeout_s=3600)
                step = median([max(r["times"][i] for r in out) for i in range(steps)])
                loads = [median([r["rows"][i] for i in range(steps)]) for r in out]
                res = {"step_s": round(step, 4), "max_over_mean_rows": round(max(loads) / (sum(loads) / world), 3),
                       "sparse_mb_per_step": round(sum(median(r["sparse_bytes"]) for r in out) / 1e6, 3),
                       "materialized_peak_mb": round(max(r["materialized_peak"] for r in out) / 1e6, 3)}
                results[f"{world}/{kind}/{mode}"] = res
                print(f"world {world} {kind:7s} {mode:11s} step {res['step_s'] * 1e3:7.1f} ms  "
                      f"max/mean rows {res['max_over_mean_rows']:5.2f}  sparse {res['sparse_mb_per_step']:6.2f} MB/step  "
                      f"materialised peak {res['materialized_peak_mb']:6.2f} MB", flush=True)
    summary = {}
    for world in worlds:
        ep, fs = results[f"{world}/zipf/ep"], results[f"{world}/zipf/fssdp"]
        summary[str(world)] = {
            "skew_fssdp_over_ep": round(fs["step_s"] / ep["step_s"], 3),
            "skew_fssdp_max_over_mean": fs["max_over_mean_rows"], "skew_ep_max_over_mean": ep["max_over_mean_rows"],
            "uniform_fssdp_over_ep": round(results[f"{world}/uniform/fssdp"]["step_s"] / results[f"{world}/uniform/ep"]["step_s"], 3),
            "remat_memory_ratio": round(results[f"{world}/zipf/fssdp-remat"]["materialized_peak_mb"] / fs["materialized_peak_mb"], 3),
        }
        s = summary[str(world)]
        print(f"\nworld {world}: skew FSSDP/EP step {s['skew_fssdp_over_ep']:.2f} (target ≤ 0.75); FSSDP max/mean "
              f"{s['skew_fssdp_max_over_mean']:.2f} (≤ 1.25; EP {s['skew_ep_max_over_mean']:.2f}); uniform FSSDP/EP "
              f"{s['uniform_fssdp_over_ep']:.2f} (≤ 1.05); re-materialisation memory {s['remat_memory_ratio']:.2f} (≤ 0.5)")
    emit("fssdp", {"experts": E, "top_k": K, "tokens_per_rank": TOKENS, "layers": LAYERS, "row_us": ROW_US,
                   "warmup": warmup, "steps": steps, "results": results, "summary": summary})


if __name__ == "__main__":
    main()
