"""Tensor-parallel scaling on CPU: tokens/s and per-rank memory for tp ∈ {1, 2, 4}, side by side.

Each contender trains the same model on the same batches through `launch.train`'s code path, in
local ranks (one intra-op thread each, plus tp=1 with two threads: one process using both
cores). It reports the median step time over steady-state steps, tokens/s, and per rank: the
bytes of parameters + gradients + optimizer state it holds, the activations autograd keeps for
backward, and its peak resident memory (which includes the ~0.3 GB of the PyTorch runtime).

    python -m benchmarks.tp_scaling            # ~40 seconds on 2 cores
    python -m benchmarks.tp_scaling --quick    # ~20 seconds

On a 2-core machine tp=4 runs four ranks on two cores, so its throughput measures the cost of
TP's communication and of oversubscription together; the memory figures are what TP is for.
"""
from __future__ import annotations

import argparse
import tempfile

from benchmarks.common import emit, measure_training, summarize

WARMUP = 2
BATCH, SEQ = 8, 256


def main() -> None:
    from launch.spawn import run_ranks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--model", default="tiny", help="model config name")
    args = parser.parse_args()
    steps = args.steps or (6 if args.quick else 16)
    base = [f"model={args.model}", f"train.global_batch_size={BATCH}", f"train.micro_batch_size={BATCH}",
            f"train.seq_len={SEQ}", "logging.every=100000"]
    # (name, tp, threads per rank): one thread per rank, plus one process using both cores.
    contenders = [("tp1", 1, 1), ("tp1-2threads", 1, 2), ("tp2", 2, 1), ("tp4", 4, 1)]
    results = {}
    for name, tp, threads in contenders:
        with tempfile.TemporaryDirectory() as run_dir:
            out = run_ranks(measure_training, tp, timeout_s=1800,
                            args=([*base, f"parallel.tp={tp}", f"run_dir={run_dir}"], steps, threads))
        r = results[name] = {"tp": tp, "threads_per_rank": threads, **summarize(out, WARMUP, BATCH * SEQ)}
        print(f"{name:13s}: {r['tokens_per_s']:8,.0f} tokens/s  step {r['step_s'] * 1e3:7.1f} ms  "
              f"state {r['state_mb_per_rank']:6.2f} MB/rank  activations {r['activation_mb_per_rank']:6.1f} MB/rank  "
              f"peak RSS {r['peak_rss_mb_per_rank']:6.0f} MB/rank", flush=True)

    one = results["tp1"]
    print("\ncontender      tokens/s  speed vs tp1  state/rank vs tp1")
    for name, r in results.items():
        print(f"{name:13s}  {r['tokens_per_s']:8,.0f}  {r['tokens_per_s'] / one['tokens_per_s']:11.2f}x"
              f"  {r['state_mb_per_rank'] / one['state_mb_per_rank']:17.3f}")
    emit("tp_scaling", {"model": args.model, "steps": steps, "tokens_per_step": BATCH * SEQ,
                        "results": {k: {m: round(v, 4) for m, v in r.items()} for k, r in results.items()}})


if __name__ == "__main__":
    main()
