"""Shared helpers of the benchmark scripts: machine description and the JSON result line."""
from __future__ import annotations

import json
import os
import statistics
import time

import torch

from runtime.accounting import cpu_name


def machine() -> dict:
    return {"cpu": cpu_name(), "cores": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d")}


def median(xs) -> float:
    return statistics.median(xs)


def emit(name: str, results: dict) -> None:
    """The last line of every benchmark: one JSON object."""
    print(json.dumps({"benchmark": name, "machine": machine(), **results}))


def measure_training(rank: int, world: int, overrides: list[str], steps: int, threads: int) -> dict:
    """On one local rank: train `steps` steps through `launch.train`'s code path and measure
    step times and waits for data, the bytes of parameters + gradients + optimizer state this rank holds, the
    bytes of activations autograd keeps for backward in one step, and peak resident memory."""
    import logging
    import resource

    from torch.distributed.tensor import DTensor

    from launch.config import compose
    from launch.train import setup

    torch.set_num_threads(threads)
    logging.getLogger("quintet").setLevel(logging.WARNING)
    run = setup(compose(overrides))
    times, waits = [], []
    for step in range(steps):
        start = time.perf_counter()
        run.trainer.train_step(step)
        times.append(time.perf_counter() - start)
        waits.append(run.trainer.accounting.data_wait_s)  # this step's wait for its batch
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run.trainer.forward_backward(run.parallel.local_batches(run.trainer.loader.step(steps)), 1.0)  # leaves gradients to count
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
    params = run.parallel.parameters()
    state = params + [p.grad for p in params if p.grad is not None]
    state += [v for p in params for v in run.optimizer.state[p].values() if torch.is_tensor(v) and v.dim() > 0]
    return {"times": times, "data_wait": waits, "state_bytes": sum(local(t).numel() * local(t).element_size() for t in state),
            "activation_bytes": sum(storages.values()),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def summarize(out: list[dict], warmup: int, tokens_per_step: int) -> dict:
    """Per-contender figures from every rank's `measure_training`: the slowest rank's step time
    (median over steady steps), tokens/s and the largest per-rank memory figures in MB."""
    steps = len(out[0]["times"])
    step_s = median([max(r["times"][i] for r in out) for i in range(warmup, steps)])
    return {"step_s": step_s, "tokens_per_s": tokens_per_step / step_s,
            "state_mb_per_rank": max(r["state_bytes"] for r in out) / 2**20,
            "activation_mb_per_rank": max(r["activation_bytes"] for r in out) / 2**20,
            "peak_rss_mb_per_rank": max(r["peak_rss_bytes"] for r in out) / 2**20}
