"""Ladder residual against the standard residual under tensor parallelism on a slow interconnect.

For tp ∈ {2, 4} and both residuals, the `tiny` model (4 layers, dim 256) is trained through
`launch.train`'s code path (batch 8 × 256 tokens, median step time of 6 steps after 2 warm-up
steps) and decodes greedily (prompt 16 tokens, 32 new tokens, batch 1, KV cache; per-token
latency after the prefill). Local ranks talk over an emulated slow interconnect
(launch/slowlink.py): every collective completes 0.5 ms after its bytes have crossed a
125 MB/s link (1 Gbit/s Ethernet), bytes of concurrent collectives sharing the link — the
byte-proportional delay fallback of docs/architecture.md ("Emulation"), not network namespaces. One intra-op thread
per rank.

    python -m benchmarks.ladder            # ~3 minutes
    python -m benchmarks.ladder --quick    # ~1.5 minutes
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time

import torch

from benchmarks.common import emit, median

LATENCY, BANDWIDTH = 0.5e-3, 125e6
BATCH, SEQ = 8, 256


def _run(rank: int, world: int, residual: str, steps: int, new_tokens: int, run_dir: str) -> dict:
    from launch.config import compose
    from launch.slowlink import SlowLink
    from launch.train import setup
    from parallel.tensor import gather_logits
    from runtime.generate import generate

    torch.set_num_threads(1)
    logging.getLogger("quintet").setLevel(logging.WARNING)
    run = setup(compose(["model=tiny", f"model.residual={residual}", f"parallel.tp={world}",
                         f"train.global_batch_size={BATCH}", f"train.micro_batch_size={BATCH}", f"train.seq_len={SEQ}",
                         "logging.every=100000", f"run_dir={run_dir}"]))
    times = []
    with SlowLink(LATENCY, BANDWIDTH):
        for step in range(steps + 2):
            start = time.perf_counter()
            run.trainer.train_step(step)
            times.append(time.perf_counter() - start)
        model = run.parallel.model
        gather = lambda logits: gather_logits(logits, run.parallel.groups)  # noqa: E731
        prompt = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
        generate(model, prompt, 2, gather_logits=gather)  # warm up
        start = time.perf_counter()
        generate(model, prompt, 1, gather_logits=gather)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        tokens = generate(model, prompt, new_tokens, gather_logits=gather)
        decode = (time.perf_counter() - start - prefill) / (new_tokens - 1)
    return {"step_s": median(times[2:]), "decode_s": decode, "tokens": tokens[0, -8:].tolist()}


def main() -> None:
    from launch.spawn import run_ranks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    steps, new_tokens = (3, 16) if args.quick else (6, 32)
    results = {}
    for tp in (2, 4):
        for residual in ("standard", "ladder"):
            with tempfile.TemporaryDirectory() as run_dir:
                out = run_ranks(_run, tp, args=(residual, steps, new_tokens, run_dir), timeout_s=1800)
            step = max(r["step_s"] for r in out)
            decode = max(r["decode_s"] for r in out)
            results[f"tp{tp}/{residual}"] = {"train_tokens_per_s": round(BATCH * SEQ / step, 1),
                                             "step_s": round(step, 4), "decode_ms_per_token": round(decode * 1e3, 3)}
            r = results[f"tp{tp}/{residual}"]
            print(f"tp={tp} {residual:8s}: training {r['train_tokens_per_s']:7,.0f} tokens/s "
                  f"(step {r['step_s'] * 1e3:6.0f} ms)   decode {r['decode_ms_per_token']:6.2f} ms/token", flush=True)
    summary = {}
    for tp in (2, 4):
        s, ladder = results[f"tp{tp}/standard"], results[f"tp{tp}/ladder"]
        summary[f"tp{tp}"] = {"train_speedup": round(ladder["train_tokens_per_s"] / s["train_tokens_per_s"], 3),
                              "decode_speedup": round(s["decode_ms_per_token"] / ladder["decode_ms_per_token"], 3)}
        print(f"tp={tp}: ladder/standard training {summary[f'tp{tp}']['train_speedup']:.2f}x, "
              f"decode {summary[f'tp{tp}']['decode_speedup']:.2f}x")
    print("targets at tp=4: decode ≥ 1.25, training ≥ 1.15")
    emit("ladder", {"link": {"latency_ms": LATENCY * 1e3, "bandwidth_mb_s": BANDWIDTH / 1e6, "emulation": "slowlink"},
                    "model": "tiny", "batch": BATCH, "seq_len": SEQ, "steps": steps, "new_tokens": new_tokens,
                    "results": results, "summary": summary})


if __name__ == "__main__":
    main()
