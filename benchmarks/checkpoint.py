"""Checkpointing cost, side by side: no checkpoint, torch.save, DCP save, DCP async_save,
DeepSpeed's default engine, quintet's sync engine and the lazy engine (DataStates-LLM).

One process trains a Llama-style model of ~134M parameters (dim 768, 12 layers, vocabulary
32000; fp32 parameters + AdamW state ≈ 1.6 GB) through `launch.train`'s code path, on CPU, after
3 warm-up steps. First the storage write bandwidth is measured (1 GiB, fsync; buffered as the
baselines write, and O_DIRECT as the lazy writer writes), so the physical bound is visible. Then:

(a) burst: a checkpoint after each of 5 consecutive steps, the lazy pool large enough to hold
    all of them; reported: the training-visible blocking time per checkpoint (the save call,
    plus for the lazy engine the wait before the next optimizer step);
(b) steady state: a checkpoint every k steps, k the smallest interval whose training time covers
    one checkpoint's write time at the measured buffered bandwidth; reported: tokens/s over the run
    (until the last step; the final drain is reported beside it), as a ratio to no checkpoint.

    python -m benchmarks.checkpoint            # ~10 minutes
    python -m benchmarks.checkpoint --quick    # smaller model, ~2 minutes
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import emit, median

FULL = ["model.dim=768", "model.n_layers=12", "model.n_heads=12", "model.n_kv_heads=12", "model.ffn_dim=2048",
        "model.vocab_size=32000"]
QUICK = ["model.dim=512", "model.n_layers=6", "model.n_heads=8", "model.n_kv_heads=8", "model.ffn_dim=1376",
         "model.vocab_size=32000"]
BATCH = ["train.seq_len=32", "train.global_batch_size=1", "train.micro_batch_size=1", "data=synthetic"]
WARMUP = 3
CONTENDERS = ("none", "torch_save", "dcp_save", "dcp_async", "deepspeed", "sync", "lazy")


def write_bandwidth(root: Path, nbytes: int = 1 << 30) -> tuple[float, float]:
    """Bytes/s of a 1 GiB write + fsync: buffered (through the page cache, as torch.save and DCP
    write) and direct (O_DIRECT from an aligned buffer, as the lazy writer writes)."""
    from runtime.checkpoint.direct_file import ALIGN, DirectFile
    from runtime.checkpoint.pool import HostPool

    data = HostPool(nbytes, align=ALIGN).buffer.numpy()
    path = root / "probe.bin"
    start = time.perf_counter()
    with open(path, "wb") as f:
        f.write(memoryview(data))
        f.flush()
        os.fsync(f.fileno())
    buffered = nbytes / (time.perf_counter() - start)
    start = time.perf_counter()
    f = DirectFile(path)
    for at in range(0, nbytes, 64 << 20):
        f.write(memoryview(data[at:at + (64 << 20)]), min(64 << 20, nbytes - at))
    f.close()
    with open(path, "ab") as tail:
        os.fsync(tail.fileno())
    direct = nbytes / (time.perf_counter() - start)
    path.unlink()
    return buffered, direct


class Saver:
    """One contender: save(step) is the training-visible call; before_step() is what the next
    optimizer step waits for; finish() drains what is still in flight (not training time)."""

    def __init__(self, name: str, run, root: Path):
        self.name, self.run, self.root = name, run, root
        self.engine = run.trainer.checkpointer
        self.blocked: list[float] = []
        if name == "deepspeed":
            from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
            self.ds = TorchCheckpointEngine()
        if name in ("sync", "lazy", "dcp_async"):
            # The trainer's own engine: time the wait before each optimizer step.
            inner = self.engine.wait

            def timed_wait():
                start = time.perf_counter()
                inner()
                if self.blocked:
                    self.blocked[-1] += time.perf_counter() - start
            self.engine.wait = timed_wait

    def state(self) -> dict:
        return {"model": self.run.parallel.model.state_dict(), "optim": self.run.optimizer.state_dict()}

    def save(self, step: int) -> None:
        path = self.root / self.name / f"step_{step:05d}"
        start = time.perf_counter()
        if self.name == "torch_save":
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.state(), path)
        elif self.name == "deepspeed":
            path.parent.mkdir(parents=True, exist_ok=True)
            self.ds.save(self.state(), str(path))
        elif self.name == "dcp_save":
            import torch.distributed.checkpoint as dcp
            dcp.save(self.state(), checkpoint_id=str(path))
        elif self.name != "none":
            self.engine.request(step, self.run.trainer.state(), {"tokens": 0})
        self.blocked.append(time.perf_counter() - start)

    def finish(self) -> float:
        start = time.perf_counter()
        if self.name in ("sync", "lazy", "dcp_async"):
            self.engine.close()
        return time.perf_counter() - start


def contender(name: str, model: list[str], root: Path, pool_mb: int, steps: int, every: int) -> dict:
    from launch.config import compose
    from launch.train import setup

    engine = name if name in ("sync", "lazy", "dcp_async") else "sync"
    run = setup(compose([*model, *BATCH, f"run_dir={root / name}", "checkpoint.every=0", "logging.every=100000",
                         f"checkpoint.engine={engine}", f"checkpoint.pool_mb={pool_mb}", "checkpoint.chunk_mb=64"]))
    saver = Saver(name, run, root)
    # Warm up: optimizer state exists from the first step on, and the first steps after a large
    # allocation (the lazy pool, made resident at setup) run slow while the kernel settles.
    for step in range(WARMUP):
        run.trainer.train_step(step)
    times = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        t = time.perf_counter()
        run.trainer.train_step(WARMUP + step - 1)
        times.append(time.perf_counter() - t)
        if every and step % every == 0:
            saver.save(step)
    elapsed = time.perf_counter() - start
    drain = saver.finish()
    shutil.rmtree(root / name, ignore_errors=True)
    return {"step_times": times, "elapsed": elapsed, "drain": drain, "blocked": saver.blocked}


def isolated(name: str, model: list[str], root: Path, pool_mb: int, steps: int, every: int) -> dict:
    """`contender` in a fresh process: a run must not inherit the heap, threads or page-cache
    state of the one before it (in one process, the steady-state baseline drifted by 30%)."""
    spec = json.dumps([name, model, str(root), pool_mb, steps, every])
    out = subprocess.run([sys.executable, "-m", "benchmarks.checkpoint", "--contender", spec],
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"contender {name} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dir", default=None, help="where checkpoints go (default: a temporary directory)")
    parser.add_argument("--contender", default=None, help=argparse.SUPPRESS)  # isolated(): one run, JSON out
    args = parser.parse_args(argv)
    logging.getLogger("quintet").setLevel(logging.WARNING)
    torch.set_num_threads(os.cpu_count() or 1)
    if args.contender:
        name, model, root, pool_mb, steps, every = json.loads(args.contender)
        print(json.dumps(contender(name, model, Path(root), pool_mb, steps, every)))
        return
    model = QUICK if args.quick else FULL
    root = Path(args.dir or tempfile.mkdtemp(prefix="ckpt-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    bandwidth, direct = write_bandwidth(root)
    print(f"storage write bandwidth: {bandwidth / 1e6:.0f} MB/s buffered, {direct / 1e6:.0f} MB/s direct", flush=True)

    # Size of one checkpoint and the bare step time.
    base = isolated("none", model, root, 64, 4, 0)
    step_s = median(base["step_times"])
    from launch.config import compose
    from runtime.model import ModelArgs, Transformer
    with torch.device("meta"):
        n = sum(p.numel() for p in Transformer(ModelArgs.from_config(compose([*model, "run_dir=x"]).model)).parameters())
    state_bytes = 3 * 4 * n  # fp32 parameters, exp_avg, exp_avg_sq
    write_s = state_bytes / bandwidth
    print(f"{n / 1e6:.0f}M parameters, state {state_bytes / 1e9:.2f} GB, step {step_s:.3f}s, "
          f"write {write_s:.2f}s at the measured bandwidth", flush=True)

    burst_n = 5
    pool_mb = math.ceil(burst_n * state_bytes / (1 << 20)) + 64
    burst = {}
    for name in CONTENDERS[1:]:
        r = isolated(name, model, root, pool_mb, burst_n, 1)
        burst[name] = median(r["blocked"])
        print(f"burst {name:>10}: blocking {burst[name]:.3f}s per checkpoint (drain {r['drain']:.1f}s)", flush=True)

    k = max(1, math.ceil(write_s / step_s))
    steps = 3 * k
    tokens = steps * 32
    steady = {}
    # No checkpoint runs first and again last; the faster of the two is the baseline, so that
    # drift of the machine over the run cannot flatter the contenders.
    for name in (*CONTENDERS, "none"):
        r = isolated(name, model, root, math.ceil(state_bytes / (1 << 20)) + 64, steps, 0 if name == "none" else k)
        result = {"tokens_per_s": tokens / r["elapsed"], "drain_s": r["drain"]}
        print(f"steady {name:>10}: {result['tokens_per_s']:.1f} tok/s (drain {r['drain']:.1f}s)", flush=True)
        if name not in steady or result["tokens_per_s"] > steady[name]["tokens_per_s"]:
            steady[name] = result
    ratios = {name: steady[name]["tokens_per_s"] / steady["none"]["tokens_per_s"] for name in CONTENDERS[1:]}
    burst_ratios = {"lazy/torch_save": burst["lazy"] / burst["torch_save"],
                    "lazy/dcp_async": burst["lazy"] / burst["dcp_async"]}
    for key, v in {**burst_ratios, **{f"steady {k2}/none": v2 for k2, v2 in ratios.items()}}.items():
        print(f"{key}: {v:.3f}")
    shutil.rmtree(root, ignore_errors=True)
    emit("checkpoint", {"parameters": n, "state_bytes": state_bytes, "write_bandwidth": bandwidth,
                        "direct_write_bandwidth": direct,
                        "step_s": step_s, "k": k, "burst_blocking_s": burst, "burst_ratios": burst_ratios,
                        "steady": steady, "steady_ratios": ratios,
                        "targets": {"lazy/torch_save": 0.05, "lazy/dcp_async": 0.5, "steady lazy/none": 0.9}})


if __name__ == "__main__":
    main()
