"""Train in N fresh ranks from config overrides and read back the metrics: the in-process
equivalent of `torchrun -m launch.train`, used by the parity tests."""
from __future__ import annotations

import math
import os
import tempfile

import pytest

from runtime.metrics import read_metrics
from launch.spawn import run_ranks

# A model and batch small enough that 20 steps take well under a second per rank, on generated
# data with 256 ids: the parity of layouts does not depend on the data, and a head over the
# sample tokenizer's 1,024 ids would cost this model more than its layers. The real data path has
# tests of its own (tests/dist/test_data_parity.py, tests/unit/test_data.py).
SMALL = [
    "model.n_layers=2", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=96",
    "model.vocab_size=256", "data=synthetic",
    "train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=4", "train.steps=20",
    "optim.warmup_steps=5", "logging.every=1000", "checkpoint.pool_mb=8",
    # A configured peak for MFU: no rank spends half a second probing its matrix-multiply rate.
    "logging.peak_tflops=1",
]

# For tests that call launch.train.setup() without a run of their own: rank 0 writes config.yaml
# there, outside the checkout.
SCRATCH_RUN_DIR = "run_dir=" + os.path.join(tempfile.gettempdir(), "quintet-scratch")


def _train_rank(rank: int, world_size: int, overrides: list[str]) -> None:
    from launch.config import compose
    from launch.train import run

    run(compose(overrides))


def train(run_dir, overrides: list[str], world_size: int = 1, small: bool = True,
          timeout_s: float = 180.0) -> list[dict]:
    """Run training on `world_size` ranks into `run_dir`; returns metrics.jsonl's records."""
    overrides = (SMALL if small else []) + list(overrides) + [f"run_dir={run_dir}"]
    run_ranks(_train_rank, world_size, args=(overrides,), timeout_s=timeout_s)
    return read_metrics(run_dir)


def losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records]


def assert_same_losses(ref: list[dict], got: list[dict], rtol: float) -> None:
    """Equal step numbers, and every loss within `rtol` of the reference (relative)."""
    assert [r["step"] for r in got] == [r["step"] for r in ref], "different steps were logged"
    worst = max(abs(a - b) / abs(a) for a, b in zip(losses(ref), losses(got)))
    assert all(math.isfinite(x) for x in losses(got))
    assert worst <= rtol, (f"largest relative loss difference {worst:.3e} > {rtol:.0e}\n"
                           f"reference {losses(ref)}\ngot       {losses(got)}")


def parity_cases(layouts: dict[str, tuple[int, list[str]]], fp32_default=None, slow=()) -> list:
    """(layout, dtype) parameters of a parity test: float64 (bound 1e-9, where summation order
    cannot hide a bug) for every layout, float32 (1e-5, the production path) for the layouts of
    two ranks. The fp32 run of a bigger layout checks nothing its fp64 run and the small fp32
    runs do not, and costs seconds each on two cores. `fp32_default`: the layouts whose fp32 run
    is in the default suite (None: all); the other fp32 runs are `slow` (QUINTET_SLOW=1), as are
    both runs of the layouts in `slow`."""
    def case(name, dtype):
        is_slow = name in slow or (dtype == "float32" and fp32_default is not None and name not in fp32_default)
        return pytest.param(name, dtype, id=f"{name}-{dtype}", marks=[pytest.mark.slow] if is_slow else [])

    return [case(name, dtype) for name, (world, _) in layouts.items()
            for dtype in ("float32", "float64") if dtype == "float64" or world <= 2]


# docs/architecture.md, "Numerics contract": any layout's loss equals one process's within these (relative).
RTOL = {"float32": 1e-5, "float64": 1e-9}


class References:
    """Single-process runs for the parity tests of one module, each trained once: `ref(dtype,
    same)` trains with `base` + `same` (the overrides that change the numbers, not the layout)."""

    def __init__(self, tmp_path_factory, base: list[str] = ()):
        self.tmp, self.base, self.cache = tmp_path_factory, list(base), {}

    def __call__(self, dtype: str, same=()) -> list[dict]:
        key = (dtype, tuple(same))
        if key not in self.cache:
            self.cache[key] = train(self.tmp.mktemp("ref"), [f"train.dtype={dtype}", *self.base, *same])
        return self.cache[key]


def total_losses(records: list[dict]) -> list[dict]:
    """MoE runs compared by their total loss (language model + balancing terms)."""
    return [{"step": r["step"], "loss": r["total_loss"]} for r in records]
