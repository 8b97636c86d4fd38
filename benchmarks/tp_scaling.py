"""Tensor-parallel scaling on CPU: tokens/s and per-rank memory for tp ∈ {1, 2, 4}, side by side.

Each contender trains the same model on the same batches through `launch.train`'s code path, in
local ranks (one intra-op thread each). It reports the median step time over steady-state steps,
tokens/s, and per rank: the bytes of parameters + gradients + optimizer state it holds, and its
peak resident memory (which includes the ~0.3 GB of the PyTorch runtime itself).

    python -m benchmarks.tp_scaling            # ~3 minutes on 2 cores
    python -m benchmarks.tp_scaling --quick    # ~1 minute

On a 2-core machine tp=4 runs four ranks on two cores, so its throughput measures the cost of
TP's communication and of oversubscription together; the memory figures are what TP is for.
"""
from __future__ import annotations

import argparse
import logging
import resource
import tempfile
import time

import torch

from benchmarks.common import emit, median

WARMUP = 2


def _measure(rank: int, world: int, overrides: list[str], steps: int, threads: int) -> dict:
    from torch.distributed.tensor import DTensor

    from launch.config import compose
    from launch.train import setup

    torch.set_num_threads(threads)
    logging.getLogger("quintet").setLevel(logging.WARNING)
    run = setup(compose(overrides))
    times = []
    for step in range(steps):
        start = time.perf_counter()
        run.trainer.train_step(step)
        times.append(time.perf_counter() - start)
    run.trainer.forward_backward(run.trainer.loader.step(steps))  # gradients to count (a step frees them)
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
    params = list(run.parallel.model.parameters())
    state = params + [p.grad for p in params if p.grad is not None]
    state += [v for p in params for v in run.optimizer.state[p].values() if torch.is_tensor(v) and v.dim() > 0]
    state_bytes = sum(local(t).numel() * local(t).element_size() for t in state)
    return {"times": times, "state_bytes": state_bytes,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--model", default="tiny", help="model config name")
    args = parser.parse_args()
    steps = args.steps or (6 if args.quick else 16)

    from launch.spawn import run_ranks

    base = [f"model={args.model}", "train.global_batch_size=8", "train.micro_batch_size=8",
            "train.seq_len=256", "logging.every=100000"]
    # (name, tp, threads per rank): one thread per rank, plus one process using both cores.
    contenders = [("tp1", 1, 1), ("tp1-2threads", 1, 2), ("tp2", 2, 1), ("tp4", 4, 1)]
    results = {}
    for name, tp, threads in contenders:
        with tempfile.TemporaryDirectory() as run_dir:
            out = run_ranks(_measure, tp, args=([*base, f"parallel.tp={tp}", f"run_dir={run_dir}"], steps, threads),
                            timeout_s=1800)
        step_s = median([max(r["times"][i] for r in out) for i in range(WARMUP, steps)])
        results[name] = {"tp": tp, "threads_per_rank": threads, "step_s": step_s, "tokens_per_s": 8 * 256 / step_s,
                         "state_mb_per_rank": max(r["state_bytes"] for r in out) / 2**20,
                         "peak_rss_mb_per_rank": max(r["peak_rss_bytes"] for r in out) / 2**20}
        r = results[name]
        print(f"{name:13s}: {r['tokens_per_s']:8,.0f} tokens/s  step {r['step_s'] * 1e3:7.1f} ms  "
              f"state {r['state_mb_per_rank']:6.2f} MB/rank  peak RSS {r['peak_rss_mb_per_rank']:6.0f} MB/rank",
              flush=True)

    one = results["tp1"]
    print("\ncontender      tokens/s  speed vs tp1  state/rank vs tp1")
    for name, r in results.items():
        print(f"{name:13s}  {r['tokens_per_s']:8,.0f}  {r['tokens_per_s'] / one['tokens_per_s']:11.2f}x"
              f"  {r['state_mb_per_rank'] / one['state_mb_per_rank']:17.3f}")
    emit("tp_scaling", {"model": args.model, "steps": steps, "tokens_per_step": 8 * 256,
                        "results": {k: {m: round(v, 4) for m, v in r.items()} for k, r in results.items()}})


if __name__ == "__main__":
    main()
