"""What a rehearsal costs against the world size: `llama3_405b` at 64 → 16,384 ranks.

One layout grown only in data parallelism — tp8 × pp8 (16 layers a stage, the first and last 15)
× dp = world / 64, 8K context, bf16, FSDP — rehearsed for its rank 0 in a fresh process per world
size (launch/rehearse.py, `--no-step`: what a rank's step costs does not depend on the world
size, every tensor being a rank's own shape; the step is timed once, at the smallest world).
Reported per world size: the process groups built (`dist.new_group` calls: every rank builds
every group of the world), the seconds building them and in all, the peak resident memory of
the process, and the seconds per thousand groups — flat when the cost grows linearly in the
groups built.

    python -m benchmarks.rehearse                      # ~2 minutes on 2 cores
    python -m benchmarks.rehearse --worlds 64,1024
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

LAYOUT = ["model=llama3_405b", "parallel.tp=8", "parallel.sp=true", "parallel.pp=8",
          "parallel.pp_layers=[15,16,16,16,16,16,16,15]", "train.seq_len=8192", "train.micro_batch_size=1",
          "train.dtype=bfloat16"]

# In the child: count new_group calls, rehearse, print one JSON line with the counts and peak RSS.
CHILD = """
import json, resource, sys, time
import torch.distributed as dist
calls = [0]
new_group = dist.new_group
def counted(*a, **k):
    calls[0] += 1
    return new_group(*a, **k)
dist.new_group = counted  # parallel/groups.py calls it through this module
from launch.rehearse import Options, rehearse
start = time.perf_counter()
job = rehearse(Options(int(sys.argv[1]), [0], 80.0, sys.argv[3:], step=sys.argv[2] == "step"))
[rank] = job["ranks"]
print(json.dumps({"groups": calls[0], "seconds": time.perf_counter() - start, "phases": rank["seconds"],
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_gb": rank["peak"] / 1e9}))
"""


def run_child(code: str, world: int, *args: str) -> dict:
    """`code` run in a fresh process with argv [world, *args, *LAYOUT's overrides] (a global batch
    of 8 sequences per 64 ranks); the JSON object of its last line."""
    overrides = [*LAYOUT, f"train.global_batch_size={8 * world // 64}"]
    out = subprocess.run([sys.executable, "-c", code, str(world), *args, *overrides],
                         capture_output=True, text=True, check=True, timeout=3600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def rehearse_once(world: int, step: bool) -> dict:
    return run_child(CHILD, world, "step" if step else "state")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worlds", default="64,256,1024,4096,16384")
    worlds = [int(w) for w in ap.parse_args().worlds.split(",")]
    step = rehearse_once(worlds[0], step=True)
    print(f"rank 0's whole step (8 microbatches through 1F1B) at world {worlds[0]}: "
          f"{step['phases']['step']:.1f} s, peak of live bytes {step['peak_gb']:.1f} GB, {step['rss_mb']:.0f} MB resident")
    print(f"{'world':>7}{'groups':>9}{'groups s':>10}{'total s':>9}{'RSS MB':>8}{'groups ms per 1k':>18}")
    rows = []
    for w in worlds:
        r = rehearse_once(w, step=False)
        rows.append(r)
        print(f"{w:>7}{r['groups']:>9}{r['phases']['groups']:>10.2f}{r['seconds']:>9.2f}{r['rss_mb']:>8.0f}"
              f"{1e6 * r['phases']['groups'] / r['groups']:>18.1f}")
    first, last = rows[0], rows[-1]
    print(f"from {worlds[0]} to {worlds[-1]} ranks: groups ×{last['groups'] / first['groups']:.0f}, building them "
          f"×{last['phases']['groups'] / first['phases']['groups']:.0f}, the whole rehearsal "
          f"×{last['seconds'] / first['seconds']:.1f}, memory ×{last['rss_mb'] / first['rss_mb']:.2f}")


if __name__ == "__main__":
    main()
