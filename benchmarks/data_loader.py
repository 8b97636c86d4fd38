"""The real data path's cost: the loader's share of step time, and what document masks cost attention.

1. Loader share: 4 ranks (tp2 × dp2) train `tiny` on a blend of two indexed datasets (short
   documents, 0.7/0.3) with document masks and end-of-document loss masking; the share is the
   time a step waits for its batch (reading, blending, document indices; the slowest rank) over
   the step time, median over steady steps. Target ≤ 2%.
2. Mask cost: `tiny` at seq_len 1,024 on documents of 20–400 tokens, with and without
   `data.document_mask`, for one rank (fused flash attention with a boolean mask), cp=2 ring
   attention (per-block masks, fully masked blocks skipped) and cp=2 Ulysses; the ratio of step
   times, masked over unmasked.

    python -m benchmarks.data_loader            # ~3 minutes on 2 cores
    python -m benchmarks.data_loader --quick
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import emit, measure_training, median, summarize
from runtime.data.indexed import IndexedWriter

WARMUP = 2


def write_documents(prefix: Path, n_docs: int, low: int, high: int, seed: int) -> str:
    g = np.random.default_rng(seed)
    with IndexedWriter(prefix, np.uint16) as w:
        for _ in range(n_docs):
            w.add_document(np.append(g.integers(1, 1024, g.integers(low, high)), 0))
    return str(prefix)


def run(world: int, overrides: list[str], steps: int, run_dir: Path) -> dict:
    from launch.spawn import run_ranks

    threads = max(1, 2 // world)
    out = run_ranks(measure_training, world, timeout_s=3600,
                    args=([*overrides, "logging.every=100000", "checkpoint.enabled=false", f"run_dir={run_dir}"],
                          steps, threads))
    tokens = int(next(o.split("=")[1] for o in overrides if o.startswith("train.global_batch_size="))) * \
        int(next(o.split("=")[1] for o in overrides if o.startswith("train.seq_len=")))
    figures = summarize(out, WARMUP, tokens)
    shares = [max(r["data_wait"][i] for r in out) / max(r["times"][i] for r in out) for i in range(WARMUP, steps)]
    figures["data_wait_share"] = median(shares)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    steps = 5 if args.quick else 10
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        a, b = write_documents(root / "a", 20_000, 5, 200, 1), write_documents(root / "b", 10_000, 5, 200, 2)
        long_docs = write_documents(root / "long", 2_000, 20, 400, 3)
        blend = ["data=indexed", f"data.blend=[[0.7,'{a}'],[0.3,'{b}']]", "data.document_mask=true",
                 "data.mask_eod_loss=true", "train.global_batch_size=16", "train.micro_batch_size=4",
                 "train.seq_len=256"]
        results["loader_tp2_dp2"] = run(4, [*blend, "parallel.tp=2"], steps, root / "r0")
        base = ["data=indexed", f"data.path='{long_docs}'", "train.global_batch_size=4", "train.micro_batch_size=2",
                "train.seq_len=1024"]
        layouts = {"one rank": (1, []), "cp2 ring": (2, ["parallel.cp=2"]),
                   "cp2 ulysses": (2, ["parallel.cp=2", "parallel.cp_impl=ulysses"])}
        for name, (world, layout) in layouts.items():
            for masked in (False, True):
                key = f"{name}, {'masked' if masked else 'unmasked'}"
                results[key] = run(world, [*base, *layout, f"data.document_mask={str(masked).lower()}"], steps,
                                   root / key.replace(" ", "_").replace(",", ""))
    share = results["loader_tp2_dp2"]["data_wait_share"]
    print(f"loader share of step time, tp2×dp2, blend + document masks: {share:.2%} (target ≤ 2%)")
    ratios = {}
    for name in layouts:
        ratios[name] = results[f"{name}, masked"]["step_s"] / results[f"{name}, unmasked"]["step_s"]
        print(f"{name:12} step {results[f'{name}, unmasked']['step_s']:.3f} s unmasked, "
              f"{results[f'{name}, masked']['step_s']:.3f} s masked: {ratios[name]:.2f}x")
    emit("data_loader", {"model": "tiny", "steps": steps, "results": results,
                         "summary": {"loader_share": round(share, 4),
                                     "mask_cost": {k: round(v, 3) for k, v in ratios.items()}}})


if __name__ == "__main__":
    main()
