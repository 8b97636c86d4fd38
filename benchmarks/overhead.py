"""Throughput of quintet's trainer against a minimal hand-written PyTorch loop, one process.

Same model (`tiny`), same data (the sample corpus, same batches), same batch and microbatches,
same optimizer, schedule and clipping. The contenders alternate in rounds in one process, so
drift of the machine hits both; each reports the median tokens/s of its steady-state steps.

    python -m benchmarks.overhead            # ~3 minutes on 2 cores
    python -m benchmarks.overhead --quick    # ~1 minute
"""
from __future__ import annotations

import argparse
import logging
import tempfile

import torch
import torch.nn.functional as F

from benchmarks.common import emit, median
from launch.config import compose
from launch.train import run
from parallel.materialize import materialize
from runtime.data import BatchLoader, load_tokens
from runtime.metrics import read_metrics
from runtime.model import ModelArgs, Transformer
from runtime.optim import build_optimizer, lr_at, set_lr

WARMUP = 3  # steps dropped from each run before taking the median


def quintet_steps(overrides: list[str], steps: int) -> tuple[list[float], list[float]]:
    """Step times and losses of `launch.train`'s code path in this process (a world of one)."""
    with tempfile.TemporaryDirectory() as run_dir:
        run(compose([*overrides, f"train.steps={steps}", f"run_dir={run_dir}", "logging.every=100000"]))
        records = read_metrics(run_dir)
    return [r["step_time_s"] for r in records], [r["loss"] for r in records]


def hand_written_steps(cfg, steps: int) -> tuple[list[float], list[float]]:
    """The loop a user would write by hand around the same model and data."""
    import time

    args = ModelArgs.from_config(cfg.model)
    model = Transformer(args)
    materialize(model, model.init_full, torch.device("cpu"), cfg.seed)  # the same initial values
    optimizer = build_optimizer(model.parameters(), cfg.optim, cfg.train.lr)
    t = cfg.train
    loader = BatchLoader(load_tokens("sample", None, 256, cfg.seed), t.seq_len, t.global_batch_size,
                         t.micro_batch_size, seed=cfg.seed)
    n_targets = t.global_batch_size * t.seq_len
    times, losses = [], []
    for step in range(steps):
        start = time.perf_counter()
        total = 0.0
        for batch in loader.step(step):
            loss = F.cross_entropy(model(batch.tokens).flatten(0, 1), batch.labels.flatten(), reduction="sum")
            (loss / n_targets).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        set_lr(optimizer, lr_at(step, t.lr, cfg.optim.warmup_steps, steps, cfg.optim.min_lr_ratio))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(total / n_targets)
    return times, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and steps (~1 minute)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 5)
    steps = args.steps or (12 if args.quick else 20)
    logging.getLogger("quintet").setLevel(logging.WARNING)

    overrides = ["model=tiny", "data=sample"]
    cfg = compose([*overrides, "run_dir=unused"])
    tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
    ours, hand, loss_gap = [], [], 0.0
    for r in range(rounds):
        # Alternate which goes first, so neither always runs on a warmer machine.
        order = [("quintet", ours), ("hand", hand)] if r % 2 == 0 else [("hand", hand), ("quintet", ours)]
        for name, sink in order:
            if name == "quintet":
                times, q_losses = quintet_steps(overrides, steps)
            else:
                times, h_losses = hand_written_steps(cfg, steps)
            sink.extend(times[WARMUP:])
        loss_gap = max(loss_gap, max(abs(a - b) / a for a, b in zip(q_losses, h_losses)))
        print(f"round {r + 1}/{rounds}: quintet {tokens_per_step / median(ours):,.0f} tok/s, "
              f"hand-written {tokens_per_step / median(hand):,.0f} tok/s", flush=True)

    ours_tps, hand_tps = tokens_per_step / median(ours), tokens_per_step / median(hand)
    ratio = ours_tps / hand_tps
    print(f"\nquintet trainer   {ours_tps:10,.0f} tokens/s   (median of {len(ours)} steps)")
    print(f"hand-written loop {hand_tps:10,.0f} tokens/s   (median of {len(hand)} steps)")
    print(f"ratio quintet / hand-written = {ratio:.3f}  (target ≥ 0.97); "
          f"largest relative loss difference {loss_gap:.1e}")
    emit("overhead", {"model": "tiny", "tokens_per_step": tokens_per_step, "rounds": rounds,
                      "steps_per_round": steps, "quintet_tokens_per_s": round(ours_tps, 1),
                      "hand_tokens_per_s": round(hand_tps, 1), "ratio": round(ratio, 4),
                      "max_rel_loss_diff": loss_gap})


if __name__ == "__main__":
    main()
