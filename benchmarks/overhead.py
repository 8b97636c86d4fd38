"""Throughput of quintet's trainer against a minimal hand-written PyTorch loop, and the cost of
the per-step metrics (FLOPs, MFU, memory, data wait, communication time), side by side.

One process: quintet with its metrics, quintet without them (the step metrics replaced by
tokens/s alone), and a hand-written loop — same model (`tiny`), same data (the sample corpus,
same batches), same batch and microbatches, optimizer, schedule and clipping. The contenders
alternate in rounds in one process, so drift of the machine hits each; each reports the median
tokens/s of its steady-state steps. Two ranks (FSDP2, dp=2): quintet with and without the
metrics, whose per-step all-gather of every rank's figures only exists there.

    python -m benchmarks.overhead            # ~5 minutes on 2 cores
    python -m benchmarks.overhead --quick    # ~1.5 minutes
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import tempfile

import torch
import torch.nn.functional as F

import launch.train
from benchmarks.common import emit, median
from launch.config import compose
from launch.spawn import run_ranks
from parallel.materialize import initial_values, materialize
from runtime.data import BatchLoader, build_datasets, load_tokenizer
from runtime.metrics import read_metrics
from runtime.model import ModelArgs, Transformer
from runtime.optim import build_optimizer, lr_at, set_lr

WARMUP = 3  # steps dropped from each run before taking the median


class TokensPerSecondOnly:
    """The trainer's accounting without the metrics: what the trainer reported before them."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step

    def begin_step(self) -> None:
        pass

    def waiting_for_data(self):
        return contextlib.nullcontext()

    def metrics(self, step_time_s: float) -> dict:
        return {"tokens_per_s": self.tokens_per_step / step_time_s}


@contextlib.contextmanager
def metrics_off():
    """launch.train builds TokensPerSecondOnly instead of the accounting (and no peak probe)."""
    real = launch.train.build_accounting
    launch.train.build_accounting = lambda cfg, args, device, lws, tokens_per_step, *rest: \
        TokensPerSecondOnly(tokens_per_step)
    try:
        yield
    finally:
        launch.train.build_accounting = real


def quintet_steps(overrides: list[str], steps: int, metrics: bool = True) -> tuple[list[float], list[float]]:
    """Step times and losses of `launch.train`'s code path in this process (a world of one)."""
    with tempfile.TemporaryDirectory() as run_dir, (contextlib.nullcontext() if metrics else metrics_off()):
        launch.train.run(compose([*overrides, f"train.steps={steps}", f"run_dir={run_dir}", "logging.every=100000"]))
        records = read_metrics(run_dir)
    return [r["step_time_s"] for r in records], [r["loss"] for r in records]


def _two_ranks(rank: int, world: int, overrides: list[str], metrics: bool) -> None:
    with contextlib.nullcontext() if metrics else metrics_off():
        launch.train.run(compose(overrides))


def two_rank_steps(steps: int, metrics: bool) -> list[float]:
    with tempfile.TemporaryDirectory() as run_dir:
        overrides = ["model=tiny", "data=sample", "parallel.dp=2", f"train.steps={steps}", "logging.every=100000",
                     f"run_dir={run_dir}"]
        run_ranks(_two_ranks, 2, args=(overrides, metrics), timeout_s=600)
        return [r["step_time_s"] for r in read_metrics(run_dir)]


def hand_written_steps(cfg, steps: int) -> tuple[list[float], list[float]]:
    """The loop a user would write by hand around the same model and data."""
    import time

    args = ModelArgs.from_config(cfg.model)
    model = Transformer(args)
    materialize(model, initial_values(model.init_full, cfg.seed), torch.device("cpu"))  # the same initial values
    optimizer = build_optimizer(model.parameters(), cfg.optim, cfg.train.lr)
    t = cfg.train
    sequences = build_datasets(cfg.data, load_tokenizer(cfg.data.tokenizer), args.vocab_size, t.seq_len, cfg.seed).train
    loader = BatchLoader(sequences, t.global_batch_size, t.micro_batch_size)
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
    times = {"quintet": [], "no_metrics": [], "hand": []}
    loss_gap = 0.0
    for r in range(rounds):
        # Rotate which goes first, so none always runs on a warmer machine.
        names = list(times)[r % 3:] + list(times)[:r % 3]
        for name in names:
            if name == "hand":
                step_times, h_losses = hand_written_steps(cfg, steps)
            else:
                step_times, q_losses = quintet_steps(overrides, steps, metrics=name == "quintet")
            times[name].extend(step_times[WARMUP:])
        loss_gap = max(loss_gap, max(abs(a - b) / a for a, b in zip(q_losses, h_losses)))
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {tokens_per_step / median(t):,.0f} tok/s"
                                                      for n, t in times.items()), flush=True)
    tps = {name: tokens_per_step / median(t) for name, t in times.items()}

    two = {True: [], False: []}
    for r in range(rounds):
        for metrics in ((True, False) if r % 2 == 0 else (False, True)):
            two[metrics].extend(two_rank_steps(steps, metrics)[WARMUP:])
        print(f"2 ranks, round {r + 1}/{rounds}: metrics on {tokens_per_step / median(two[True]):,.0f} tok/s, "
              f"off {tokens_per_step / median(two[False]):,.0f} tok/s", flush=True)
    two_tps = {k: tokens_per_step / median(v) for k, v in two.items()}

    ratio_hand, ratio_metrics = tps["quintet"] / tps["hand"], tps["quintet"] / tps["no_metrics"]
    ratio_two = two_tps[True] / two_tps[False]
    print(f"\nquintet trainer          {tps['quintet']:10,.0f} tokens/s   (median of {len(times['quintet'])} steps)")
    print(f"quintet without metrics  {tps['no_metrics']:10,.0f} tokens/s")
    print(f"hand-written loop        {tps['hand']:10,.0f} tokens/s")
    print(f"2 ranks: metrics on {two_tps[True]:,.0f}, off {two_tps[False]:,.0f} tokens/s")
    print(f"ratio quintet / hand-written = {ratio_hand:.3f} (target ≥ 0.97); metrics on / off = {ratio_metrics:.3f} "
          f"(1 rank), {ratio_two:.3f} (2 ranks) (target ≥ 0.98); largest relative loss difference {loss_gap:.1e}")
    emit("overhead", {"model": "tiny", "tokens_per_step": tokens_per_step, "rounds": rounds,
                      "steps_per_round": steps, "quintet_tokens_per_s": round(tps["quintet"], 1),
                      "no_metrics_tokens_per_s": round(tps["no_metrics"], 1),
                      "hand_tokens_per_s": round(tps["hand"], 1), "ratio": round(ratio_hand, 4),
                      "metrics_ratio": round(ratio_metrics, 4),
                      "two_ranks_tokens_per_s": {"on": round(two_tps[True], 1), "off": round(two_tps[False], 1)},
                      "two_ranks_metrics_ratio": round(ratio_two, 4), "max_rel_loss_diff": loss_gap})


if __name__ == "__main__":
    main()
