"""The planner's ranking against measurement on the emulated mixed cluster (issue 16, acceptance 2).

Four nodes × two ranks in network namespaces (launch/cluster.py, static node ranks), nodes 0 and
2 "ib" (links not limited), 1 and 3 "ethernet" (links limited by `tc tbf` to --slow-rate): the
machine `cluster=mixed_4x2` describes. Then:

1. `torchrun -m launch.plan --probe` on every node measures the cluster (floor, FLOP/s with all
   eight ranks busy, memory bandwidth, intra-node, ib, ethernet and cross-class links);
2. the planner ranks every valid layout of the model that fits (its estimate only);
3. the contenders: among the fitting layouts predicted within --span of the best (layouts with
   the same predicted time counted once), --layouts of them evenly spaced in predicted order,
   the planner's first choice always among them — chosen before anything is measured;
4. each contender trains --steps steps through `torchrun -m launch.train` on the same cluster;
   its median step time after --warmup is compared with the prediction.

Reported: Spearman's rank correlation of predicted and measured times (target ≥ 0.8) and the
first choice's measured time over the fastest measured (target ≤ 1.10). Needs root and `ip netns`.

    python -m benchmarks.plan_ranking            # ~12 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks.common import emit, median
from launch.cluster import EmulatedCluster, available
from launch.config import compose
from launch.plan import load_calibration
from parallel.strategies.holmes.placement import described_ranks
from launch.planner.planner import make_plan
from runtime.metrics import read_metrics

NICS = ["ib", "ethernet", "ib", "ethernet"]
MODEL = ["model.n_layers=8", "model.dim=256", "model.n_heads=8", "model.n_kv_heads=4", "model.ffn_dim=688",
         "train.seq_len=64", "train.global_batch_size=16", "cluster=mixed_4x2"]


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(xs):
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        out = [0.0] * len(xs)
        for r, i in enumerate(order):
            out[i] = float(r)
        return out

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def contenders(fitting, count: int, span: float):
    """`count` layouts evenly spaced in predicted order among those within `span` × the best,
    distinct predicted times only; the first is the planner's choice."""
    best = fitting[0].time.total
    distinct, seen = [], set()
    for e in fitting:
        key = round(e.time.total / best, 3)
        if e.time.total <= span * best and key not in seen:
            seen.add(key)
            distinct.append(e)
    if len(distinct) <= count:
        return distinct
    return [distinct[round(i * (len(distinct) - 1) / (count - 1))] for i in range(count)]


def launch(module: str, args: list[str], run_dir: Path, rate: str, deadline_s: float) -> None:
    with EmulatedCluster(4, [None, rate, None, rate], NICS) as cluster:
        results = cluster.torchrun(2, args, str(run_dir), deadline_s=deadline_s, module=module, static=True)
    failed = [r for r in results if r.returncode != 0]
    if failed:
        log = failed[0].output
        start = log.find("Traceback")  # the worker's own error, ahead of torchrun's summary
        sys.exit(f"{module} {' '.join(args)}: node {failed[0].node} exited {failed[0].returncode}:\n"
                 f"{log[start:start + 4000] if start >= 0 else log[-3000:]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slow-rate", default="200mbit")
    parser.add_argument("--layouts", type=int, default=7)
    parser.add_argument("--span", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    reason = available()
    if reason:
        sys.exit(f"benchmarks.plan_ranking: {reason}")
    with tempfile.TemporaryDirectory(prefix="plan-ranking-") as tmp:
        root = Path(tmp)
        probe_file = root / "calibration.json"
        launch("launch.plan", ["--probe", str(probe_file), *MODEL], root / "probe", args.slow_rate, 600)
        cfg = compose([*MODEL, "run_dir=unused"])
        processes = described_ranks(cfg.cluster.nodes, 8)
        calibration = load_calibration(str(probe_file), processes, cfg.model.name)
        plan = make_plan(cfg, processes, calibration)
        chosen = contenders(plan.fitting, args.layouts, args.span)
        print(f"probe: {probe_file.read_text()}\n{len(plan.fitting)} layouts fit; measuring {len(chosen)}", flush=True)
        rows = []
        for i, e in enumerate(chosen):
            run_dir = root / f"layout{i}"
            launch("launch.train", [*MODEL, *e.layout.overrides(), f"train.steps={args.steps}", "logging.every=1000",
                                    "checkpoint.every=0", "train.device=cpu"], run_dir, args.slow_rate, 900)
            measured = median([r["step_time_s"] for r in read_metrics(run_dir)][args.warmup:])
            rows.append({"layout": e.layout.describe(), "predicted_s": e.time.total, "measured_s": measured,
                         "predicted": {k: round(v, 4) for k, v in e.time.__dict__.items()},
                         "memory_gib": e.memory.total / 2**30})
            print(f"{e.layout.describe():<40} predicted {e.time.total:7.3f}s  measured {measured:7.3f}s", flush=True)
        calibration_data = json.loads(probe_file.read_text())
    rho = spearman([r["predicted_s"] for r in rows], [r["measured_s"] for r in rows])
    fastest = min(r["measured_s"] for r in rows)
    first = rows[0]["measured_s"] / fastest
    print(f"Spearman {rho:.3f} (target ≥ 0.8); first choice / fastest measured {first:.3f} (target ≤ 1.10)")
    emit("plan_ranking", {"slow_rate": args.slow_rate, "steps": args.steps, "warmup": args.warmup,
                          "fitting_layouts": len(plan.fitting), "calibration": calibration_data, "layouts": rows,
                          "spearman": rho, "first_over_fastest": first,
                          "targets": {"spearman": 0.8, "first_over_fastest": 1.10}})


if __name__ == "__main__":
    main()
