"""Context parallelism on CPU at a long sequence: tokens/s and per-rank memory for cp ∈ {1, 2, 4}.

The `tiny` model trains one 4096-token sequence per step through `launch.train`'s code path,
with cp = 1 (one thread, and two threads: one process using both cores), cp = 2 and cp = 4 with
ring attention, and cp = 2 with Ulysses attention, each rank one thread. Per rank: the bytes of
activations autograd keeps for backward (what context parallelism divides), the model state,
and peak resident memory; and the slowest rank's median step time.

    python -m benchmarks.context_parallel            # ~2 minutes on 2 cores
    python -m benchmarks.context_parallel --quick    # ~1 minute
"""
from __future__ import annotations

import argparse
import tempfile

from benchmarks.common import emit, measure_training, summarize

WARMUP = 1


def main() -> None:
    from launch.spawn import run_ranks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    steps = args.steps or (3 if args.quick else 5)
    base = ["model=tiny", "train.global_batch_size=1", "train.micro_batch_size=1",
            f"train.seq_len={args.seq_len}", "logging.every=100000"]
    contenders = [("cp1", 1, 1, "ring"), ("cp1-2threads", 1, 2, "ring"), ("cp2-ring", 2, 1, "ring"),
                  ("cp4-ring", 4, 1, "ring"), ("cp2-ulysses", 2, 1, "ulysses")]
    results = {}
    for name, cp, threads, impl in contenders:
        with tempfile.TemporaryDirectory() as run_dir:
            out = run_ranks(measure_training, cp, timeout_s=3600,
                            args=([*base, f"parallel.cp={cp}", f"parallel.cp_impl={impl}", f"run_dir={run_dir}"],
                                  steps, threads))
        r = results[name] = {"cp": cp, "impl": impl, "threads_per_rank": threads,
                             **summarize(out, WARMUP, args.seq_len)}
        print(f"{name:13s}: {r['tokens_per_s']:7,.0f} tokens/s  step {r['step_s']:6.2f} s  "
              f"activations {r['activation_mb_per_rank']:7.1f} MB/rank  state {r['state_mb_per_rank']:5.1f} MB/rank  "
              f"peak RSS {r['peak_rss_mb_per_rank']:5.0f} MB/rank", flush=True)
    one = results["cp1"]
    print("\ncontender      tokens/s  speed vs cp1  activations/rank vs cp1")
    for name, r in results.items():
        print(f"{name:13s}  {r['tokens_per_s']:8,.0f}  {r['tokens_per_s'] / one['tokens_per_s']:11.2f}x"
              f"  {r['activation_mb_per_rank'] / one['activation_mb_per_rank']:23.3f}")
    emit("context_parallel", {"model": "tiny", "seq_len": args.seq_len, "steps": steps,
                              "results": {k: {m: (round(v, 4) if isinstance(v, float) else v) for m, v in r.items()}
                                          for k, r in results.items()}})


if __name__ == "__main__":
    main()
