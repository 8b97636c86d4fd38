"""Holmes placement and partition on an emulated heterogeneous cluster.

Four nodes × two ranks in network namespaces (launch/cluster.py), node ranks fixed by a static
rendezvous; nodes 0 and 2 are "ib" (links not limited), nodes 1 and 3 "ethernet" with their
links limited by `tc tbf` to --slow-rate in both directions — the interleaved order a scheduler
hands out for a mixed allocation. One model (8 layers, dim 256), tp=2 × pp=2 × dp=2, DDP, trained
through `torchrun -m launch.train` on every node:

    megatron   Megatron's order (tp-cp-ep-dp-pp on process ranks), even split: every DP group
               spans an ib and an ethernet node, so every gradient all-reduce crosses a slow link
    holmes     Holmes placement (stage 0 on the ib nodes, stage 1 on the ethernet nodes) and
               parallel.pp_layers=auto (layers by measured compute rate and DP bandwidth)
    placement  Holmes placement with the even split (the placement's share of the gain)
    all-fast   the same cluster with no link limited, every node "ib", Megatron's order

Reported: the median step time over the steps after --warmup, and the ratios holmes/megatron
(target ≤ 0.8) and holmes/all-fast (target ≤ 1.3). Needs root and `ip netns`.

    python -m benchmarks.holmes            # ~6 minutes
    python -m benchmarks.holmes --quick    # ~2 minutes
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from benchmarks.common import emit, median
from launch.cluster import EmulatedCluster, available
from runtime.metrics import read_metrics

NICS = ["ib", "ethernet", "ib", "ethernet"]
MODEL = ["model.n_layers=8", "model.dim=256", "model.n_heads=8", "model.n_kv_heads=4", "model.ffn_dim=688",
         "train.seq_len=64", "train.global_batch_size=16", "train.micro_batch_size=2"]
LAYOUT = ["parallel.tp=2", "parallel.pp=2", "parallel.dp=2", "parallel.dp_impl=ddp"]

CONTENDERS = {
    "megatron": (True, ["parallel.placement=megatron"]),
    "holmes": (True, ["parallel.placement=holmes", "parallel.pp_layers=auto"]),
    "placement": (True, ["parallel.placement=holmes"]),
    "all-fast": (False, ["parallel.placement=megatron"]),
}


def run(name: str, slow: bool, extra: list[str], steps: int, rate: str, root: Path) -> dict:
    rates = [None, rate, None, rate] if slow else [None] * 4
    nics = NICS if slow else ["ib"] * 4
    run_dir = root / name
    overrides = [*MODEL, *LAYOUT, *extra, f"train.steps={steps}", "optim.warmup_steps=2", "logging.every=1000",
                 "train.device=cpu"]
    with EmulatedCluster(4, rates, nics) as cluster:
        results = cluster.torchrun(2, overrides, str(run_dir), deadline_s=900, static=True)
    failed = [r for r in results if r.returncode != 0]
    if failed:
        sys.exit(f"{name}: node {failed[0].node} exited {failed[0].returncode}:\n{failed[0].output[-3000:]}")
    records = read_metrics(run_dir)
    layers = OmegaConf.load(run_dir / "config.yaml").parallel.pp_layers  # as resolved by the run
    return {"step_times": [r["step_time_s"] for r in records], "losses": [r["loss"] for r in records],
            "pp_layers": None if layers is None else list(layers)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--slow-rate", default="200mbit")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    reason = available()
    if reason:
        sys.exit(f"benchmarks.holmes: {reason}")
    steps = args.steps or (8 if args.quick else 20)
    out = {}
    with tempfile.TemporaryDirectory(prefix="holmes-") as root:
        for name, (slow, extra) in CONTENDERS.items():
            r = run(name, slow, extra, steps, args.slow_rate, Path(root))
            r["step_time_s"] = median(r["step_times"][args.warmup:])
            out[name] = r
            print(f"{name:>10}: median step {r['step_time_s']:.3f}s  pp_layers {r['pp_layers']}", flush=True)
    worst = max(abs(a - b) / abs(a) for a, b in zip(out["megatron"]["losses"], out["holmes"]["losses"]))
    ratios = {"holmes/megatron": out["holmes"]["step_time_s"] / out["megatron"]["step_time_s"],
              "holmes/all-fast": out["holmes"]["step_time_s"] / out["all-fast"]["step_time_s"],
              "placement/megatron": out["placement"]["step_time_s"] / out["megatron"]["step_time_s"]}
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    print(f"max relative loss difference holmes vs megatron: {worst:.1e}")
    emit("holmes", {"slow_rate": args.slow_rate, "steps": steps, "warmup": args.warmup,
                    "step_time_s": {k: v["step_time_s"] for k, v in out.items()},
                    "pp_layers": {k: v["pp_layers"] for k, v in out.items()},
                    "ratios": ratios, "max_rel_loss_diff": worst,
                    "targets": {"holmes/megatron": 0.8, "holmes/all-fast": 1.3}})


if __name__ == "__main__":
    main()
