"""Who writes each block of a checkpoint, decided two ways against the world size: by
exchanging every rank's list of blocks (an all_gather_object of their coordinates, the lowest
holder of each wins: what every checkpoint request did before) or from the layout
(parallel/state.py: the plan's splits, FSDP's sharded dimensions and the pipeline stage give
each block's owner, no communication). `llama3_405b` as in benchmarks/rehearse.py (tp8 × pp8 ×
dp = world / 64, FSDP), rank 0 rehearsed at each world size.

Reported per world size: the blocks of rank 0 and the seconds to name them with their owners
(`state_blocks`, which both ways pay: views of fake tensors here); for the exchange, the bytes it
brings every rank (its pickled list times the world: all_gather_object pads every list to the
longest) and the seconds to unpickle them and find each block's lowest holder — the receiving
side's CPU alone, no transfer counted, so a lower bound of what the exchange costs a rank; and
the ratio of the two ways, (naming + exchange) / naming.

    python -m benchmarks.checkpoint_owners                   # ~3 minutes on 2 cores
    python -m benchmarks.checkpoint_owners --worlds 1024
"""
from __future__ import annotations

import argparse

from benchmarks.rehearse import run_child

# In the child: rehearse rank 0 without a step; at its checkpoint request, time both ways.
CHILD = """
import json, pickle, resource, sys, time
import launch.rehearse as rehearsal
from parallel.state import state_blocks
figures = {}
def measured(cfg, par, optimizer):
    start = time.perf_counter()
    blocks = state_blocks(par, optimizer)
    figures["layout_s"] = time.perf_counter() - start
    figures["blocks"] = len(blocks)
    listed = pickle.dumps([(b.key, tuple(map(tuple, b.coords()))) for b in blocks])
    world = par.groups.topology.world_size
    figures["exchange_bytes"] = len(listed) * world
    start = time.perf_counter()
    first_holder = {}
    for r in range(world):  # every rank's list as it arrives, as runtime/checkpoint/sync.py indexed it
        for item in pickle.loads(listed):
            first_holder.setdefault(item, r)
    figures["exchange_s"] = time.perf_counter() - start
    return checkpoint_request(cfg, par, optimizer)
checkpoint_request, rehearsal.checkpoint_request = rehearsal.checkpoint_request, measured
rehearsal.rehearse(rehearsal.Options(int(sys.argv[1]), [0], 80.0, sys.argv[2:], step=False))
figures["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(figures))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worlds", default="1024,4096,16384")
    worlds = [int(w) for w in ap.parse_args().worlds.split(",")]
    print(f"{'world':>7}{'blocks':>8}{'naming s':>10}{'exchange MB':>13}{'exchange s':>12}{'ratio':>8}{'RSS MB':>8}")
    for world in worlds:
        f = run_child(CHILD, world)
        print(f"{world:>7}{f['blocks']:>8}{f['layout_s']:>10.3f}{f['exchange_bytes'] / 2**20:>13.1f}"
              f"{f['exchange_s']:>12.2f}{1 + f['exchange_s'] / f['layout_s']:>7.1f}×{f['rss_mb']:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
