"""The collective monitor's cost, side by side: the same 2-rank training run (FSDP2, tiny model,
sample data) with `monitor.enabled=true` and `false`, alternating, reporting tokens/s and their
ratio (target ≥ 0.97).

    python -m benchmarks.monitor            # ~2 minutes
    python -m benchmarks.monitor --quick
"""
from __future__ import annotations

import argparse
import tempfile

from benchmarks.common import emit, median
from launch.spawn import run_ranks
from runtime.metrics import read_metrics

WARMUP = 3


def _train(rank: int, world: int, overrides: list[str]) -> None:
    from launch.config import compose
    from launch.train import run

    run(compose(overrides))


def tokens_per_s(enabled: bool, steps: int) -> list[float]:
    with tempfile.TemporaryDirectory() as run_dir:
        overrides = ["model=tiny", "data=sample", f"train.steps={steps}", "logging.every=100000",
                     f"monitor.enabled={str(enabled).lower()}", f"run_dir={run_dir}"]
        run_ranks(_train, 2, args=(overrides,), timeout_s=600)
        return [r["tokens_per_s"] for r in read_metrics(run_dir)][WARMUP:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds, steps = (2, 15) if args.quick else (4, 30)
    on, off = [], []
    for r in range(rounds):
        for enabled in ((True, False) if r % 2 == 0 else (False, True)):
            (on if enabled else off).extend(tokens_per_s(enabled, steps))
        print(f"round {r + 1}/{rounds}: monitor on {median(on):,.0f} tok/s, off {median(off):,.0f} tok/s", flush=True)
    ratio = median(on) / median(off)
    print(f"ratio on / off = {ratio:.3f} (target ≥ 0.97)")
    emit("monitor", {"world": 2, "model": "tiny", "rounds": rounds, "steps": steps,
                     "tokens_per_s_on": median(on), "tokens_per_s_off": median(off), "ratio": ratio})


if __name__ == "__main__":
    main()
