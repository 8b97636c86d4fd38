"""The planner's memory estimate against the measured peak, per layout (issue 16, acceptance 1).

Ten layouts of `tiny` and `tiny_moe` on 1–2 local ranks (the test harness's forkserver ranks),
3 steps each; the measured peak is the largest per-step peak of any rank (`memory_gib_ranks`:
VmHWM on CPU). The floor is measured by the same harness on planner/calibrate.py's
FLOOR_MODEL (one 8-wide layer).

    python -m benchmarks.plan_memory      # ~2 minutes on 2 cores

The estimate uses planner/calibrate.py's memory_calibration per model (its heap probe: ~4 s). "above
the floor" compares the parts above the floor: the model's share, which the floor does not hide.
"""
from __future__ import annotations

import dataclasses
import tempfile

import torch

from benchmarks.common import emit
from launch.config import compose
from launch.spawn import run_ranks
from launch.planner.calibrate import FLOOR_MODEL, memory_calibration
from launch.planner.estimate import estimate_memory
from launch.planner.layouts import Layout
from runtime.metrics import read_metrics
from runtime.model import ModelArgs

BASE = ["train.steps=3", "logging.every=1000", "checkpoint.every=0"]
CASES = {
    "tiny-1": (1, ["model=tiny"]), "tiny-dp2": (2, ["model=tiny"]),
    "tiny-ddp2": (2, ["model=tiny", "parallel.dp_impl=ddp"]),
    "tiny-tp2": (2, ["model=tiny", "parallel.tp=2", "parallel.sp=true"]), "tiny-pp2": (2, ["model=tiny", "parallel.pp=2"]),
    "tiny-cp2": (2, ["model=tiny", "parallel.cp=2"]),
    "tiny-ac-full-dp2": (2, ["model=tiny", "parallel.activation_checkpoint=full"]),
    "moe-1": (1, ["model=tiny_moe"]), "moe-ep2": (2, ["model=tiny_moe", "parallel.ep=2"]),
    "moe-dp2": (2, ["model=tiny_moe"]),
}


def _train(rank: int, world: int, overrides: list[str]) -> None:
    from launch.train import run

    run(compose(overrides))


def measured_peak(world: int, overrides: list[str]) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        run_ranks(_train, world, args=([*BASE, *overrides, f"run_dir={run_dir}"],), timeout_s=300)
        return max(max(r["memory_gib_ranks"]) for r in read_metrics(run_dir)) * 2**30


def main() -> None:
    floors = {world: measured_peak(world, FLOOR_MODEL) for world in (1, 2)}
    results, calibrations = {}, {}
    for name, (world, overrides) in CASES.items():
        cfg = compose([*overrides, "run_dir=unused"])
        args = ModelArgs.from_config(cfg.model)
        if cfg.model.name not in calibrations:
            calibrations[cfg.model.name] = memory_calibration(args, torch.float32, 0.0)
        calibration = dataclasses.replace(calibrations[cfg.model.name], floor_bytes=floors[world])
        layout = Layout.from_config(cfg, world)
        estimate = estimate_memory(args, layout, seq_len=cfg.train.seq_len, global_batch_size=cfg.train.global_batch_size,
                                   dtype="float32", dp_impl=cfg.parallel.dp_impl.value,
                                   calibration=calibration)
        measured = measured_peak(world, overrides)
        results[name] = {"estimate_mb": round(estimate.total / 1e6, 1), "measured_mb": round(measured / 1e6, 1),
                         "error": round(estimate.total / measured - 1, 3),
                         "model_part_error": round((estimate.total - floors[world]) / (measured - floors[world]) - 1, 3)}
        print(f"{name:18s} estimate {estimate.total / 1e6:7.1f} MB  measured {measured / 1e6:7.1f} MB  "
              f"error {results[name]['error']:+.1%}  (above the floor: {results[name]['model_part_error']:+.1%})",
              flush=True)
    emit("plan_memory", {"floors_mb": {w: round(f / 1e6, 1) for w, f in floors.items()}, "results": results,
                         "within_15pct": sum(abs(r["error"]) <= 0.15 for r in results.values())})


if __name__ == "__main__":
    main()
